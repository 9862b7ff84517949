"""The ``echo`` suite: the worker against a bare consume -> produce echo on the same backlog."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np

from pipeline.bench.echo import echo_loop, echo_topic
from pipeline.bench.figures import Backlog, Comparison, Emit, RunFigures, Side, request_backlog
from pipeline.bench.harness import (
    Arrivals,
    Step,
    compare,
    finish,
    produce_backlog,
    run_worker_side,
    wait_event,
)
from pipeline.config import Settings
from pipeline.errors import KvpipeError
from pipeline.io.kafka import ensure_topics
from pipeline.io.wire import NPY
from pipeline.params.models import preset

ECHO_GOAL = 0.5


async def run_echo_side(
    fig: RunFigures, settings: Settings, backlog: Backlog, timeout_s: float
) -> None:
    """Produce the backlog, start the echo, time it to the last echoed message, check bytes."""
    k = settings.kafka
    sink = echo_topic(k)
    await ensure_topics(k, [k.requests_topic, sink])
    fig.backlog_s = await produce_backlog(k, k.requests_topic, backlog)
    stop = asyncio.Event()
    assigned = asyncio.Event()
    async with Arrivals(k, sink) as arrivals:
        echo = asyncio.create_task(echo_loop(k, k.requests_topic, sink, stop, assigned))
        try:
            await wait_event(assigned, echo, 60.0)
            started = time.perf_counter()
            complete = await arrivals.collect(len(backlog), timeout_s, echo)
            fig.seconds = arrivals.last_at - started
            if not complete:
                fig.failure = (
                    f"{len(arrivals.first)} of {len(backlog)} messages within {timeout_s:g} s"
                    if not echo.done()
                    else "the echo stopped early"
                )
        finally:
            stop.set()
            try:
                fig.detail["commits"] = await finish(echo, 30.0)
            except KvpipeError as exc:
                fig.failure = fig.failure or str(exc)
            except Exception as exc:
                fig.failure = fig.failure or f"the echo failed: {type(exc).__name__}: {exc}"
    for key, value, _ in backlog:
        msg = arrivals.first.get(key)
        if msg is None:
            fig.missing += 1
        elif msg.value != value:
            fig.wrong += 1
        else:
            fig.ok += 1
    fig.duplicates = arrivals.duplicates


async def bench_echo(
    base: Settings, tag: str, requests: int, rounds: int, emit: Emit, wire: str = NPY
) -> Comparison:
    """The real worker on the small MLP against a bare consume -> produce echo."""
    model = preset("mlp")
    params = model.init(0)
    rng = np.random.default_rng(2)
    inputs = rng.standard_normal((requests, model.input_dim)).astype(np.float32)
    _, backlog = request_backlog(inputs, wire)

    async def echo(run: RunFigures, settings: Settings) -> None:
        run.detail["message_bytes"] = len(backlog[0][1])
        await run_echo_side(run, settings, backlog, timeout_s=60.0 + requests / 100)

    async def worker(run: RunFigures, settings: Settings) -> None:
        await run_worker_side(
            run, settings, model, params, inputs,
            timeout_s=60.0 + requests / 100, wire=wire,
        )  # fmt: skip

    cmp = Comparison(
        "echo",
        Side("echo", "worker", "worker (mlp)", "msg/s", requests),
        Side("echo", "echo", "bare aiokafka echo", "msg/s", requests),
        ECHO_GOAL,
    )
    steps: dict[str, tuple[Step, dict[str, Any]]] = {"echo": (echo, {}), "worker": (worker, {})}
    return await compare(cmp, steps, base=base, tag=tag, rounds=rounds, emit=emit)
