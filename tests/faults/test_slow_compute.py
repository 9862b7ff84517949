"""Compute longer than the session timeout: no rebalance, because compute runs off the loop."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np

from pipeline.client import InferenceClient
from pipeline.params.models import Model
from pipeline.params.registry import ModelRegistry
from pipeline.params.store import Manifest
from tests.integration.conftest import collect

DELAY_S = 3.0  # the fault stack's session timeout is 2 s


class SlowModel:
    """A model whose every batch takes ``DELAY_S`` longer, in the compute thread."""

    def __init__(self, inner: Model) -> None:
        self._inner = inner
        self.arch, self.kind, self.tables = inner.arch, inner.kind, inner.tables
        self.input_dim, self.output_dim = inner.input_dim, inner.output_dim
        self.tensor_specs, self.init = inner.tensor_specs, inner.init

    def forward(self, params: Any, x: Any) -> Any:
        time.sleep(DELAY_S)
        return self._inner.forward(params, x)


class SlowRegistry(ModelRegistry):
    def _model_for(self, manifest: Manifest) -> Model:
        return SlowModel(super()._model_for(manifest))  # type: ignore[return-value]


async def test_compute_longer_than_the_session_timeout_causes_no_rebalance(
    fault_stack: Any,
) -> None:
    fleet = await fault_stack()
    assert fleet.settings.kafka.session_timeout_ms / 1000 < DELAY_S
    model, params = await fleet.publish_mlp("m", seed=6)
    # A second member: the broker expires a silent member when others keep the group going.
    await fleet.start("other")
    await asyncio.sleep(3.0)
    worker = await fleet.serve_here(
        "w", registry=SlowRegistry, values={"worker.max_batch_size": 10}
    )
    n = 120
    x = np.random.default_rng(6).standard_normal((n, 32)).astype(np.float32)
    async with (
        InferenceClient(fleet.settings.kafka) as client,
        client.stream(from_beginning=True) as stream,
    ):
        for i in range(n):
            await client.submit("m", x[i : i + 1], id=f"s{i}", wait=False)
        await client.flush()
        got = await collect(stream, {f"s{i}" for i in range(n)}, timeout=60)
    expected = model.forward(params, x)
    assert set(got) == {f"s{i}" for i in range(n)}
    for i in range(n):
        r = got[f"s{i}"][0]
        assert r.ok, r.error_message
        if r.worker == "w":
            assert r.timings["compute_ms"] >= DELAY_S * 1000
        np.testing.assert_allclose(r.outputs[0], expected[i], rtol=1e-4, atol=1e-5)  # type: ignore[index]
    dups = sum(len(v) - 1 for v in got.values())
    assert dups == 0
    slow = sum(r[0].worker == "w" for r in got.values())
    assert slow >= 20, "the slow worker answered too little of the load to show anything"
    assert worker.stats.rebalances == 0, "the group rebalanced: a heartbeat was missed"
    assert worker.stats.commit_failures == 0
    print(
        f"\nslow compute: {n} requests, {slow} by the slow worker in {worker.stats.batches} "
        f"batches of {DELAY_S:.0f} s+ each (session timeout 2 s): all answered, 0 duplicates, "
        "0 rebalances, 0 failed commits"
    )
