"""The ``tracing`` bench: what trace propagation costs per message, three sides in one run.

Every message carries a ``traceparent`` and ``tracestate``. Each side runs the worker's own
per-message path in this process (no broker, no Redis, so the figures are the CPU cost the
tracing adds, not the network's noise): :func:`~pipeline.serving.intake.read_item` on a
consumed message, the ``consume`` hook, micro-batches of 64 through the small MLP with their
:class:`~pipeline.serving.tracing.BatchTrace`, the result encoded with its trace headers, and
the ``sent`` hook. The sides:

- ``off``: ``KVPIPE_TRACING=0``;
- ``api``: tracing on with opentelemetry-api alone (no SDK configured: the default);
- ``sdk``: the OpenTelemetry SDK with an in-memory exporter (every span recorded);
- ``sdk-unsampled``: the SDK with its sampler off (what most requests cost when a deployment
  samples a fraction of traces).

Rounds alternate the sides so drift on a shared machine falls on all three alike; each side's
figure is its best round (least disturbed), the median beside it. A second part runs a real
worker on local Redis and Tansu draining the same traced backlog per side (off, api, sdk).
``kvpipe bench tracing`` runs both; ``python -m pipeline.bench.tracing [--messages N]
[--rounds R] [--e2e N]`` the first, and the second with ``--e2e``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from opentelemetry import trace

from consumers.inference import start_serving
from pipeline.bench.figures import MODEL, Backlog
from pipeline.bench.harness import (
    Arrivals,
    drop_topics,
    finish,
    prepare_side,
    produce_backlog,
    side_settings,
)
from pipeline.config import Settings, TracingSettings
from pipeline.io.kafka import Message, Partition
from pipeline.io.wire import Result, Status, encode_request, encode_result
from pipeline.params.models import preset
from pipeline.serving.intake import read_item
from pipeline.serving.item import Item
from pipeline.serving.tracing import Tracing

BATCH = 64
PARENT = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _messages(n: int, width: int) -> list[Message]:
    rng = np.random.default_rng(0)
    part = Partition("kvpipe.requests", 0)
    out = []
    for i in range(n):
        body = {"id": f"r{i}", "model": "m", "inputs": rng.standard_normal((1, width)).round(4)}
        value = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
        headers = [
            ("content-type", b"application/json"),
            ("traceparent", PARENT),
            ("tracestate", b"vendor=abc"),
        ]
        out.append(Message(part, i, f"r{i}".encode(), value, headers, 0))
    return out


def _side(tracing: Tracing, messages: list[Message], settings: Settings) -> float:
    """Seconds for the worker's per-message path over ``messages`` with ``tracing``."""
    model = preset("mlp")
    params = model.init(0)
    started = time.perf_counter()
    for start in range(0, len(messages), BATCH):
        fetched_ns = time.time_ns()
        items = [read_item(m, settings, 0.0) for m in messages[start : start + BATCH]]
        tracing.consumed(items, fetched_ns)
        batch = tracing.batch("m")
        batch.loaded()
        assert all(it.request.inputs is not None for it in items)
        x = np.concatenate([it.request.inputs for it in items])
        y = model.forward(params, x)
        batch.computed()
        answers: list[tuple[Item, Result]] = [
            (
                it,
                Result(
                    id=it.request.id, model="m", status=Status.OK, version=1, outputs=y[j : j + 1]
                ),
            )
            for j, it in enumerate(items)
        ]
        batch.end(answers)
        for it, result in answers:
            _, headers = encode_result(result, it.request.content_type)
            span = tracing.result_headers(it, "kvpipe.results", result, headers)
            tracing.sent(it, span)
    return time.perf_counter() - started


def _hooks(tracing: Tracing, batches: list[list[tuple[Item, Result]]]) -> float:
    """Seconds for the tracing hooks alone over prepared batches (no decode, compute, encode)."""
    started = time.perf_counter()
    for answers in batches:
        fetched_ns = time.time_ns()
        tracing.consumed([it for it, _ in answers], fetched_ns)
        batch = tracing.batch("m")
        batch.loaded()
        batch.computed()
        batch.end(answers)
        for it, result in answers:
            span = tracing.result_headers(it, "kvpipe.results", result, [])
            tracing.sent(it, span)
    return time.perf_counter() - started


def bench_tracing(
    messages: int, rounds: int, emit: Callable[[str], None] = print
) -> dict[str, Any]:
    """The three sides, ``rounds`` alternating rounds each; per-message microseconds."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        raise RuntimeError("a global tracer provider is set; the api side needs none")
    settings = Settings()
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    sides = {
        "off": Tracing(TracingSettings(enabled=False)),
        "api": Tracing(TracingSettings()),
        "sdk": Tracing(TracingSettings(), provider),
        "sdk-unsampled": Tracing(TracingSettings(), TracerProvider(sampler=ALWAYS_OFF)),
    }
    msgs = _messages(messages, preset("mlp").input_dim)
    for tracing in sides.values():  # warm-up: imports, caches
        _side(tracing, msgs[: BATCH * 2], settings)
    items = [read_item(m, settings, 0.0) for m in msgs]
    out = np.zeros((1, 4), np.float32)
    prepared = [
        [(it, Result(id=it.request.id, model="m", status=Status.OK, version=1, outputs=out))
         for it in items[start : start + BATCH]]
        for start in range(0, len(items), BATCH)
    ]  # fmt: skip
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    hooks: dict[str, list[float]] = {name: [] for name in sides}
    spans = 0
    for _ in range(rounds):
        for name, tracing in sides.items():
            exporter.clear()
            seconds[name].append(_side(tracing, msgs, settings))
            if name == "sdk":
                spans = len(exporter.get_finished_spans())
            exporter.clear()
            hooks[name].append(_hooks(tracing, prepared))
    us = {name: min(s) / messages * 1e6 for name, s in seconds.items()}
    median = {name: statistics.median(s) / messages * 1e6 for name, s in seconds.items()}
    hook_us = {name: min(s) / messages * 1e6 for name, s in hooks.items()}
    emit(
        f"tracing: {messages} messages x {rounds} rounds, the worker's per-message path in "
        f"process (decode, consume hook, batches of {BATCH} through the small MLP, encode with "
        "trace headers, sent hook); best round (median in brackets), and the hooks alone"
    )
    for name, label in (
        ("off", "KVPIPE_TRACING=0"),
        ("api", "opentelemetry-api only (no SDK)"),
        ("sdk", "SDK, in-memory exporter"),
        ("sdk-unsampled", "SDK, sampler off"),
    ):
        extra = us[name] - us["off"]
        emit(
            f"  {name:>13} {label:<32} {us[name]:8.2f} us/message [{median[name]:.2f}]  "
            f"({extra:+.2f} us, {extra / us['off']:+.1%} against off); hooks alone "
            f"{hook_us[name]:.2f} us/message"
        )
    emit(
        f"  sdk side recorded {spans / messages:.0f} spans per message (consume, batch, load, "
        "compute, produce)"
    )
    return {
        "messages": messages,
        "rounds": rounds,
        "us_per_message": us,
        "median_us_per_message": median,
        "hooks_us_per_message": hook_us,
        "sdk_spans": spans,
    }


async def _e2e_side(settings: Settings, tracing: Tracing, backlog: Backlog) -> float:
    """Seconds a real worker takes to answer ``backlog`` (produced before it starts)."""
    model = preset("mlp")
    await prepare_side(settings, model, model.init(0))
    k = settings.kafka
    await produce_backlog(k, k.requests_topic, backlog)
    stop = asyncio.Event()
    try:
        async with Arrivals(k, k.results_topic) as arrivals:
            _, serving = await start_serving(settings, stop, timeout_s=60, tracing=tracing)
            try:
                started = time.perf_counter()
                if not await arrivals.collect(len(backlog), 120.0, serving):
                    raise RuntimeError(f"{len(arrivals.first)} of {len(backlog)} results came")
                for msg in arrivals.first.values():  # the trace on every answer, or none
                    if any(n == "traceparent" for n, _ in msg.headers) != tracing.enabled:
                        raise RuntimeError(f"traceparent on a result is not {tracing.enabled}")
                return arrivals.last_at - started
            finally:
                stop.set()
                await finish(serving, 60.0)
    finally:
        await drop_topics(k)


async def bench_tracing_e2e(
    base: Settings, tag: str, messages: int, rounds: int, emit: Callable[[str], None] = print
) -> dict[str, Any]:
    """A real worker (on the services ``base`` names) draining a backlog, tracing off against
    the API alone against the SDK (in-memory exporter); rounds alternate the sides."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    sides = {
        "off": Tracing(TracingSettings(enabled=False)),
        "api": Tracing(TracingSettings()),
        "sdk": Tracing(TracingSettings(), provider),
    }
    x = np.random.default_rng(1).standard_normal((messages, preset("mlp").input_dim))
    backlog: Backlog = []
    for i, row in enumerate(x.astype(np.float32)):
        value, headers = encode_request(id=f"b{i}", model=MODEL, inputs=row.reshape(1, -1))
        headers += [("traceparent", PARENT), ("tracestate", b"vendor=abc")]
        backlog.append((f"b{i}".encode(), value, headers))
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    for r in range(rounds):
        for name, tracing in sides.items():
            exporter.clear()
            settings = side_settings(base, tag, f"tracing-{name}-{r}")
            seconds[name].append(await _e2e_side(settings, tracing, backlog))
    rate = {name: messages / statistics.median(s) for name, s in seconds.items()}
    emit(
        f"tracing e2e: a worker draining {messages} traced requests (small MLP, JSON) on local "
        f"Redis and Tansu, {rounds} alternating rounds; median round"
    )
    for name in sides:
        us = 1e6 / rate[name]
        rounds_shown = ", ".join(f"{messages / t:.0f}" for t in seconds[name])
        emit(
            f"  {name:>3} {rate[name]:9.0f} msg/s  {us:7.2f} us/message  "
            f"({us - 1e6 / rate['off']:+.2f} us against off; rounds {rounds_shown} msg/s)"
        )
    return {"messages": messages, "rounds": rounds, "msg_per_s": rate}


@dataclass
class TracingFigures:
    """``kvpipe bench tracing``: the in-process figures and the real worker's."""

    in_process: dict[str, Any]
    e2e: dict[str, Any]

    @property
    def passed(self) -> bool:
        """Every side measured (each e2e side's answers all came, the trace on each or none)."""
        return bool(self.in_process["us_per_message"]) and bool(self.e2e["msg_per_s"])

    def as_dict(self) -> dict[str, Any]:
        return {"in_process": self.in_process, "e2e": self.e2e}


async def bench_tracing_suite(
    base: Settings, tag: str, requests: int, rounds: int, emit: Callable[[str], None]
) -> TracingFigures:
    """Both parts: ``requests`` messages in process (7 rounds at least) and through a worker."""
    in_process = bench_tracing(requests, max(rounds, 7), emit)
    return TracingFigures(in_process, await bench_tracing_e2e(base, tag, requests, rounds, emit))


async def _standalone(messages: int, rounds: int) -> None:
    from pipeline.dev.local import LocalServices

    async with LocalServices() as local:
        await bench_tracing_e2e(local.settings(Settings()), "tracing", messages, rounds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench.tracing")
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--e2e", type=int, default=0, metavar="N", help="also N requests through a real worker"
    )
    parser.add_argument("--e2e-rounds", type=int, default=3)
    args = parser.parse_args(argv)
    bench_tracing(args.messages, args.rounds)
    if args.e2e:
        asyncio.run(_standalone(args.e2e, args.e2e_rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
