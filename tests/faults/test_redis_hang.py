"""Redis hung (SIGSTOP) for 5 s under load: answers keep coming, stale, none lost."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import numpy as np
import pytest

from pipeline.client import InferenceClient
from pipeline.io.wire import Result


@pytest.mark.parametrize("backend", ["redis-py", "asyncio-redis"])
async def test_redis_paused_for_five_seconds(fault_stack: Any, backend: str) -> None:
    fleet = await fault_stack(
        KVPIPE_VERSION_TTL="0.5", KVPIPE_REDIS_TIMEOUT="0.5", KVPIPE_REDIS_BACKEND=backend
    )
    settings = fleet.settings
    model, params = await fleet.publish_mlp("m", seed=3)
    await fleet.start("w")
    n = 3000
    x = np.random.default_rng(2).standard_normal((n, 32)).astype(np.float32)
    got: dict[str, Result] = {}
    loop = asyncio.get_running_loop()
    arrived: list[tuple[float, str]] = []
    warm = asyncio.Event()
    async with (
        InferenceClient(settings.kafka) as client,
        client.stream(from_beginning=True) as stream,
    ):

        async def read() -> None:
            while len(got) < n:
                for r in await stream.next_batch(0.1):
                    if r.id not in got:
                        got[r.id] = r
                        arrived.append((loop.time(), r.id))
                if len(got) >= 500:
                    warm.set()

        reader = asyncio.create_task(read())
        paused_at = resumed_at = 0.0
        for i in range(n):
            await client.submit("m", x[i : i + 1], id=f"h{i}", wait=False)
            if i % 50 == 49:
                await client.flush()
                await asyncio.sleep(0.05)  # ~1,000 requests/s for 3 s, then the pause
            if i == 1000:
                await asyncio.wait_for(warm.wait(), 60)  # the model is warm in the cache
                fleet.redis.pause()
                paused_at = loop.time()
        await client.flush()
        await asyncio.sleep(max(0.0, paused_at + 5.0 - loop.time()))
        fleet.redis.resume()
        resumed_at = loop.time()
        await asyncio.wait_for(reader, 60)
    during = [rid for t, rid in arrived if paused_at + 1.0 < t < resumed_at]
    codes = Counter(r.cache if r.ok else r.error_code for r in got.values())
    expected = model.forward(params, x)
    for i in range(n):
        r = got[f"h{i}"]
        assert r.ok, r.error_message  # warm model: every answer is served, stale or not
        np.testing.assert_allclose(r.outputs[0], expected[i], rtol=1e-4, atol=1e-5)  # type: ignore[index]
    assert during, "no answers while Redis was paused"
    assert all(got[rid].stale for rid in during)
    print(
        f"\nRedis paused 5 s ({backend}): {n} requests all answered; {len(during)} answered "
        f"during the pause, all stale; by source {dict(codes)}"
    )
