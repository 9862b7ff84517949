"""ModelRegistry: one Redis read per piece on a cold burst, one version per resolve, and a new
version reads only the tensors that changed."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from pipeline.cache.cache import ParamCache, Source, default_size_of
from pipeline.errors import ModelNotFound, ParamsCorrupt, ParamsUnavailable, StoreUnavailable
from pipeline.io.kv.memory import MemoryKV
from pipeline.params.keys import BlobKey, ManifestKey
from pipeline.params.models import build_model, preset
from pipeline.params.registry import ModelRegistry
from pipeline.params.store import ParamStore


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def make_registry(clock: Clock):  # type: ignore[no-untyped-def]
    async def make(**cache_options: object) -> tuple[ModelRegistry, MemoryKV]:
        kv = MemoryKV()
        options: dict[str, object] = {"capacity_bytes": 10**8, "ttl_s": 60.0, "clock": clock}
        options.update(cache_options)
        cache: ParamCache[object] = ParamCache(**options)  # type: ignore[arg-type]
        return ModelRegistry(ParamStore(kv, prefix="t"), cache, version_ttl_s=1.0), kv

    return make


async def test_cold_burst_reads_each_piece_once(make_registry) -> None:  # type: ignore[no-untyped-def]
    registry, kv = await make_registry()
    model = preset("mlp")
    await registry.store.publish("m", model.arch, model.init(0))
    kv.calls.clear()
    kv.latency_s = 0.01
    out = await asyncio.gather(*(registry.resolve("m") for _ in range(200)))
    assert {r.version for r in out} == {1}
    # one GET for the pointer, one for the manifest, one per tensor (4)
    assert kv.calls["get"] == 1 + 1 + 4
    assert sum(kv.calls.values()) == 6
    again = await registry.resolve("m")
    assert again.source is Source.HIT and sum(kv.calls.values()) == 6


async def test_new_version_seen_after_pointer_ttl_and_never_mixed(  # type: ignore[no-untyped-def]
    make_registry, clock: Clock
) -> None:
    registry, _ = await make_registry()
    model = preset("mlp")
    p1, p2 = model.init(1), model.init(2)
    await registry.store.publish("m", model.arch, p1)
    r1 = await registry.resolve("m")
    await registry.store.publish("m", model.arch, p2)
    assert (await registry.resolve("m")).version == 1  # pointer still cached
    clock.now += 1.0
    r2 = await registry.resolve("m")
    assert r2.version == 2
    for resolved, params in ((r1, p1), (r2, p2)):
        assert all(np.array_equal(resolved.params[k], params[k]) for k in params)
    pinned = await registry.resolve("m", 1)  # v1 was dropped when v2 took over: reloaded
    assert pinned.version == 1 and pinned.source is Source.LOADED


async def test_invalidate_pointer_makes_the_next_resolve_read_it(make_registry) -> None:  # type: ignore[no-untyped-def]
    registry, _ = await make_registry()
    model = preset("mlp")
    await registry.store.publish("m", model.arch, model.init(1))
    await registry.resolve("m")
    await registry.store.publish("m", model.arch, model.init(2))
    registry.invalidate_pointer("m")
    assert (await registry.resolve("m")).version == 2


async def test_stale_when_redis_is_down_and_errors_when_cold(  # type: ignore[no-untyped-def]
    make_registry, clock: Clock
) -> None:
    registry, kv = await make_registry(ttl_s=5.0)
    model = preset("mlp")
    await registry.store.publish("m", model.arch, model.init(1))
    await registry.resolve("m")
    clock.now += 10
    kv.fail = StoreUnavailable("redis is down")
    stale = await registry.resolve("m")
    assert stale.source is Source.STALE and stale.version == 1
    with pytest.raises(StoreUnavailable):
        await registry.resolve("other")


async def test_unknown_model_and_corrupt_arch(make_registry) -> None:  # type: ignore[no-untyped-def]
    registry, kv = await make_registry()
    with pytest.raises(ModelNotFound):
        await registry.resolve("ghost")
    model = preset("mlp")
    await registry.store.publish("m", model.arch, model.init(1))
    raw = (await kv.get("t:m:v1:manifest") or b"").replace(b'"mlp"', b'"nope"')
    await kv.set("t:m:v1:manifest", raw)
    with pytest.raises(ParamsCorrupt):
        await registry.resolve("m")


async def test_a_version_switch_drops_the_replaced_version(  # type: ignore[no-untyped-def]
    make_registry, clock: Clock
) -> None:
    registry, _ = await make_registry(policy="lfu")
    model = preset("mlp")
    await registry.store.publish("m", model.arch, model.init(1))
    for _ in range(5):
        await registry.resolve("m")  # v1 gets high LFU counts
    await registry.store.publish("m", model.arch, model.init(2))
    v1 = await registry.resolve("m")
    registry.set_version("m", 2)
    v2 = await registry.resolve("m")
    keys = set(registry.cache.keys())
    assert ManifestKey("m", 1) not in keys
    assert not any(BlobKey("m", meta.sha256) in keys for meta in v1.manifest.tensors.values())
    assert BlobKey("m", v2.manifest.tensors["w0"].sha256) in keys and ManifestKey("m", 2) in keys
    clock.now += 5  # the pointer TTL path drops it too
    await registry.store.publish("m", model.arch, model.init(3))
    assert (await registry.resolve("m")).version == 3
    keys_after = set(registry.cache.keys())
    assert not any(BlobKey("m", meta.sha256) in keys_after for meta in v2.manifest.tensors.values())


async def test_flushed_redis_is_params_unavailable_never_stale(  # type: ignore[no-untyped-def]
    make_registry, clock: Clock
) -> None:
    registry, kv = await make_registry(ttl_s=60.0)
    model = preset("mlp")
    await registry.store.publish("m", model.arch, model.init(1))
    await registry.resolve("m")
    await kv.delete(*kv.keys())  # FLUSHALL
    assert (await registry.resolve("m")).source is Source.HIT  # warm until the pointer TTL
    clock.now += 1.0
    with pytest.raises(ParamsUnavailable, match="publish it again"):
        await registry.resolve("m")
    with pytest.raises(ModelNotFound):
        await registry.resolve("never-served")
    params = model.init(2)
    await registry.store.publish("m", model.arch, params)
    clock.now += 3.0  # past the failure back-off
    again = await registry.resolve("m")
    assert again.version == 1  # the counter restarted with the data...
    assert np.array_equal(again.params["w0"], params["w0"])  # ...and v1 now means new params


async def test_a_reused_version_number_is_never_served_from_old_pieces(  # type: ignore[no-untyped-def]
    make_registry, clock: Clock
) -> None:
    registry, kv = await make_registry(ttl_s=60.0)
    model = preset("mlp")
    await registry.store.publish("m", model.arch, model.init(1))
    await registry.resolve("m")
    await kv.delete(*kv.keys())
    params = model.init(2)
    clock.now += 0.5
    await registry.store.publish("m", model.arch, params)  # v1 again, other parameters
    clock.now += 0.6  # the pointer expires; Redis never looked empty to this worker
    again = await registry.resolve("m")
    assert again.version == 1
    assert np.array_equal(again.params["w0"], params["w0"])


async def test_stampede_at_expiry_one_load_per_piece(  # type: ignore[no-untyped-def]
    make_registry, clock: Clock
) -> None:
    registry, kv = await make_registry(ttl_s=10.0, failure_backoff_s=(0.5, 2.0))
    model = preset("mlp")
    await registry.store.publish("m", model.arch, model.init(1))
    await registry.resolve("m")
    clock.now += 11  # every entry has expired
    kv.calls.clear()
    kv.latency_s = 0.01
    tasks = [asyncio.create_task(registry.resolve("m")) for _ in range(1000)]
    await asyncio.sleep(0)
    tasks[0].cancel()  # the first waiter gives up: the load it started goes on for the rest
    out = await asyncio.gather(*tasks[1:])
    assert {r.version for r in out} == {1}
    assert kv.calls["get"] == 2 + 4  # pointer and manifest, four tensors: one read each
    # a failing store: every waiter gets the error, then retries back off
    clock.now += 11
    kv.calls.clear()
    kv.fail = StoreUnavailable("down")
    results = await asyncio.gather(
        *(registry.resolve("other") for _ in range(1000)), return_exceptions=True
    )
    assert all(isinstance(r, StoreUnavailable) for r in results)
    for _ in range(100):
        with pytest.raises(StoreUnavailable):
            await registry.resolve("other")
    assert sum(kv.calls.values()) == 1  # one call for 1,100 lookups


DEEP = {"kind": "mlp", "layers": [32, 64, 64, 8], "activation": "relu", "softmax": False}


def head_tuned(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same parameters with only the last layer's bias fine-tuned."""
    return {**params, "b2": params["b2"] + np.float32(0.5)}


def cached_blobs(registry: ModelRegistry) -> set[BlobKey]:
    """The tensor contents the registry's cache holds."""
    return {k for k in list(registry.cache.keys()) if isinstance(k, BlobKey)}


@pytest.mark.parametrize("path", ["announcement", "pointer_ttl"])
async def test_a_new_version_reads_only_the_tensor_that_changed(  # type: ignore[no-untyped-def]
    make_registry, clock: Clock, path: str
) -> None:
    registry, kv = await make_registry()
    model = build_model(DEEP)
    p1 = model.init(1)
    p2 = head_tuned(p1)
    assert len(p1) == 6
    await registry.store.publish("m", DEEP, p1)
    r1 = await registry.resolve("m")
    await registry.store.publish("m", DEEP, p2)
    kv.calls.clear()
    if path == "announcement":
        registry.set_version("m", 2)
    else:
        clock.now += 1.0  # the cached pointer expires
    r2 = await registry.resolve("m")
    assert r2.version == 2 and r2.source is Source.LOADED
    assert all(np.array_equal(r2.params[k], p2[k]) for k in p2)
    # the manifest and the one changed tensor (and the pointer when its TTL ran out)
    assert kv.calls["get"] == (2 if path == "announcement" else 3)
    assert sum(kv.calls.values()) == kv.calls["get"]
    assert r2.params["w0"] is r1.params["w0"]  # one cached array, not a copy per version
    assert cached_blobs(registry) == {
        BlobKey("m", meta.sha256) for meta in r2.manifest.tensors.values()
    }
    # rolling back reads only the old head again
    kv.calls.clear()
    registry.set_version("m", 1)
    back = await registry.resolve("m")
    assert back.version == 1 and np.array_equal(back.params["b2"], p1["b2"])
    assert kv.calls["get"] == 2 and sum(kv.calls.values()) == 2


async def test_versions_sharing_a_tensor_share_one_entry_and_one_cold_read(  # type: ignore[no-untyped-def]
    make_registry,
) -> None:
    registry, kv = await make_registry()
    p1 = build_model(DEEP).init(1)
    await registry.store.publish("m", DEEP, p1)
    await registry.store.publish("m", DEEP, head_tuned(p1))
    kv.calls.clear()
    kv.latency_s = 0.01
    out = await asyncio.gather(*(registry.resolve("m", 1 + i % 2) for i in range(400)))
    assert {r.version for r in out} == {1, 2}
    # two manifests, six tensors of v1 and v2's one new tensor: each read once
    assert kv.calls["get"] == 2 + 6 + 1 and sum(kv.calls.values()) == 9
    # byte accounting: the shared five are counted once
    r1, r2 = await registry.resolve("m", 1), await registry.resolve("m", 2)
    assert len(cached_blobs(registry)) == 7
    manifests = default_size_of(r1.manifest) + default_size_of(r2.manifest)
    tensors = sum(a.nbytes for a in r1.params.values()) + r2.params["b2"].nbytes
    assert registry.cache.stats.bytes == manifests + tensors
    # dropping v1 keeps what v2 still uses: its manifest and its own head go, nothing else
    assert registry.drop_version("m", 1) == 2
    kv.calls.clear()
    again = await registry.resolve("m", 2)
    assert again.source is Source.HIT and sum(kv.calls.values()) == 0
    assert registry.drop_model("m") == 1 + 6
    assert cached_blobs(registry) == set()


async def test_a_tampered_changed_tensor_is_still_corrupt(  # type: ignore[no-untyped-def]
    make_registry, clock: Clock
) -> None:
    registry, kv = await make_registry()
    p1 = build_model(DEEP).init(1)
    p2 = head_tuned(p1)
    await registry.store.publish("m", DEEP, p1)
    await registry.resolve("m")
    await registry.store.publish("m", DEEP, p2)
    good = await kv.get("t:m:v2:t:b2")
    await kv.set("t:m:v2:t:b2", await kv.get("t:m:v1:t:b2") or b"")  # valid npy, wrong sha
    registry.set_version("m", 2)
    with pytest.raises(ParamsCorrupt, match="sha256"):
        await registry.resolve("m")
    await kv.set("t:m:v2:t:b2", good or b"")
    clock.now += 0.1  # past the failure's back-off
    r2 = await registry.resolve("m")
    assert r2.version == 2 and np.array_equal(r2.params["b2"], p2["b2"])


async def test_a_manifest_naming_cached_content_of_another_shape_is_corrupt(  # type: ignore[no-untyped-def]
    make_registry,
) -> None:
    registry, kv = await make_registry()
    p1 = build_model(DEEP).init(1)
    await registry.store.publish("m", DEEP, p1)
    r1 = await registry.resolve("m", 1)
    await registry.store.publish("m", DEEP, head_tuned(p1))
    raw = (await kv.get("t:m:v2:manifest") or b"").decode()
    forged = raw.replace(  # v2's new head named as cached content of w0's shape
        (await registry.store.manifest("m", 2)).tensors["b2"].sha256,
        r1.manifest.tensors["w0"].sha256,
    )
    await kv.set("t:m:v2:manifest", forged.encode())
    kv.calls.clear()
    with pytest.raises(ParamsCorrupt, match=r"its content .* manifest says float32\(8,\)"):
        await registry.resolve("m", 2)
    assert kv.calls["get"] == 1  # the manifest: the content was cached, checked, refused
