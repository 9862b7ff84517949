"""SIGKILL workers mid-stream: nothing is lost; duplicates come only from killed workers.

Run at least once (the default) and with dedupe (``KVPIPE_DEDUPE_TTL``): each prints its
duplicates per kill (``pytest -s tests/faults/test_kill.py`` shows both lines). With dedupe a
kill can only repeat the answers acknowledged in the one Redis round trip before their ids
were recorded.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import numpy as np
import pytest

from pipeline.client import InferenceClient
from pipeline.io.wire import Result

MAX_IN_FLIGHT = 256
KILLS = 3
MIN_REQUESTS, MAX_REQUESTS = 6000, 30000


@pytest.mark.parametrize("dedupe", [False, True], ids=["at-least-once", "dedupe"])
async def test_kill_and_restart_one_of_two_workers_three_times(
    fault_stack: Any, dedupe: bool
) -> None:
    env = {"KVPIPE_MAX_IN_FLIGHT": str(MAX_IN_FLIGHT)}
    if dedupe:
        env["KVPIPE_DEDUPE_TTL"] = "600"
    fleet = await fault_stack(**env)
    settings = fleet.settings
    model, params = await fleet.publish_mlp("m", seed=7)
    await fleet.start("steady")
    await fleet.start("victim-0")
    # about 1,000 requests per second, for at least 6 s and until the last kill is done (a
    # victim must have requests left to answer), at most MAX_REQUESTS
    x = np.random.default_rng(1).standard_normal((MAX_REQUESTS, 32)).astype(np.float32)
    got: dict[str, list[Result]] = {}
    killed: list[str] = []
    kills_done = asyncio.Event()
    sent = 0
    async with (
        InferenceClient(settings.kafka) as client,
        client.stream(from_beginning=True) as stream,
    ):

        async def read() -> None:
            while not producer.done() or len(got) < sent:
                for r in await stream.next_batch(0.2):
                    got.setdefault(r.id, []).append(r)

        async def produce() -> None:
            nonlocal sent
            while sent < MAX_REQUESTS and (sent < MIN_REQUESTS or not kills_done.is_set()):
                await client.submit("m", x[sent : sent + 1], id=f"k{sent}", wait=False)
                sent += 1
                if sent % 50 == 0:
                    await client.flush()
                    await asyncio.sleep(0.05)
            await client.flush()

        producer = asyncio.create_task(produce())
        reader = asyncio.create_task(read())
        loop = asyncio.get_running_loop()
        for round_ in range(KILLS):
            victim = f"victim-{round_}"
            deadline = loop.time() + 30
            while not any(r.worker == victim for rs in got.values() for r in rs):
                assert loop.time() < deadline, f"{victim} never answered anything"
                await asyncio.sleep(0.05)
            fleet.kill(victim)  # mid-stream, while it owns partitions and answers
            killed.append(victim)
            await fleet.start(f"victim-{round_ + 1}")
        kills_done.set()
        await producer
        await asyncio.wait_for(reader, 120)
    n = sent
    expected = model.forward(params, x[:n])
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
    total = sum(duplicates.values())
    if dedupe:  # a kill repeats at most what its worker held in flight (by construction far
        # fewer: the answers of the one record round trip it was killed in)
        assert total <= KILLS * MAX_IN_FLIGHT, total
    print(
        f"\nSIGKILL x{KILLS} ({'dedupe on' if dedupe else 'at-least-once'}): {n} requests, "
        f"{len(got)} answered, {total} duplicate results ({total / KILLS:.0f} per kill), "
        f"first answers by worker {dict(by_worker)}; duplicates by (first, second) answerer "
        f"{dict(Counter(tuple(r.worker for r in got[rid][:2]) for rid in duplicates))}"
    )
