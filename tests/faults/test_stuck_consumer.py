"""A consumer that stops fetching while messages wait (aiokafka#1154): the watchdog replaces it."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from pipeline.client import InferenceClient
from tests.integration.conftest import collect


async def test_watchdog_restarts_a_consumer_that_stopped_fetching(fault_stack: Any) -> None:
    fleet = await fault_stack(KVPIPE_WATCHDOG_S="2")
    model, params = await fleet.publish_mlp("m", seed=4)
    worker = await fleet.serve_here("w")
    x = np.random.default_rng(4).standard_normal((400, 32)).astype(np.float32)
    expected = model.forward(params, x)
    loop = asyncio.get_running_loop()
    async with (
        InferenceClient(fleet.settings.kafka) as client,
        client.stream(from_beginning=True) as stream,
    ):
        for i in range(200):
            await client.submit("m", x[i : i + 1], id=f"a{i}", wait=False)
        await client.flush()
        got = await collect(stream, {f"a{i}" for i in range(200)}, timeout=30)
        assert len(got) == 200
        await asyncio.sleep(3.0)  # idle and caught up for longer than the watchdog: not stuck
        assert worker.stats.consumer_restarts == 0

        # The failure of aiokafka#1154, made on purpose: partitions assigned, nothing fetched.
        inner = worker.consumer._consumer
        inner.pause(*inner.assignment())
        for i in range(200, 400):
            await client.submit("m", x[i : i + 1], id=f"a{i}", wait=False)
        await client.flush()
        sent_at = loop.time()
        rest = await collect(stream, {f"a{i}" for i in range(200, 400)}, timeout=30)
        recovered_s = loop.time() - sent_at
    got.update(rest)
    assert set(got) == {f"a{i}" for i in range(400)}
    for i in range(400):
        r = got[f"a{i}"][0]
        assert r.ok, r.error_message
        np.testing.assert_allclose(r.outputs[0], expected[i], rtol=1e-4, atol=1e-5)  # type: ignore[index]
    assert worker.stats.consumer_restarts == 1
    dups = sum(len(v) - 1 for v in got.values())
    print(
        f"\nstuck consumer: 400 requests, 400 answered, {dups} duplicates; the watchdog replaced "
        f"the consumer and the last 200 were answered {recovered_s:.1f} s after they were sent"
    )
