"""ParamCache: byte budget, eviction, TTL with a fake clock, single-flight, stale fallback."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np
import pytest

from pipeline.cache.cache import ParamCache, Source
from pipeline.errors import ParamsCorrupt, StoreUnavailable


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_cache(clock: FakeClock) -> Callable[..., ParamCache[object]]:
    def make(**kwargs: object) -> ParamCache[object]:
        options: dict[str, object] = {"capacity_bytes": 1000, "ttl_s": 10.0, "clock": clock}
        options.update(kwargs)
        return ParamCache(**options)  # type: ignore[arg-type]

    return make


def blob(n: int, fill: int = 0) -> np.ndarray:
    return np.full(n, fill, dtype=np.uint8)


async def test_hit_after_load_and_stats(make_cache: Callable[..., ParamCache[object]]) -> None:
    cache = make_cache()
    loads = 0

    async def load() -> np.ndarray:
        nonlocal loads
        loads += 1
        return blob(100)

    _, src1 = await cache.get("a", load)
    _, src2 = await cache.get("a", load)
    assert (src1, src2) == (Source.LOADED, Source.HIT)
    stats = cache.stats
    assert (stats.hits, stats.misses, stats.loads, stats.bytes, stats.entries) == (1, 1, 1, 100, 1)
    assert stats.hit_rate == 0.5
    assert loads == 1


async def test_byte_budget_is_never_exceeded_lru(
    make_cache: Callable[..., ParamCache[object]],
) -> None:
    cache = make_cache(capacity_bytes=300)
    for key in "abc":
        await cache.get(key, lambda: asyncio.sleep(0, blob(100)))
    await cache.get("a", lambda: asyncio.sleep(0, blob(100)))  # a is now most recent
    await cache.get("d", lambda: asyncio.sleep(0, blob(100)))
    assert "b" not in cache and "a" in cache and "c" in cache and "d" in cache
    assert cache.stats.bytes == 300
    assert cache.stats.evictions == 1
    await cache.get("big", lambda: asyncio.sleep(0, blob(250)))
    assert cache.stats.bytes <= 300
    assert "big" in cache


async def test_lfu_keeps_the_frequent_key(make_cache: Callable[..., ParamCache[object]]) -> None:
    cache = make_cache(capacity_bytes=200, policy="lfu")
    await cache.get("hot", lambda: asyncio.sleep(0, blob(100)))
    for _ in range(5):
        await cache.get("hot", lambda: asyncio.sleep(0, blob(100)))
    await cache.get("x", lambda: asyncio.sleep(0, blob(100)))
    await cache.get("hot", lambda: asyncio.sleep(0, blob(100)))
    await cache.get("y", lambda: asyncio.sleep(0, blob(100)))
    assert "hot" in cache and "y" in cache and "x" not in cache


async def test_value_larger_than_capacity_is_served_not_kept(
    make_cache: Callable[..., ParamCache[object]],
) -> None:
    cache = make_cache(capacity_bytes=100)
    value, src = await cache.get("huge", lambda: asyncio.sleep(0, blob(500)))
    assert len(value) == 500 and src is Source.LOADED  # type: ignore[arg-type]
    assert "huge" not in cache
    assert cache.stats.oversize == 1 and cache.stats.bytes == 0


async def test_ttl_expires_after_write(
    make_cache: Callable[..., ParamCache[object]], clock: FakeClock
) -> None:
    cache = make_cache(ttl_s=10.0)
    version = 1

    async def load() -> int:
        return version

    assert await cache.get("k", load) == (1, Source.LOADED)
    version = 2
    clock.now += 9.99
    assert await cache.get("k", load) == (1, Source.HIT)
    clock.now += 0.01
    assert await cache.get("k", load) == (2, Source.LOADED)


async def test_per_call_ttl_and_jitter_bounds(
    make_cache: Callable[..., ParamCache[object]], clock: FakeClock
) -> None:
    cache = make_cache(ttl_s=100.0, jitter=0.5, capacity_bytes=10**6)
    await cache.get("short", lambda: asyncio.sleep(0, 1), ttl_s=2.0)
    clock.now += 2.0
    assert "short" not in cache
    for i in range(50):
        cache.put(i, i)
    clock.now += 49.99
    assert all(i in cache for i in range(50))  # jitter never shortens a TTL below half
    clock.now += 50.02
    assert not any(i in cache for i in range(50))


async def test_concurrent_misses_share_one_load(
    make_cache: Callable[..., ParamCache[object]],
) -> None:
    cache = make_cache()
    loads = 0
    gate = asyncio.Event()

    async def load() -> np.ndarray:
        nonlocal loads
        loads += 1
        await gate.wait()
        return blob(10)

    tasks = [asyncio.create_task(cache.get("k", load)) for _ in range(200)]
    await asyncio.sleep(0)
    gate.set()
    out = await asyncio.gather(*tasks)
    assert loads == 1
    assert {src for _, src in out} == {Source.LOADED}
    assert cache.stats.loads == 1 and cache.stats.misses == 200


async def test_failed_load_reaches_every_waiter_and_is_not_cached(
    make_cache: Callable[..., ParamCache[object]],
) -> None:
    cache = make_cache()
    gate = asyncio.Event()
    err = ParamsCorrupt("sha256 mismatch")

    async def bad() -> object:
        await gate.wait()
        raise err

    tasks = [asyncio.create_task(cache.get("k", bad)) for _ in range(10)]
    await asyncio.sleep(0)
    gate.set()
    out = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(o is err for o in out)
    assert cache.stats.load_errors == 1 and "k" not in cache


async def test_failures_back_off_then_retry(
    make_cache: Callable[..., ParamCache[object]], clock: FakeClock
) -> None:
    cache = make_cache(failure_backoff_s=(0.1, 0.4))
    calls = 0

    async def down() -> int:
        nonlocal calls
        calls += 1
        raise StoreUnavailable("redis down")

    for _ in range(100):  # a burst of lookups during the outage: one Redis call, not 100
        with pytest.raises(StoreUnavailable):
            await cache.get("k", down)
    assert calls == 1 and cache.stats.backed_off == 99
    clock.now += 0.1
    with pytest.raises(StoreUnavailable):
        await cache.get("k", down)
    assert calls == 2  # retried once the back-off passed; the next back-off is longer
    clock.now += 0.1
    with pytest.raises(StoreUnavailable):
        await cache.get("k", down)
    assert calls == 2
    clock.now += 0.1
    assert await cache.get("k", lambda: asyncio.sleep(0, 5)) == (5, Source.LOADED)
    clock.now += 11  # expired; a failure now serves the stale value during the back-off
    assert await cache.get("k", down) == (5, Source.STALE)
    assert await cache.get("k", down) == (5, Source.STALE)
    assert calls == 3


async def test_invalidate_ends_a_back_off(make_cache: Callable[..., ParamCache[object]]) -> None:
    cache = make_cache()

    async def missing() -> int:
        raise ParamsCorrupt("nope")

    with pytest.raises(ParamsCorrupt):
        await cache.get("k", missing)
    cache.invalidate("k")
    assert await cache.get("k", lambda: asyncio.sleep(0, 1)) == (1, Source.LOADED)


async def test_cancelled_waiter_does_not_fail_the_others(
    make_cache: Callable[..., ParamCache[object]],
) -> None:
    cache = make_cache()
    gate = asyncio.Event()

    async def load() -> int:
        await gate.wait()
        return 3

    first = asyncio.create_task(cache.get("k", load))
    rest = [asyncio.create_task(cache.get("k", load)) for _ in range(5)]
    await asyncio.sleep(0)
    first.cancel()
    gate.set()
    assert [await t for t in rest] == [(3, Source.LOADED)] * 5
    assert "k" in cache


async def test_expired_entry_is_served_stale_when_store_is_unreachable(
    make_cache: Callable[..., ParamCache[object]], clock: FakeClock
) -> None:
    cache = make_cache(ttl_s=5.0)
    await cache.get("k", lambda: asyncio.sleep(0, "old"))
    clock.now += 6

    async def down() -> str:
        raise StoreUnavailable("redis down")

    assert await cache.get("k", down) == ("old", Source.STALE)
    assert cache.stats.stale_served == 1
    with pytest.raises(StoreUnavailable):
        await cache.get("cold", down)


async def test_non_retryable_error_is_never_masked_by_stale(
    make_cache: Callable[..., ParamCache[object]], clock: FakeClock
) -> None:
    cache = make_cache(ttl_s=5.0)
    await cache.get("k", lambda: asyncio.sleep(0, "old"))
    clock.now += 6

    async def corrupt() -> str:
        raise ParamsCorrupt("bad bytes")

    with pytest.raises(ParamsCorrupt):
        await cache.get("k", corrupt)


async def test_invalidate_during_load_does_not_keep_the_old_value(
    make_cache: Callable[..., ParamCache[object]],
) -> None:
    cache = make_cache()
    gate = asyncio.Event()

    async def slow_old() -> str:
        await gate.wait()
        return "old"

    task = asyncio.create_task(cache.get("ptr", slow_old))
    await asyncio.sleep(0)
    cache.invalidate("ptr")
    gate.set()
    assert await task == ("old", Source.LOADED)
    assert "ptr" not in cache
    assert await cache.get("ptr", lambda: asyncio.sleep(0, "new")) == ("new", Source.LOADED)


async def test_invalidate_where_and_close_twice(
    make_cache: Callable[..., ParamCache[object]],
) -> None:
    async with make_cache() as cache:
        for key in [("t", "m", 1, "w"), ("t", "m", 2, "w"), ("t", "n", 1, "w")]:
            await cache.get(key, lambda: asyncio.sleep(0, blob(10)))
        dropped = cache.invalidate_where(lambda k: isinstance(k, tuple) and k[1] == "m")
        assert dropped == 2 and len(cache) == 1
        assert cache.stats.bytes == 10
    await cache.aclose()
    assert len(cache) == 0


async def test_refresh_ahead_reloads_hot_entries_in_the_background(
    make_cache: Callable[..., ParamCache[object]], clock: FakeClock
) -> None:
    cache = make_cache(ttl_s=10.0, refresh_ahead=0.2)
    version = 1

    async def load() -> int:
        return version

    await cache.get("k", load)
    version = 2
    clock.now += 7.9
    assert await cache.get("k", load) == (1, Source.HIT)
    assert cache.stats.refreshes == 0
    clock.now += 0.2  # inside the last 20% of the TTL: serve, and refresh behind
    assert await cache.get("k", load) == (1, Source.HIT)
    await asyncio.sleep(0.01)
    assert cache.stats.refreshes == 1 and cache.stats.loads == 2
    clock.now += 5  # past the first TTL: the refreshed entry is still fresh
    assert await cache.get("k", load) == (2, Source.HIT)


async def test_get_many_loads_all_misses_in_one_call(
    make_cache: Callable[..., ParamCache[object]],
) -> None:
    cache = make_cache()
    calls: list[list[object]] = []

    async def load_many(keys: list[object]) -> dict[object, int]:
        calls.append(list(keys))
        await asyncio.sleep(0.01)
        return {k: int(str(k)) * 10 for k in keys if k != "404"}

    def missing(key: object) -> Exception:
        return KeyError(key)

    await cache.get("1", lambda: asyncio.sleep(0, 10))
    values, src = await cache.get_many(["1", "2", "3", "2"], load_many, missing=missing)
    assert values == {"1": 10, "2": 20, "3": 30} and src is Source.LOADED
    assert calls == [["2", "3"]]
    values, src = await cache.get_many(["2", "3"], load_many, missing=missing)
    assert src is Source.HIT and len(calls) == 1
    with pytest.raises(KeyError):
        await cache.get_many(["404"], load_many, missing=missing)


async def test_get_many_joins_rows_already_in_flight(
    make_cache: Callable[..., ParamCache[object]],
) -> None:
    cache = make_cache()
    calls: list[list[object]] = []
    gate = asyncio.Event()

    async def load_many(keys: list[object]) -> dict[object, str]:
        calls.append(sorted(map(str, keys)))
        await gate.wait()
        return {k: f"v{k}" for k in keys}

    first = asyncio.create_task(cache.get_many(["a", "b"], load_many, missing=KeyError))
    await asyncio.sleep(0)
    second = asyncio.create_task(cache.get_many(["b", "c"], load_many, missing=KeyError))
    await asyncio.sleep(0)
    gate.set()
    assert (await first)[0] == {"a": "va", "b": "vb"}
    assert (await second)[0] == {"b": "vb", "c": "vc"}
    assert calls == [["a", "b"], ["c"]]
    assert cache.stats.loads == 3


async def test_get_many_serves_stale_rows_when_redis_is_down(
    make_cache: Callable[..., ParamCache[object]], clock: FakeClock
) -> None:
    cache = make_cache(ttl_s=5.0)

    async def ok(keys: list[object]) -> dict[object, str]:
        return {k: "old" for k in keys}

    async def down(keys: list[object]) -> dict[object, str]:
        raise StoreUnavailable("down")

    await cache.get_many(["r1"], ok, missing=KeyError)
    clock.now += 6
    assert await cache.get_many(["r1"], down, missing=KeyError) == ({"r1": "old"}, Source.STALE)
    with pytest.raises(StoreUnavailable):
        await cache.get_many(["r1", "cold"], down, missing=KeyError)
