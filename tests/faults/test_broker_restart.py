"""The broker stops for 5 s and comes back on the same port: the worker neither crashes nor
stays stuck. Tansu's in-memory storage loses every topic, message and committed offset in a
restart (Apache Kafka keeps them), so this checks recovery, not the messages of before."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from pipeline.client import InferenceClient
from pipeline.errors import KvpipeError
from pipeline.io.kafka import ensure_topics


async def test_broker_restart_on_the_same_port(fault_stack: Any) -> None:
    fleet = await fault_stack()
    settings = fleet.settings
    model, params = await fleet.publish_mlp("m", seed=8)
    proc = await fleet.start("w")
    x = np.ones((1, 32), dtype=np.float32)
    async with InferenceClient(settings.kafka) as client:
        before = await client.infer("m", x, timeout=60)
    assert before.ok
    broker = fleet.broker
    await broker.stop()
    await asyncio.sleep(5)
    await broker.start()  # same port, empty
    k = settings.kafka
    await ensure_topics(k, [k.requests_topic, k.results_topic, k.dlq_topic, k.updates_topic])
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 90
    after = None
    async with InferenceClient(settings.kafka) as client:
        while loop.time() < deadline:
            assert proc.returncode is None, "the worker died"
            try:
                after = await client.infer("m", x, timeout=5)
                break
            except KvpipeError:  # no answer yet (timeout) or the broker not reachable yet
                continue
        recovery_s = loop.time() - (deadline - 90)
    assert after is not None and after.ok, "the worker stayed stuck after the broker came back"
    np.testing.assert_allclose(after.outputs, model.forward(params, x), rtol=1e-4, atol=1e-5)  # type: ignore[arg-type]
    print(f"\nbroker restart: answered again {recovery_s:.1f} s after the broker came back")
