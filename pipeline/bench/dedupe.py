"""``kvpipe bench dedupe``: what answering once costs: the worker with ``KVPIPE_DEDUPE_TTL``
against the same worker without, on the backlog benchmark's small MLP.

Two comparisons, each with both sides in one run (alternating: on, off / off, on, ...):

- ``dedupe``: the steady state. A worker looks up only requests another worker may have
  answered (produced before its latest assignment, plus a clock slack); the dedupe side is
  told its assignment was an hour ago, so it records every answer and looks nothing up, as a
  worker does once a minute has passed since the last rebalance.
- ``dedupe-rebalance``: the backlog right after a rebalance or a restart: every request is
  looked up (one ``HMGET`` pair per fetched batch) and recorded.

The dedupe sides also report their record round trips: how many ids each recorded and how
long each took, which is how long an acknowledged answer stays unrecorded (the window in which
a crash still repeats it).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np

from consumers.inference import start_serving
from pipeline.bench.figures import Comparison, Emit, RunFigures, Side, verify_results
from pipeline.bench.harness import (
    Start,
    Step,
    compare,
    prepare_side,
    serve_backlog,
    worker_detail,
)
from pipeline.config import Settings
from pipeline.io.wire import JSON
from pipeline.params.models import preset
from pipeline.serving.worker import Worker, WorkerStats

#: The dedupe side's throughput over the side without it (at most 10% slower).
DEDUPE_GOAL = 0.9
DEDUPE_TTL_S = 600.0
#: How long ago the steady side's worker is told its partitions were assigned.
STEADY_AGO_S = 3600.0


async def start_steady(
    settings: Settings, stop: asyncio.Event
) -> tuple[Worker, asyncio.Task[WorkerStats]]:
    """A worker whose dedupe believes it was assigned its partitions an hour ago: nothing it
    fetches may have been answered elsewhere, so it only records (the steady state)."""
    worker, task = await start_serving(settings, stop)
    if worker.dedupe is not None:
        worker.dedupe.clock = lambda: time.time() - STEADY_AGO_S
        worker.dedupe.assigned(worker.consumer.assignment())
    return worker, task


async def bench_dedupe(
    base: Settings, tag: str, requests: int, rounds: int, emit: Emit, wire: str = JSON
) -> dict[str, Comparison]:
    """The worker with dedupe on against off: in the steady state, and right after a
    rebalance (every request looked up)."""
    model = preset("mlp")
    params = model.init(0)
    rng = np.random.default_rng(9)
    inputs = rng.standard_normal((requests, model.input_dim)).astype(np.float32)
    expected = model.forward(params, inputs)

    def side(start: Start) -> Step:
        async def step(run: RunFigures, settings: Settings) -> None:
            manifest = await prepare_side(settings, model, params)
            cpu = time.process_time()
            ids, arrivals, worker, stats = await serve_backlog(
                run, settings, inputs, 60.0 + requests / 100, wire, start
            )
            # this process's CPU (worker, backlog producer, answer reader: the same on both
            # sides but the worker), steadier than a rate on a machine others share
            run.detail["cpu_us_per_request"] = round(
                (time.process_time() - cpu) / requests * 1e6, 2
            )
            verify_results(run, arrivals, ids, expected, manifest.version)
            worker_detail(run, worker, stats)
            if worker.dedupe is not None:
                run.detail["dedupe"] = worker.dedupe.stats.as_dict()

        return step

    out: dict[str, Comparison] = {}
    for key, label, start in (
        ("dedupe", "steady", start_steady),
        ("dedupe-rebalance", "after a rebalance", start_serving),
    ):
        cmp = Comparison(
            key,
            Side(key, "on", f"on, {label}", "req/s", requests),
            Side(key, "off", "dedupe off", "req/s", requests),
            DEDUPE_GOAL,
        )
        steps: dict[str, tuple[Step, dict[str, Any]]] = {
            "on": (side(start), {"worker.dedupe_ttl_s": DEDUPE_TTL_S}),
            "off": (side(start_serving), {}),
        }
        out[key] = await compare(cmp, steps, base=base, tag=tag, rounds=rounds, emit=emit)
        cpu_on, cpu_off = (_mean_cpu(s.runs) for s in (cmp.first, cmp.second))
        if cpu_on and cpu_off:
            emit(
                f"{key:<7} CPU of this process per request: on {cpu_on:.1f} us, off "
                f"{cpu_off:.1f} us ({(cpu_on / cpu_off - 1) * 100:+.1f}%)"
            )
        window = [r.detail["dedupe"] for r in cmp.first.runs if "dedupe" in r.detail]
        if window:
            mean = sum(w["record_ms_mean"] for w in window) / len(window)
            worst = max(w["record_ms_max"] for w in window)
            ids = sum(w["ids_per_record"] for w in window) / len(window)
            looked = sum(w["lookups"] for w in window) / len(window)
            emit(
                f"{key:<7} window: an answer is acknowledged and not yet recorded for one "
                f"round trip, mean {mean:.3f} ms, max {worst:.3f} ms; {ids:.1f} ids per record; "
                f"{looked:.0f} ids looked up per run"
            )
    return out


def _mean_cpu(runs: list[RunFigures]) -> float | None:
    values = [r.detail["cpu_us_per_request"] for r in runs if "cpu_us_per_request" in r.detail]
    return sum(values) / len(values) if values else None
