"""A third worker joins under load: a clean rebalance loses nothing and duplicates nothing."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import numpy as np

from pipeline.client import InferenceClient
from pipeline.io.wire import Result


async def test_a_third_worker_joins_under_load(fault_stack: Any) -> None:
    fleet = await fault_stack(KVPIPE_MAX_IN_FLIGHT="256")
    settings = fleet.settings
    model, params = await fleet.publish_mlp("m", seed=5)
    await fleet.start("a")
    await fleet.start("b")
    n = 5000
    x = np.random.default_rng(6).standard_normal((n, 32)).astype(np.float32)
    got: dict[str, list[Result]] = {}
    answered_by: set[str] = set()
    joined = asyncio.Event()
    async with (
        InferenceClient(settings.kafka) as client,
        client.stream(from_beginning=True) as stream,
    ):

        async def read() -> None:
            while len(got) < n:
                for r in await stream.next_batch(0.2):
                    got.setdefault(r.id, []).append(r)
                    answered_by.add(r.worker)
                if {"a", "b"} <= answered_by:
                    joined.set()

        reader = asyncio.create_task(read())
        producing = asyncio.create_task(_produce(client, x))
        await asyncio.wait_for(joined.wait(), 60)  # both serve; now a third joins mid-stream
        await fleet.start("c")
        await producing
        await asyncio.wait_for(reader, 120)
    expected = model.forward(params, x)
    for i in range(n):
        first = got[f"j{i}"][0]
        assert first.ok, first.error_message
        np.testing.assert_allclose(first.outputs[0], expected[i], rtol=1e-4, atol=1e-5)  # type: ignore[index]
    duplicates = sum(len(rs) - 1 for rs in got.values())
    by_worker = Counter(rs[0].worker for rs in got.values())
    print(
        f"\njoin under load: {n} requests, {len(got)} answered, {duplicates} duplicates, "
        f"first answers by worker {dict(by_worker)}"
    )
    assert by_worker["c"] > 0, "the third worker never got a partition"
    assert duplicates == 0


async def _produce(client: InferenceClient, x: np.ndarray) -> None:
    for i in range(len(x)):
        await client.submit("m", x[i : i + 1], id=f"j{i}", wait=False)
        if i % 50 == 49:
            await client.flush()
            await asyncio.sleep(0.05)
    await client.flush()
