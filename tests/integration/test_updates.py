"""Training updates against the real services: consistency, propagation, lost announcements,
a Redis outage."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import pytest

from consumers.trainer import Publish, TrainSettings, train
from pipeline.client import ResultStream
from pipeline.io.kv import open_kv
from pipeline.io.wire import Result
from pipeline.params.models import build_model, preset
from pipeline.params.store import ParamStore
from tests.integration.conftest import ON_BOTH_REDIS

pytestmark = pytest.mark.integration


async def load_version(settings: Any, model: str, version: int) -> dict[str, Any]:
    async with open_kv(settings.redis) as kv:
        _, params = await ParamStore(kv, prefix=settings.redis.key_prefix).load(model, version)
    return params


async def pump(client: Any, model: str, x: np.ndarray, rate: float, prefix: str) -> None:
    """Send one request per row at about ``rate`` per second."""
    interval = 1.0 / rate
    loop = asyncio.get_running_loop()
    start = loop.time()
    for i in range(len(x)):
        await client.submit(model, x[i : i + 1], id=f"{prefix}{i}", wait=False)
        delay = start + (i + 1) * interval - loop.time()
        if delay > 0:
            await client.flush()
            await asyncio.sleep(delay)
    await client.flush()


@ON_BOTH_REDIS
async def test_consistency_and_propagation_while_training(
    make_settings: Any, start_worker: Any, make_client: Any
) -> None:
    settings = make_settings()
    cfg = TrainSettings(
        model="live",
        preset="mlp",
        synthetic=True,
        publish_every_steps=10**9,
        publish_every_s=0.1,
        seed=3,
    )
    published: list[Publish] = []
    stop_training = asyncio.Event()
    first = asyncio.Event()

    def on_publish(pub: Publish) -> None:
        published.append(pub)
        first.set()

    trainer = asyncio.create_task(train(settings, cfg, stop_training, on_publish=on_publish))
    await asyncio.wait_for(first.wait(), 30)
    client = await make_client(settings)
    k = settings.kafka
    n = 5000
    x = np.random.default_rng(0).standard_normal((n, 32)).astype(np.float32)
    arrivals: dict[str, tuple[float, Result]] = {}
    async with ResultStream(k, k.results_topic, from_beginning=True) as stream:
        running = await start_worker(settings)

        async def read() -> None:
            while len(arrivals) < n:
                for r in await stream.next_batch(0.1):
                    arrivals.setdefault(r.id, (time.time(), r))

        reader = asyncio.create_task(read())
        await pump(client, "live", x, rate=1000, prefix="c")
        await asyncio.wait_for(reader, 60)
    stop_training.set()
    await asyncio.wait_for(trainer, 30)

    versions = sorted({r.version for _, r in arrivals.values()})
    assert all(r.ok for _, r in arrivals.values())
    assert len(versions) >= 10, f"results ran on only {versions}"
    listener = running.worker.listener
    assert listener is not None and listener.stats.applied >= len(versions) - 1
    model = preset("mlp")
    params = {v: await load_version(settings, "live", v) for v in versions}
    mismatched = 0
    for i in range(n):
        r = arrivals[f"c{i}"][1]
        expected = model.forward(params[r.version], x[i : i + 1])
        if not np.allclose(r.outputs, expected, rtol=1e-4, atol=1e-5):  # type: ignore[arg-type]
            mismatched += 1
    assert mismatched == 0

    # propagation: publish returned -> first result computed on that version (or a later one)
    by_arrival = sorted((t, r.version) for t, r in arrivals.values())
    during = [p for p in published if by_arrival[0][0] <= p.published_at <= by_arrival[-1][0]]
    delays = []
    for pub in during:
        seen = next((t for t, v in by_arrival if v >= pub.version and t >= pub.published_at), None)
        if seen is not None:
            delays.append((seen - pub.published_at) * 1000)
    assert len(delays) >= 30
    p50, p99 = np.percentile(delays, 50), np.percentile(delays, 99)
    print(
        f"\npropagation over {len(delays)} publishes under load: "
        f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, versions served {len(versions)}"
    )


@ON_BOTH_REDIS
async def test_lost_announcement_is_bounded_by_the_pointer_ttl(
    make_settings: Any, start_worker: Any, make_client: Any
) -> None:
    settings = make_settings(worker__listen_updates=False, cache__version_ttl_s=1.0)
    model = preset("mlp")
    async with open_kv(settings.redis) as kv:
        store = ParamStore(kv, prefix=settings.redis.key_prefix)
        await store.publish("m", model.arch, model.init(1))
        client = await make_client(settings)
        k = settings.kafka
        x = np.ones((1, 32), dtype=np.float32)
        async with ResultStream(k, k.results_topic, from_beginning=True) as stream:
            await start_worker(settings)

            async def ask(rid: str) -> Result:
                await client.submit("m", x, id=rid)
                while True:
                    for r in await stream.next_batch(0.1):
                        if r.id == rid:
                            return r

            assert (await ask("before")).version == 1
            await store.publish("m", model.arch, model.init(2))
            published = time.monotonic()
            soon = await ask("soon")  # no announcement is read: the cached pointer still rules
            assert soon.version == 1
            version = 1
            while version == 1:
                version = (await ask(f"poll{time.monotonic()}")).version or 0
            waited = time.monotonic() - published
    assert version == 2
    print(
        f"\nlost announcement: new version served {waited * 1000:.0f} ms after the publish "
        "(pointer TTL 1000 ms)"
    )


@pytest.mark.parametrize("backend", ["redis-py", "asyncio-redis"])
async def test_redis_outage_stale_then_recovery(
    redis_factory: Any, make_settings: Any, start_worker: Any, make_client: Any, backend: str
) -> None:
    server = await redis_factory(password="pw-outage")
    settings = make_settings(
        redis__url=server.url,
        redis__backend=backend,
        cache__version_ttl_s=0.5,
        redis__timeout_s=0.5,
    )
    model = preset("mlp")
    params = model.init(4)
    async with open_kv(settings.redis) as kv:
        store = ParamStore(kv, prefix=settings.redis.key_prefix)
        await store.publish("warm", model.arch, params)
        await store.publish("cold", model.arch, params)
    client = await make_client(settings)
    k = settings.kafka
    x = np.ones((1, 32), dtype=np.float32)
    async with ResultStream(k, k.results_topic, from_beginning=True) as stream:
        running = await start_worker(settings)

        async def ask(model_name: str, rid: str) -> Result:
            await client.submit(model_name, x, id=rid)
            while True:
                for r in await stream.next_batch(0.1):
                    if r.id == rid:
                        return r

        warm = await ask("warm", "w0")
        assert warm.ok and not warm.stale
        server.kill()
        await asyncio.sleep(0.6)  # past the pointer TTL: the next lookups must reach Redis
        during = [await ask("warm", f"w{i}") for i in range(1, 4)]
        cold = await ask("cold", "c1")
        assert all(r.ok and r.stale and r.cache == "stale" for r in during)
        np.testing.assert_allclose(during[-1].outputs, model.forward(params, x), rtol=1e-5)
        assert not cold.ok and cold.error_code == "params_unavailable"
        await server.start()  # same port, empty: publish again, as after a real data loss
        async with open_kv(settings.redis) as kv:
            store = ParamStore(kv, prefix=settings.redis.key_prefix)
            await store.publish("warm", model.arch, params)
            await store.publish("cold", model.arch, params)
        # A key that failed answers with its failure during its back-off (50 ms doubling, at
        # most 2 s), so the first request after the restart may still get it; 30 tries at
        # >= 0.1 s apart outlast the longest back-off.
        for attempt in range(30):
            recovered = await ask("cold", f"r{attempt}")
            if recovered.ok:
                break
            assert recovered.error_code == "params_unavailable"
            await asyncio.sleep(0.1)
        assert recovered.ok and not recovered.stale
        after = await ask("warm", "w-after")
        assert after.ok
        assert running.task.done() is False  # the same worker, never restarted


@ON_BOTH_REDIS
async def test_embedding_rows_single_round_trip_and_row_updates(
    make_settings: Any, start_worker: Any, make_client: Any
) -> None:
    settings = make_settings()
    arch = {"kind": "embedding", "users": 300, "items": 800, "dim": 8}
    scorer = build_model(arch)
    assert scorer.kind == "embedding"  # narrows the type: an EmbeddingModel has tables
    tables = scorer.init_tables(0)
    async with open_kv(settings.redis) as kv:
        store = ParamStore(kv, prefix=settings.redis.key_prefix)
        await store.publish("rec", arch, scorer.init(0), tables=tables)
    client = await make_client(settings)
    ids = np.random.default_rng(1).integers(0, 300, size=(400, 2))
    k = settings.kafka
    async with ResultStream(k, k.results_topic, from_beginning=True) as stream:
        running = await start_worker(settings)
        for i in range(400):
            await client.submit("rec", ids=ids[i : i + 1], id=f"e{i}", wait=False)
        await client.submit("rec", ids=[[0, 9999]], id="oob")
        await client.flush()
        got: dict[str, Result] = {}
        while len(got) < 401:
            for r in await stream.next_batch(0.2):
                got[r.id] = r
    expected = scorer.forward(
        {
            "user": tables["user"][ids[:, 0]],
            "item": tables["item"][ids[:, 1]],
            "bias": np.zeros(1, np.float32),
        },
        ids,
    )
    for i in range(400):
        assert got[f"e{i}"].ok
        np.testing.assert_allclose(got[f"e{i}"].outputs[0], expected[i], rtol=1e-5)  # type: ignore[index]
    assert got["oob"].error_code == "bad_ids"
    stats = running.worker.registry.cache.stats
    distinct = len(set(ids[:, 0])) + len(set(ids[:, 1]))
    assert stats.loads == distinct + 2  # every row once, plus the pointer (+manifest), bias
