"""ParamStore on the in-memory KV: publish, load, tamper, versions, rollback."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.errors import ConfigError, ModelNotFound, ParamsCorrupt, VersionNotFound
from pipeline.io.kv.memory import MemoryKV
from pipeline.io.npy import to_npy
from pipeline.params.models import preset
from pipeline.params.store import ParamStore, check_model_name


@pytest.fixture
def store() -> ParamStore:
    return ParamStore(MemoryKV(), prefix="t")


async def test_publish_then_load_round_trips(store: ParamStore) -> None:
    model = preset("mlp")
    params = model.init(1)
    m1 = await store.publish("m", model.arch, params)
    assert m1.version == 1 and await store.current_version("m") == 1
    manifest, loaded = await store.load("m")
    assert manifest.arch == model.arch
    assert all(np.array_equal(loaded[k], params[k]) for k in params)
    assert all(not a.flags.writeable for a in loaded.values())
    m2 = await store.publish("m", model.arch, model.init(2))
    assert m2.version == 2 and await store.current_version("m") == 2


async def test_key_layout_follows_design(store: ParamStore) -> None:
    model = preset("mlp")
    await store.publish("m", model.arch, model.init(1))
    kv = store.kv
    assert isinstance(kv, MemoryKV)
    assert set(kv.keys()) == {
        "t:m:current",
        "t:m:seq",
        "t:m:versions",
        "t:m:v1:manifest",
        "t:m:v1:t:w0",
        "t:m:v1:t:b0",
        "t:m:v1:t:w1",
        "t:m:v1:t:b1",
    }
    manifest = json.loads(await kv.get("t:m:v1:manifest") or b"")
    assert set(manifest["tensors"]["w0"]) == {"dtype", "shape", "sha256", "nbytes"}


async def test_pointer_moves_only_after_every_tensor_is_written(store: ParamStore) -> None:
    kv = store.kv
    assert isinstance(kv, MemoryKV)
    model = preset("mlp")
    order: list[str] = []
    original_set, original_many, original_cas = kv.set, kv.set_many, kv.set_if_greater

    async def spy_set(key: str, value: bytes, *, ex: float | None = None) -> None:
        order.append(key)
        await original_set(key, value, ex=ex)

    async def spy_many(mapping: dict[str, bytes], *, ex: float | None = None) -> None:
        order.extend(mapping)
        await original_many(mapping, ex=ex)

    async def spy_cas(key: str, value: int, *, persist: tuple[str, ...] = ()) -> bool:
        order.append(key)
        return await original_cas(key, value, persist=persist)

    kv.set, kv.set_many = spy_set, spy_many  # type: ignore[method-assign]
    kv.set_if_greater = spy_cas  # type: ignore[method-assign]
    await store.publish("m", model.arch, model.init(0))
    assert order[-1] == "t:m:current"
    assert {k for k in order if ":t:" in k or k.endswith("manifest")} <= set(order[:-1])


async def test_tampered_tensor_is_refused(store: ParamStore) -> None:
    model = preset("mlp")
    await store.publish("m", model.arch, model.init(1))
    kv = store.kv
    raw = bytearray(await kv.get("t:m:v1:t:w0") or b"")
    raw[-1] ^= 0xFF
    await kv.set("t:m:v1:t:w0", bytes(raw))
    manifest = await store.manifest("m", 1)
    with pytest.raises(ParamsCorrupt, match="sha256"):
        await store.tensor(manifest, "w0")
    with pytest.raises(ParamsCorrupt):
        await store.load("m")


async def test_bytes_that_match_sha_but_not_shape_are_refused(store: ParamStore) -> None:
    model = preset("mlp")
    manifest = (await store.publish("m", model.arch, model.init(1))).manifest
    wrong = to_npy(np.zeros((2, 2), dtype=np.float32))
    await store.kv.set("t:m:v1:t:b0", wrong)
    import dataclasses
    import hashlib

    from pipeline.params.store import TensorMeta

    meta = manifest.tensors["b0"]
    forged = dataclasses.replace(
        manifest,
        tensors={
            **manifest.tensors,
            "b0": TensorMeta(
                meta.dtype, meta.shape, hashlib.sha256(wrong).hexdigest(), meta.nbytes
            ),
        },
    )
    with pytest.raises(ParamsCorrupt, match="manifest says"):
        await store.tensor(forged, "b0")


async def test_missing_model_and_version(store: ParamStore) -> None:
    with pytest.raises(ModelNotFound):
        await store.current_version("nope")
    model = preset("mlp")
    await store.publish("m", model.arch, model.init(1))
    with pytest.raises(VersionNotFound):
        await store.manifest("m", 9)
    await store.kv.delete("t:m:v1:t:w1")
    with pytest.raises(VersionNotFound):
        await store.load("m")


async def test_publish_validates_tensors_and_names(store: ParamStore) -> None:
    model = preset("mlp")
    params = model.init(1)
    with pytest.raises(ConfigError, match="missing"):
        await store.publish("m", model.arch, {k: v for k, v in params.items() if k != "w0"})
    with pytest.raises(ConfigError, match="shape"):
        await store.publish("m", model.arch, {**params, "w0": np.zeros((2, 2))})
    with pytest.raises(ConfigError, match="invalid model name"):
        check_model_name("a b")
    with pytest.raises(ConfigError):
        await store.publish("x:y", model.arch, params)


async def test_versions_and_rollback(store: ParamStore) -> None:
    model = preset("mlp")
    for seed in range(3):
        await store.publish("m", model.arch, model.init(seed))
    rows = await store.versions("m")
    assert [r.version for r in rows] == [1, 2, 3]
    assert [r.current for r in rows] == [False, False, True]
    await store.set_current("m", 1)
    assert await store.current_version("m") == 1
    await store.kv.delete("t:m:v2:t:w0")
    with pytest.raises(VersionNotFound):
        await store.set_current("m", 2)


async def test_retention_never_retires_current_or_previous() -> None:
    clock_now = [1000.0]
    kv = MemoryKV(clock=lambda: clock_now[0])
    store = ParamStore(kv, prefix="t", retention_s=60.0)
    model = preset("mlp")
    for seed in range(4):
        await store.publish("m", model.arch, model.init(seed))
    ttl = {v: kv.ttl(f"t:m:v{v}:manifest") for v in (1, 2, 3, 4)}
    assert ttl[3] is None and ttl[4] is None  # previous and current are kept
    assert ttl[1] is not None and ttl[2] is not None
    assert all(kv.ttl(f"t:m:v1:t:{n}") is not None for n in ("w0", "b0", "w1", "b1"))
    await store.set_current("m", 2)  # roll back: v2 is kept again, v4 becomes "previous"
    assert kv.ttl("t:m:v2:manifest") is None and kv.ttl("t:m:v2:t:w0") is None
    assert kv.ttl("t:m:v4:manifest") is None
    assert kv.ttl("t:m:v3:manifest") is None  # newer than the current one: never retired
    clock_now[0] += 61
    rows = {r.version: r for r in await store.versions("m")}
    assert not rows[1].available and rows[2].available and rows[2].current
    with pytest.raises(VersionNotFound):
        await store.set_current("m", 1)
