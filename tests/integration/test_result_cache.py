"""The result cache: repeated inputs are answered from memory, never across versions."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
import redis.asyncio as redis_py
from redis.asyncio.cluster import RedisCluster

from pipeline.client import InferenceClient
from pipeline.io.kv import open_kv
from pipeline.params.models import preset
from pipeline.params.store import ParamStore
from tests.integration.conftest import ON_BOTH_REDIS

pytestmark = pytest.mark.integration


@ON_BOTH_REDIS
async def test_repeats_are_memoized_per_version(
    make_settings: Any, start_worker: Any, make_client: Any
) -> None:
    settings = make_settings(cache__result_models=("m",), cache__version_ttl_s=0.3)
    model = preset("mlp")
    p1, p2 = model.init(1), model.init(2)
    async with open_kv(settings.redis) as kv:
        store = ParamStore(kv, prefix=settings.redis.key_prefix)
        await store.publish("m", model.arch, p1)
        await make_client(settings)
        running = await start_worker(settings)
        x = np.random.default_rng(4).standard_normal((70, 32)).astype(np.float32)
        async with InferenceClient(settings.kafka) as client:
            first = await asyncio.gather(*(client.infer("m", x[i : i + 1]) for i in range(70)))
            repeats = await asyncio.gather(*(client.infer("m", x[i : i + 1]) for i in range(30)))
            await store.publish("m", model.arch, p2)
            await asyncio.sleep(0.4)  # the pointer TTL: v2 is served from now on
            after = await asyncio.gather(*(client.infer("m", x[i : i + 1]) for i in range(30)))
    assert {r.cache for r in first} <= {"hit", "loaded"}
    assert all(r.cache == "memo" and r.version == 1 for r in repeats)
    for i, r in enumerate(repeats):
        np.testing.assert_allclose(r.outputs, model.forward(p1, x[i : i + 1]), rtol=1e-4, atol=1e-5)  # type: ignore[arg-type]
    assert all(r.version == 2 and r.cache != "memo" for r in after)
    for i, r in enumerate(after):
        np.testing.assert_allclose(r.outputs, model.forward(p2, x[i : i + 1]), rtol=1e-4, atol=1e-5)  # type: ignore[arg-type]
    stats = running.worker.stats
    assert stats.memo_hits == 30 and stats.memo_misses == 100


async def four_inputs_at_once(
    settings: Any, make_client: Any, start_worker: Any, *, seed: int, sends: int
) -> tuple[Any, list[Any]]:
    """Serve the mlp and send 4 distinct inputs round-robin ``sends`` times, all at once;
    every output is checked. Returns the worker's stats and the results."""
    model = preset("mlp")
    params = model.init(seed)
    async with open_kv(settings.redis) as kv:
        await ParamStore(kv, prefix=settings.redis.key_prefix).publish("m", model.arch, params)
    await make_client(settings)
    running = await start_worker(settings)
    unique = np.random.default_rng(seed).standard_normal((4, 32)).astype(np.float32)
    order = [i % 4 for i in range(sends)]
    async with InferenceClient(settings.kafka) as client:
        results = await asyncio.gather(*(client.infer("m", unique[j : j + 1]) for j in order))
    for j, r in zip(order, results, strict=True):
        np.testing.assert_allclose(
            r.outputs, model.forward(params, unique[j : j + 1]), rtol=1e-4, atol=1e-5
        )  # type: ignore[arg-type]
    return running.worker.stats, results


@ON_BOTH_REDIS
async def test_repeats_within_one_batch_are_computed_once(
    make_settings: Any, start_worker: Any, make_client: Any
) -> None:
    settings = make_settings(cache__result_models=("*",), worker__max_wait_ms=500.0)
    stats, results = await four_inputs_at_once(
        settings, make_client, start_worker, seed=3, sends=40
    )  # one batch: the wait gathers them all
    assert stats.batched_rows == 4, "a repeated input was computed more than once"
    assert stats.memo_hits == 36 and stats.memo_misses == 4
    assert sum(r.cache == "memo" for r in results) == 36


@ON_BOTH_REDIS
async def test_concurrent_batches_share_the_compute_of_one_input(
    make_settings: Any, start_worker: Any, make_client: Any
) -> None:
    # Batches of 4 that all wait on the same cold load, then split at once: whichever batch
    # takes an input first computes it, the others wait for its output instead of recomputing.
    settings = make_settings(cache__result_models=("*",), worker__max_batch_size=4)
    stats, _ = await four_inputs_at_once(settings, make_client, start_worker, seed=4, sends=60)
    assert stats.batched_rows == 4, "an input was computed by more than one batch"
    assert stats.memo_hits == 56 and stats.memo_misses == 4


def raw_redis(url: str) -> Any:
    """A plain redis-py client on ``url`` (a cluster client for a cluster URL)."""
    if url.startswith("redis+cluster://"):
        host, port = url.removeprefix("redis+cluster://").split(",")[0].rsplit(":", 1)
        return RedisCluster(host=host, port=int(port))
    return redis_py.from_url(url)


@ON_BOTH_REDIS
async def test_outputs_are_shared_through_redis_with_a_ttl(
    make_settings: Any, start_worker: Any, make_client: Any
) -> None:
    a = make_settings(cache__result_models=("*",), cache__result_shared_ttl_s=60.0)
    b = make_settings(  # another fleet member: its own memory, the same Redis keys
        cache__result_models=("*",),
        cache__result_shared_ttl_s=60.0,
        redis__key_prefix=a.redis.key_prefix,
    )
    model = preset("mlp")
    params = model.init(5)
    async with open_kv(a.redis) as kv:
        await ParamStore(kv, prefix=a.redis.key_prefix).publish("m", model.arch, params)
    x = np.random.default_rng(7).standard_normal((10, 32)).astype(np.float32)
    expected = model.forward(params, x)
    await make_client(a)
    await start_worker(a)
    async with InferenceClient(a.kafka) as client:
        first = await asyncio.gather(*(client.infer("m", x[i : i + 1]) for i in range(10)))
    assert all(r.cache != "memo" for r in first)
    pattern = f"{a.redis.key_prefix}:m:v1:out:*"
    r = raw_redis(a.redis.url)
    try:
        keys: list[bytes] = []
        for _ in range(100):  # written in the background after the answers
            if isinstance(r, RedisCluster):
                keys = await r.keys(pattern, target_nodes=RedisCluster.PRIMARIES)
            else:
                keys = await r.keys(pattern)
            if len(keys) == 10:
                break
            await asyncio.sleep(0.05)
        assert len(keys) == 10
        assert 0 < await r.ttl(keys[0]) <= 60
        await r.set(keys[1], b"\x93NUMPY not really")  # a damaged copy is never served
    finally:
        await r.aclose()
    await make_client(b)
    running = await start_worker(b)
    async with InferenceClient(b.kafka) as client:
        again = await asyncio.gather(*(client.infer("m", x[i : i + 1]) for i in range(10)))
    for i, res in enumerate(again):
        np.testing.assert_allclose(res.outputs, expected[i : i + 1], rtol=1e-4, atol=1e-5)  # type: ignore[arg-type]
    stats = running.worker.stats
    assert stats.memo_shared_hits == 9 and stats.batched_rows == 1
    assert sum(res.cache == "memo" for res in again) == 9
