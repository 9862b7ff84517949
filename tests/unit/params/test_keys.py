"""Typed cache keys: value semantics, kinds that never collide, drops that select exactly."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools

import numpy as np
import pytest

from pipeline.cache.cache import ParamCache
from pipeline.io.kv.memory import MemoryKV
from pipeline.params.keys import (
    BlobKey,
    CacheKey,
    ManifestKey,
    OutputKey,
    PointerKey,
    RowKey,
    of_model,
    of_version,
)
from pipeline.params.models import preset
from pipeline.params.registry import ModelRegistry
from pipeline.params.store import ParamStore


def test_equal_fields_equal_keys_and_hashes() -> None:
    pairs: list[tuple[CacheKey, CacheKey]] = [
        (PointerKey("m"), PointerKey("m")),
        (ManifestKey("m", 1), ManifestKey(model="m", version=1)),
        (BlobKey("m", "ab01"), BlobKey(model="m", sha256="ab01")),
        (RowKey("m", "user", 7), RowKey("m", "user", 7)),
        (OutputKey("m", 1, b"\x00" * 16), OutputKey("m", 1, b"\x00" * 16)),
    ]
    for a, b in pairs:
        assert a == b and hash(a) == hash(b) and a is not b
        assert len({a, b}) == 1
    assert BlobKey("m", "ab01") != BlobKey("n", "ab01")  # content is shared within a model
    assert RowKey("m", "user", 7) != RowKey("m", "item", 7)


def test_fields_are_named_frozen_and_slotted() -> None:
    key = ManifestKey("m", 3)
    assert (key.model, key.version) == ("m", 3)
    assert [f.name for f in dataclasses.fields(BlobKey)] == ["model", "sha256"]
    assert [f.name for f in dataclasses.fields(RowKey)] == ["model", "table", "row"]
    assert [f.name for f in dataclasses.fields(OutputKey)] == ["model", "version", "digest"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        key.version = 4  # type: ignore[misc]
    assert not hasattr(key, "__dict__")


def test_distinct_kinds_never_collide_even_with_equal_fields() -> None:
    # Same field values in every kind that has that many fields: still five distinct keys.
    keys: list[CacheKey] = [
        PointerKey("m"),
        ManifestKey("m", 1),
        BlobKey("m", "x"),
        OutputKey("m", 1, b"x"),
        RowKey("m", "x", 1),
    ]
    for a, b in itertools.combinations(keys, 2):
        assert a != b
    assert len(set(keys)) == len(keys)
    # ...and never equal to the tuples that were the keys before.
    assert BlobKey("m", "x") != ("t", "m", 1, "x")
    assert BlobKey("m", "x") != ("m", "x")
    table: dict[object, str] = {k: type(k).__name__ for k in keys}
    assert [table[k] for k in keys] == [type(k).__name__ for k in keys]


def _population() -> list[CacheKey]:
    keys: list[CacheKey] = []
    for model, version in itertools.product(["m", "n"], [1, 2]):
        keys += [
            ManifestKey(model, version),
            BlobKey(model, f"w0-v{version}"),
            BlobKey(model, f"b0-v{version}"),
            OutputKey(model, version, b"d"),
        ]
    for model in ["m", "n"]:
        keys += [PointerKey(model), RowKey(model, "user", 1), RowKey(model, "user", 2)]
    return keys


def test_version_and_model_predicates_select_exactly() -> None:
    keys = _population()
    # content belongs to no one version (the registry knows which versions use it)
    assert {k for k in keys if of_version(k, "m", 1)} == {ManifestKey("m", 1)}
    pieces_of_n = {ManifestKey("n", v) for v in (1, 2)}
    pieces_of_n |= {BlobKey("n", f"{t}-v{v}") for v in (1, 2) for t in ("w0", "b0")}
    assert {k for k in keys if of_model(k, "n")} == pieces_of_n
    assert not of_version(("t", "m", 1, "w0"), "m", 1)  # old-style tuples are not pieces


async def test_drop_by_version_through_the_cache_keeps_bytes_right() -> None:
    cache: ParamCache[object] = ParamCache(capacity_bytes=10**6, ttl_s=60.0)
    keys = _population()
    for k in keys:
        await cache.get(k, lambda: asyncio.sleep(0, np.zeros(10, dtype=np.uint8)))
    assert cache.stats.bytes == 10 * len(keys)
    dropped = cache.invalidate_where(lambda k: of_version(k, "m", 2))
    assert dropped == 1
    left = set(cache.keys())
    gone = {ManifestKey("m", 2)}
    assert left == set(keys) - gone
    assert OutputKey("m", 2, b"d") in left and PointerKey("m") in left
    assert cache.stats.bytes == 10 * len(left)


async def test_registry_uses_typed_keys_and_drops_one_version() -> None:
    kv = MemoryKV()
    cache: ParamCache[object] = ParamCache(capacity_bytes=10**8, ttl_s=60.0)
    registry = ModelRegistry(ParamStore(kv, prefix="t"), cache, version_ttl_s=60.0)
    model = preset("mlp")
    for seed in (1, 2):
        await registry.store.publish("m", model.arch, model.init(seed))
        await registry.resolve("m", seed)
    await registry.resolve("m")
    keys = set(cache.keys())
    assert all(isinstance(k, PointerKey | ManifestKey | BlobKey) for k in keys)
    assert PointerKey("m") in keys
    v1, v2 = await registry.resolve("m", 1), await registry.resolve("m", 2)
    assert {BlobKey("m", r.manifest.tensors["w0"].sha256) for r in (v1, v2)} <= keys
    assert registry.drop_version("m", 1) == 1 + 4  # the manifest and four tensors
    after = set(cache.keys())
    assert ManifestKey("m", 1) not in after
    assert not any(BlobKey("m", meta.sha256) in after for meta in v1.manifest.tensors.values())
    w0 = BlobKey("m", v2.manifest.tensors["w0"].sha256)
    assert {ManifestKey("m", 2), w0, PointerKey("m")} <= after
    assert registry.drop_model("m") == 1 + 4
    assert set(cache.keys()) == {PointerKey("m")}


def test_output_keys_name_their_redis_key() -> None:
    store = ParamStore(MemoryKV(), prefix="p")
    key = OutputKey("m", 3, bytes([0xAB, 0x01]))
    assert store.output_key(key) == "p:m:v3:out:ab01"


async def test_shared_outputs_round_trip_by_key() -> None:
    store = ParamStore(MemoryKV(), prefix="p")
    a, b = OutputKey("m", 1, b"a"), OutputKey("m", 2, b"a")
    await store.write_outputs({a: b"one"}, ttl_s=60.0)
    assert await store.read_outputs([a, b]) == [b"one", None]
