"""The ``batching`` suite: micro-batches against batch size 1 (article's model, small MLP)."""

from __future__ import annotations

import numpy as np

from pipeline.bench.figures import Comparison, Emit
from pipeline.bench.harness import ABSides, compare_settings
from pipeline.config import Settings
from pipeline.io.wire import NPY
from pipeline.params.models import preset

BATCHING_GOAL = 2.5


async def bench_batching(
    base: Settings, tag: str, requests: int, rounds: int, emit: Emit, wire: str = NPY
) -> Comparison:
    """Saturated throughput on the article's model: micro-batches against batch size 1."""
    inputs = np.random.default_rng(3).standard_normal((requests, 1000)).astype(np.float32)
    sides: ABSides = (
        ("batched", "micro-batches", {}),
        ("single", "batch size 1", {"worker.max_batch_size": 1}),
    )
    emit("batching the article's model (two 1000x1000 heads)")
    return await compare_settings(
        "batching", inputs, sides, BATCHING_GOAL,
        base=base, tag=tag, rounds=rounds, emit=emit, wire=wire,
    )  # fmt: skip


async def bench_batching_mlp(
    base: Settings, tag: str, requests: int, rounds: int, emit: Emit, wire: str = NPY
) -> Comparison:
    """The same comparison on the small MLP (32-64-8), where Kafka work dominates compute."""
    model = preset("mlp")
    inputs = np.random.default_rng(7).standard_normal((requests, model.input_dim))
    sides: ABSides = (
        ("batched", "micro-batches", {}),
        ("single", "batch size 1", {"worker.max_batch_size": 1}),
    )
    emit("batching the small MLP (32-64-8)")
    return await compare_settings(
        "batching", inputs.astype(np.float32), sides, BATCHING_GOAL,
        base=base, tag=f"{tag}-mlp", rounds=rounds, emit=emit, model=model, wire=wire,
    )  # fmt: skip
