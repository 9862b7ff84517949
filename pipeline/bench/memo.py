"""The ``memo`` suite: the result cache on and off, 30% of requests repeating an earlier input."""

from __future__ import annotations

import numpy as np

from pipeline.bench.figures import Comparison, Emit
from pipeline.bench.harness import ABSides, compare_settings
from pipeline.config import Settings
from pipeline.io.wire import NPY

MEMO_GOAL = 1.0


async def bench_memo(
    base: Settings, tag: str, requests: int, rounds: int, emit: Emit, wire: str = NPY
) -> Comparison:
    """The result cache on a workload where 30% of requests repeat an earlier input."""
    rng = np.random.default_rng(4)
    unique = rng.standard_normal((requests, 1000)).astype(np.float32)
    repeat = rng.random(requests) < 0.3
    source = np.where(repeat, rng.integers(0, np.arange(requests) + 1), np.arange(requests))
    inputs = unique[source]  # row i repeats an earlier row for about 30% of the requests
    share = round(float(np.mean(source != np.arange(requests))), 3)
    sides: ABSides = (
        ("memo", "result cache on", {"cache.result_models": ("*",)}),
        ("plain", "result cache off", {}),
    )
    return await compare_settings(
        "memo",
        inputs,
        sides,
        MEMO_GOAL,
        base=base,
        tag=tag,
        rounds=rounds,
        emit=emit,
        detail={"repeat_share": share},
        wire=wire,
    )
