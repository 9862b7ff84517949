"""The worker against the real local Redis and broker."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import numpy as np
import pytest
import redis.asyncio as redis_py

from pipeline.client import ResultStream
from pipeline.io.kafka import Consumer, Partition
from pipeline.io.kv import open_kv
from pipeline.io.wire import H_DLQ_REASON, NPY, encode_request
from pipeline.params.models import build_model, preset
from pipeline.params.store import ParamStore
from tests.integration.conftest import collect

pytestmark = pytest.mark.integration


async def publish(settings: Any, name: str, preset_name: str = "mlp", seed: int = 0) -> Any:
    model = preset(preset_name)
    params = model.init(seed)
    async with open_kv(settings.redis) as kv:
        manifest = await ParamStore(kv, prefix=settings.redis.key_prefix).publish(
            name, model.arch, params
        )
    return model, params, manifest


async def read_all(settings: Any, topic: str, want: int, timeout: float = 30.0) -> list[Any]:
    stream_messages: list[Any] = []
    consumer = Consumer(settings.kafka, [topic], group_id=None, assign_from="start")
    async with consumer:
        import asyncio

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(stream_messages) < want and loop.time() < deadline:
            stream_messages += await consumer.getmany(timeout_ms=200, max_records=1000)
    return stream_messages


async def test_thousand_requests_with_malformed_mixed_in(
    make_settings: Any, start_worker: Any, make_client: Any
) -> None:
    settings = make_settings()
    model, params, manifest = await publish(settings, "m")
    client = await make_client(settings)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1000, model.input_dim)).astype(np.float32)
    k = settings.kafka
    async with ResultStream(k, k.results_topic, from_beginning=True) as stream:
        await start_worker(settings)
        bad_results = {
            "unknown_model": encode_request(id="bad-model", model="ghost", inputs=x[:1]),
            "bad_shape": encode_request(id="bad-shape", model="m", inputs=np.ones((1, 3))),
            "non_finite": (b'{"id":"bad-nan","model":"m","inputs":[[NaN]]}', []),
            "bad_dtype": (b'{"id":"bad-dtype","model":"m","inputs":[["a"]]}', []),
            "unknown_version": encode_request(
                id="bad-version", model="m", inputs=x[:1], version=99
            ),
        }
        dead = [b"\xff\x00garbage", b"{not json", b'{"model":"m","inputs":[[1]]}', b"[]"]
        for i in range(1000):
            if i % 100 == 50:
                await client.submit_raw(dead[(i // 100) % len(dead)], key=b"junk")
            if i % 200 == 7:
                code = list(bad_results)[(i // 200) % len(bad_results)]
                value, headers = bad_results[code]
                await client.submit_raw(value, key=code.encode(), headers=headers)
            await client.submit(
                "m", x[i : i + 1], id=f"r{i}", content_type=NPY if i % 3 == 0 else None, wait=False
            )
        await client.flush()
        want = {f"r{i}" for i in range(1000)} | {
            "bad-model",
            "bad-shape",
            "bad-nan",
            "bad-dtype",
            "bad-version",
        }
        got = await collect(stream, want)
    expected = model.forward(params, x)
    ok = 0
    for i in range(1000):
        res = got[f"r{i}"][0]
        assert res.ok, res.error_message
        assert res.version == manifest.version
        assert res.cache in ("hit", "loaded") and not res.stale
        assert set(res.timings) == {"queue_ms", "load_ms", "compute_ms", "total_ms"}
        np.testing.assert_allclose(res.outputs[0], expected[i], rtol=1e-4, atol=1e-5)
        ok += 1
    assert ok == 1000
    codes = {rid: got[rid][0].error_code for rid in want if rid.startswith("bad-")}
    assert codes == {
        "bad-model": "unknown_model",
        "bad-shape": "bad_shape",
        "bad-nan": "non_finite",
        "bad-dtype": "bad_dtype",
        "bad-version": "unknown_version",
    }
    dlq = await read_all(settings, k.dlq_topic, want=10)
    assert len(dlq) == 10
    reasons = Counter(dict(m.headers)[H_DLQ_REASON].decode().split(":")[0] for m in dlq)
    assert reasons == {"unreadable": 8, "missing_id": 2}
    assert {m.value for m in dlq} <= set(dead)


async def test_offsets_committed_after_everything_is_answered(
    make_settings: Any, start_worker: Any, make_client: Any
) -> None:
    settings = make_settings()
    await publish(settings, "m")
    client = await make_client(settings)
    k = settings.kafka
    for i in range(200):
        await client.submit("m", np.zeros((1, 32)), id=f"c{i}", wait=False)
    await client.submit_raw(b"junk", key=b"j")
    async with ResultStream(k, k.results_topic, from_beginning=True) as stream:
        running = await start_worker(settings)
        await collect(stream, {f"c{i}" for i in range(200)})
    stats = await running.stop()
    assert stats.ok == 200 and stats.dead_lettered == 1
    probe = Consumer(k, [k.requests_topic], group_id=k.group_id)
    async with probe:
        total = 0
        for p in range(k.partitions):
            total += await probe.committed(Partition(k.requests_topic, p)) or 0
    assert total == 201  # every message of every partition is committed, nothing more


async def test_cold_burst_reads_each_tensor_once_from_redis(
    redis_factory: Any, make_settings: Any, start_worker: Any, make_client: Any
) -> None:
    server = await redis_factory()
    settings = make_settings(redis__url=server.url)
    model, _params, _ = await publish(settings, "article", "article")
    raw = redis_py.Redis.from_url(server.url)
    try:
        await raw.config_resetstat()
        client = await make_client(settings)
        x = np.random.default_rng(0).standard_normal((200, model.input_dim)).astype(np.float32)
        for i in range(200):
            await client.submit("article", x[i : i + 1], id=f"b{i}", wait=False)
        await client.flush()
        k = settings.kafka
        async with ResultStream(k, k.results_topic, from_beginning=True) as stream:
            await start_worker(settings)
            got = await collect(stream, {f"b{i}" for i in range(200)})
        assert len(got) == 200 and all(r[0].ok for r in got.values())
        stats = await raw.info("commandstats")
    finally:
        await raw.aclose()
    reads = {
        name: int(v["calls"])
        for name, v in stats.items()
        if name.removeprefix("cmdstat_") in ("get", "mget", "hget", "hmget", "hgetall")
    }
    # the version pointer, the manifest and four tensors: six GETs for 200 requests
    assert reads == {"cmdstat_get": 6}, json.dumps(stats)


async def test_a_head_only_update_reads_only_the_head_from_redis(
    redis_factory: Any, make_settings: Any, start_worker: Any, make_client: Any
) -> None:
    import asyncio

    from pipeline.io.kafka import Producer
    from pipeline.params.updates import Announcement, announce

    server = await redis_factory()
    # the pointer is read once at start: afterwards only the announcement moves it
    settings = make_settings(redis__url=server.url, cache__version_ttl_s=600.0)
    arch = {"kind": "mlp", "layers": [32, 64, 64, 8], "activation": "relu", "softmax": False}
    model = build_model(arch)
    p1 = model.init(0)
    p2 = {**p1, "b2": p1["b2"] + np.float32(0.5)}  # fine-tune only the last layer's bias
    assert len(p1) == 6
    x = np.random.default_rng(1).standard_normal((50, 32)).astype(np.float32)
    raw = redis_py.Redis.from_url(server.url)
    try:
        async with open_kv(settings.redis) as kv:
            store = ParamStore(kv, prefix=settings.redis.key_prefix)
            await store.publish("head", arch, p1)
            client = await make_client(settings)
            k = settings.kafka
            async with ResultStream(k, k.results_topic, from_beginning=True) as stream:
                await start_worker(settings)
                for i in range(50):
                    await client.submit("head", x[i : i + 1], id=f"a{i}", wait=False)
                await client.flush()
                before = await collect(stream, {f"a{i}" for i in range(50)})
                assert {r[0].version for r in before.values()} == {1}
                await store.publish("head", arch, p2)
                await raw.config_resetstat()
                async with Producer(k) as producer:
                    version, attempt = 1, 0
                    while version == 1 and attempt < 100:  # the listener may start after a send
                        attempt += 1
                        await announce(producer, k, Announcement("head", "dense", 2))
                        await client.submit("head", x[:1], id=f"p{attempt}")
                        version = (await collect(stream, {f"p{attempt}"}))[f"p{attempt}"][0].version
                        await asyncio.sleep(0.05 if version == 1 else 0)
                assert version == 2
                for i in range(50):
                    await client.submit("head", x[i : i + 1], id=f"b{i}", wait=False)
                await client.flush()
                after = await collect(stream, {f"b{i}" for i in range(50)})
        stats = await raw.info("commandstats")
    finally:
        await raw.aclose()
    assert all(r[0].ok and r[0].version == 2 for r in after.values())
    expected = model.forward(p2, x)
    for i in range(50):
        np.testing.assert_allclose(after[f"b{i}"][0].outputs[0], expected[i], rtol=1e-4, atol=1e-5)  # type: ignore[index]
    reads = {
        name: int(v["calls"])
        for name, v in stats.items()
        if name.removeprefix("cmdstat_") in ("get", "mget", "hget", "hmget", "hgetall")
    }
    # v2's manifest and its one changed tensor of six; the other five are v1's cached arrays
    assert reads == {"cmdstat_get": 2}, json.dumps(stats)


@pytest.mark.parametrize(("max_wait_ms", "most_batches"), [(300.0, 4), (0.0, None)])
async def test_max_wait_gathers_a_trickle_into_batches(
    make_settings: Any,
    start_worker: Any,
    make_client: Any,
    max_wait_ms: float,
    most_batches: int | None,
) -> None:
    import asyncio

    settings = make_settings(worker__max_wait_ms=max_wait_ms)
    model, params, _ = await publish(settings, "m")
    client = await make_client(settings)
    k = settings.kafka
    x = np.random.default_rng(9).standard_normal((40, 32)).astype(np.float32)
    async with ResultStream(k, k.results_topic, from_beginning=True) as stream:
        running = await start_worker(settings)
        for i in range(40):  # a trickle: one request every 5 ms, each fetched on its own
            await client.submit("m", x[i : i + 1], id=f"t{i}")
            await asyncio.sleep(0.005)
        got = await collect(stream, {f"t{i}" for i in range(40)})
    expected = model.forward(params, x)
    for i in range(40):
        np.testing.assert_allclose(
            got[f"t{i}"][0].outputs[0],
            expected[i],
            rtol=1e-4,  # type: ignore[index]
            atol=1e-5,
        )
    stats = running.worker.stats
    batches = stats.batches
    if most_batches is not None:
        assert batches <= most_batches, batches
        # the cold model was prefetched while the first batch filled: no batch waited on Redis
        assert stats.batches_waited_on_load == 0
    else:
        assert batches >= 6, batches  # without waiting, a trickle runs in many small batches
        assert stats.batches_waited_on_load >= 1  # the first batch loaded the cold model


async def test_a_bug_in_a_batch_still_answers_and_commits(
    make_settings: Any, make_client: Any
) -> None:
    import asyncio
    from unittest import mock

    import consumers.inference
    from consumers.inference import start_serving
    from pipeline.params.registry import ModelRegistry

    class Buggy(ModelRegistry):
        async def resolve(self, name: str, version: int | None = None) -> Any:
            if name == "boom":
                raise RuntimeError("a bug")
            return await super().resolve(name, version)

    settings = make_settings()
    await publish(settings, "m")
    client = await make_client(settings)
    stop = asyncio.Event()
    with mock.patch.object(consumers.inference, "ModelRegistry", Buggy):  # built before ready
        worker, task = await start_serving(settings, stop)
    try:
        k = settings.kafka
        async with ResultStream(k, k.results_topic, from_beginning=True) as stream:
            await client.submit("boom", np.zeros((1, 32)), id="bug")
            await client.submit("m", np.zeros((1, 32)), id="fine")
            got = await collect(stream, {"bug", "fine"})
    finally:
        stop.set()
        stats = await asyncio.wait_for(task, 30)
    assert got["bug"][0].error_code == "internal" and "a bug" in (got["bug"][0].error_message or "")
    assert got["fine"][0].ok
    assert stats.received == 2 and worker.in_flight == 0  # both answered, so both committable
