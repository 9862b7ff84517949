"""SIGKILL workers mid-stream: nothing is lost; duplicates come only from killed workers."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import numpy as np

from pipeline.client import InferenceClient
from pipeline.io.wire import Result


async def test_kill_and_restart_one_of_two_workers_three_times(fault_stack: Any) -> None:
    fleet = await fault_stack(KVPIPE_MAX_IN_FLIGHT="256")
    settings = fleet.settings
    model, params = await fleet.publish_mlp("m", seed=7)
    await fleet.start("steady")
    await fleet.start("victim-0")
    n = 6000
    x = np.random.default_rng(1).standard_normal((n, 32)).astype(np.float32)
    got: dict[str, list[Result]] = {}
    killed: list[str] = []
    async with (
        InferenceClient(settings.kafka) as client,
        client.stream(from_beginning=True) as stream,
    ):

        async def read() -> None:
            while len(got) < n:
                for r in await stream.next_batch(0.2):
                    got.setdefault(r.id, []).append(r)

        async def produce() -> None:
            for i in range(n):
                await client.submit("m", x[i : i + 1], id=f"k{i}", wait=False)
                if i % 50 == 49:
                    await client.flush()
                    await asyncio.sleep(0.05)  # about 1,000 requests per second, for 6 s
            await client.flush()

        reader = asyncio.create_task(read())
        producer = asyncio.create_task(produce())
        loop = asyncio.get_running_loop()
        for round_ in range(3):
            victim = f"victim-{round_}"
            deadline = loop.time() + 30
            while not any(r.worker == victim for rs in got.values() for r in rs):
                assert loop.time() < deadline, f"{victim} never answered anything"
                await asyncio.sleep(0.05)
            fleet.kill(victim)  # mid-stream, while it owns partitions and answers
            killed.append(victim)
            await fleet.start(f"victim-{round_ + 1}")
        await producer
        await asyncio.wait_for(reader, 120)
    expected = model.forward(params, x)
    duplicates = Counter({rid: len(rs) - 1 for rid, rs in got.items() if len(rs) > 1})
    for i in range(n):
        first = got[f"k{i}"][0]
        assert first.ok, first.error_message
        np.testing.assert_allclose(first.outputs[0], expected[i], rtol=1e-4, atol=1e-5)  # type: ignore[index]
    # a duplicate means a message was answered and then redelivered: only a killed worker
    # can have answered without committing
    for rid in duplicates:
        assert any(r.worker in killed for r in got[rid]), [r.worker for r in got[rid]]
    by_worker = Counter(rs[0].worker for rs in got.values())
    answered_by = Counter(r.worker for rs in got.values() for r in rs)
    # every victim was killed while answering (its answers may all be redeliveries)
    assert by_worker["steady"] > 0 and all(answered_by[v] > 0 for v in killed)
    print(
        f"\nSIGKILL x3: {n} requests, {len(got)} answered, "
        f"{sum(duplicates.values())} duplicate results, first answers by worker "
        f"{dict(by_worker)}"
    )
