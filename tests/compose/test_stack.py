"""What a user does with the stack: publish, ask, see a new version served, send junk."""

from __future__ import annotations

import asyncio
import uuid

import numpy as np

from pipeline.client import InferenceClient
from pipeline.io.kv import open_kv
from pipeline.io.wire import Result
from pipeline.params.models import preset
from pipeline.params.store import ParamStore
from tests.compose.conftest import Stack


def model_name() -> str:
    return f"ct-{uuid.uuid4().hex[:8]}"


async def publish(stack: Stack, name: str, seed: int) -> int:
    model = preset("mlp")
    async with open_kv(stack.settings.redis) as kv:
        store = ParamStore(kv, prefix=stack.settings.redis.key_prefix)
        return (await store.publish(name, model.arch, model.init(seed))).version


async def test_requests_get_correct_results(stack: Stack) -> None:
    name = model_name()
    await publish(stack, name, seed=1)
    model = preset("mlp")
    x = np.random.default_rng(0).standard_normal((50, 32)).astype(np.float32)
    async with InferenceClient(stack.settings.kafka) as client:
        results = await asyncio.gather(
            *(client.infer(name, x[i : i + 1], timeout=60) for i in range(50))
        )
    expected = model.forward(model.init(1), x)
    for i, r in enumerate(results):
        assert r.ok, r.error_message
        np.testing.assert_allclose(r.outputs[0], expected[i], rtol=1e-4, atol=1e-5)  # type: ignore[index]


async def test_a_new_version_is_served(stack: Stack) -> None:
    name = model_name()
    await publish(stack, name, seed=1)
    async with InferenceClient(stack.settings.kafka) as client:
        first = await client.infer(name, np.ones((1, 32)), timeout=60)
        assert first.version == 1
        await publish(stack, name, seed=2)  # nobody announces it: the pointer TTL brings it
        latest: Result = first
        for _ in range(100):
            latest = await client.infer(name, np.ones((1, 32)), timeout=60)
            if latest.version == 2:
                break
            await asyncio.sleep(0.2)
    assert latest.version == 2 and latest.ok


async def test_bad_messages_are_answered_and_do_not_stop_the_worker(stack: Stack) -> None:
    name = model_name()
    await publish(stack, name, seed=1)
    async with InferenceClient(stack.settings.kafka) as client:
        wrong_shape = await client.infer(name, np.ones((1, 5)), timeout=60)
        unknown = await client.infer(model_name(), np.ones((1, 32)), timeout=60)
        await client.submit_raw(b"\x00 not a request", key=b"junk")
        after = await client.infer(name, np.ones((1, 32)), timeout=60)
    assert wrong_shape.error_code == "bad_shape"
    assert unknown.error_code == "unknown_model"
    assert after.ok
