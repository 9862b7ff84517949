"""Soak: 200,000 requests through one worker whose cache is smaller than the working set."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import numpy as np

from consumers.inference import start_serving
from pipeline.client import InferenceClient
from pipeline.io.kv import open_kv
from pipeline.params.models import preset
from pipeline.params.store import ParamStore

MODELS = 6
RSS_GROWTH_BOUND = 64 * 1024 * 1024


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_soak_two_hundred_thousand_requests(fault_stack: Any) -> None:
    fleet = await fault_stack()
    model = preset("mlp")
    params = {f"m{i}": model.init(i) for i in range(MODELS)}
    one_version = sum(a.nbytes for a in params["m0"].values())
    budget = one_version * MODELS // 2  # half the working set: constant eviction
    from pipeline.config import with_values

    settings = with_values(fleet.settings, {"cache.capacity_bytes": budget})
    async with open_kv(settings.redis) as kv:
        store = ParamStore(kv, prefix=settings.redis.key_prefix)
        for name, p in params.items():
            await store.publish(name, model.arch, p)
    n = 200_000
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1000, 32)).astype(np.float32)  # reused rows; ids stay unique
    expected = {name: model.forward(p, x) for name, p in params.items()}
    stop = asyncio.Event()
    worker, task = await start_serving(settings, stop)
    checked = wrong = 0
    seen: set[str] = set()
    tasks_before = fds_before = rss_warm = 0
    try:
        async with (
            InferenceClient(settings.kafka) as client,
            client.stream(from_beginning=True) as stream,
        ):
            progress = asyncio.Event()

            async def progressed(reader: asyncio.Task[None]) -> None:
                progress.clear()
                await asyncio.wait(
                    {asyncio.create_task(progress.wait()), reader},
                    timeout=1.0,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if reader.done():
                    reader.result()

            async def read() -> None:
                nonlocal checked, wrong
                while len(seen) < n:
                    batch = await stream.next_batch(0.2)
                    progress.set()
                    for r in batch:
                        if r.id in seen:
                            continue
                        seen.add(r.id)
                        i = int(r.id[1:])
                        name = f"m{i % MODELS}"
                        ok = r.ok and np.allclose(
                            r.outputs[0],
                            expected[name][i % 1000],  # type: ignore[index]
                            rtol=1e-4,
                            atol=1e-5,
                        )
                        wrong += not ok
                        checked += 1
                        assert worker.registry.cache.stats.bytes <= budget

            reader = asyncio.create_task(read())
            for i in range(n):
                await client.submit(
                    f"m{i % MODELS}", x[i % 1000 : i % 1000 + 1], id=f"s{i}", wait=False
                )
                if i % 1000 == 999:
                    await client.flush()
                    if i == 19_999:  # warm-up done: the baseline for leaks and growth
                        while len(seen) < 20_000:
                            await progressed(reader)
                        rss_warm = rss_bytes()
                        tasks_before = len(asyncio.all_tasks())
                        fds_before = open_fds()
                    while i - len(seen) > 20_000:  # keep about 20,000 in flight
                        await progressed(reader)
            await client.flush()
            await asyncio.wait_for(reader, 300)
            tasks_after = len(asyncio.all_tasks())
            fds_after = open_fds()
            rss_end = rss_bytes()
    finally:
        stop.set()
        stats = await asyncio.wait_for(task, 60)
    cache = worker.registry.cache.stats
    print(
        f"\nsoak: {n} requests, {checked} checked, {wrong} wrong; cache budget {budget} B, "
        f"peak-check held, evictions {cache.evictions}, loads {cache.loads}; RSS growth "
        f"after warm-up {(rss_end - rss_warm) / 1e6:.1f} MB; tasks {tasks_before}->"
        f"{tasks_after}; fds {fds_before}->{fds_after}; worker ok {stats.ok}"
    )
    assert checked == n and wrong == 0
    assert cache.evictions > 0
    assert rss_end - rss_warm < RSS_GROWTH_BOUND
    assert tasks_after <= tasks_before + 2
    assert fds_after <= fds_before + 2
