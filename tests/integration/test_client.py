"""InferenceClient against a running worker: request-reply at scale, streams, pinning."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from pipeline.client import InferenceClient, ResultTimeout
from pipeline.io.kv import open_kv
from pipeline.params.models import preset
from pipeline.params.store import ParamStore

pytestmark = pytest.mark.integration


async def test_thousand_concurrent_infer_calls(
    make_settings: Any, start_worker: Any, make_client: Any
) -> None:
    settings = make_settings()
    model = preset("mlp")
    params = model.init(2)
    async with open_kv(settings.redis) as kv:
        await ParamStore(kv, prefix=settings.redis.key_prefix).publish("m", model.arch, params)
    await make_client(settings)  # creates the topics
    await start_worker(settings)
    x = np.random.default_rng(3).standard_normal((1000, 32)).astype(np.float32)
    async with InferenceClient(settings.kafka) as client:
        results = await asyncio.gather(
            *(client.infer("m", x[i : i + 1], timeout=60) for i in range(1000))
        )
    expected = model.forward(params, x)
    assert len({r.id for r in results}) == 1000
    for i, r in enumerate(results):
        assert r.ok and r.version == 1
        np.testing.assert_allclose(r.outputs[0], expected[i], rtol=1e-4, atol=1e-5)  # type: ignore[index]


async def test_infer_pins_versions_and_times_out_cleanly(
    make_settings: Any, start_worker: Any, make_client: Any
) -> None:
    settings = make_settings()
    model = preset("mlp")
    async with open_kv(settings.redis) as kv:
        store = ParamStore(kv, prefix=settings.redis.key_prefix)
        await store.publish("m", model.arch, model.init(1))
        await store.publish("m", model.arch, model.init(2))
    await make_client(settings)
    await start_worker(settings)
    async with InferenceClient(settings.kafka) as client:
        old = await client.infer("m", np.ones((1, 32)), version=1, timeout=30)
        new = await client.infer("m", np.ones((1, 32)), timeout=30)
        assert (old.version, new.version) == (1, 2)
        np.testing.assert_allclose(
            old.outputs,
            model.forward(
                model.init(1),
                np.ones(
                    (1, 32),  # type: ignore[arg-type]
                    dtype=np.float32,
                ),
            ),
            rtol=1e-5,
        )
        unknown = await client.infer("ghost", np.ones((1, 32)), timeout=30)
        assert unknown.error_code == "unknown_model"
    other = make_settings()  # no worker listens on these topics
    await make_client(other)
    async with InferenceClient(other.kafka) as lonely:
        with pytest.raises(ResultTimeout):
            await lonely.infer("m", np.ones((1, 32)), timeout=0.5)
