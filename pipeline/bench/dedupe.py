"""``kvpipe bench dedupe``: what answering once costs: the worker with ``KVPIPE_DEDUPE_TTL``
against the same worker without, on the backlog benchmark's small MLP.

Both sides run the real worker on the same backlog (JSON requests by default), alternating
(on, off / off, on, ...). The dedupe side also reports its record round trips: how many ids
each recorded and how long each took, which is how long an acknowledged answer stays
unrecorded (the window in which a crash still repeats it).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.bench.figures import Comparison, Emit, RunFigures, Side, verify_results
from pipeline.bench.harness import Step, compare, prepare_side, serve_backlog, worker_detail
from pipeline.config import Settings
from pipeline.io.wire import JSON
from pipeline.params.models import preset

#: The dedupe side's throughput over the side without it (at most 10% slower).
DEDUPE_GOAL = 0.9
DEDUPE_TTL_S = 600.0


async def bench_dedupe(
    base: Settings, tag: str, requests: int, rounds: int, emit: Emit, wire: str = JSON
) -> Comparison:
    """The worker with dedupe on against off, same backlog, same model."""
    model = preset("mlp")
    params = model.init(0)
    rng = np.random.default_rng(9)
    inputs = rng.standard_normal((requests, model.input_dim)).astype(np.float32)
    expected = model.forward(params, inputs)

    async def side(run: RunFigures, settings: Settings) -> None:
        manifest = await prepare_side(settings, model, params)
        ids, arrivals, worker, stats = await serve_backlog(
            run, settings, inputs, 60.0 + requests / 100, wire
        )
        verify_results(run, arrivals, ids, expected, manifest.version)
        worker_detail(run, worker, stats)
        if worker.dedupe is not None:
            run.detail["dedupe"] = worker.dedupe.stats.as_dict()

    cmp = Comparison(
        "dedupe",
        Side("dedupe", "on", f"dedupe on ({DEDUPE_TTL_S:g} s)", "req/s", requests),
        Side("dedupe", "off", "dedupe off", "req/s", requests),
        DEDUPE_GOAL,
    )
    steps: dict[str, tuple[Step, dict[str, Any]]] = {
        "on": (side, {"worker.dedupe_ttl_s": DEDUPE_TTL_S}),
        "off": (side, {}),
    }
    await compare(cmp, steps, base=base, tag=tag, rounds=rounds, emit=emit)
    window = [r.detail["dedupe"] for r in cmp.first.runs if "dedupe" in r.detail]
    if window:
        mean = sum(w["record_ms_mean"] for w in window) / len(window)
        worst = max(w["record_ms_max"] for w in window)
        ids = sum(w["ids_per_record"] for w in window) / len(window)
        emit(
            f"dedupe  window: an answer is acknowledged and not yet recorded for one round trip, "
            f"mean {mean:.3f} ms, max {worst:.3f} ms, {ids:.1f} ids per record"
        )
    return cmp
