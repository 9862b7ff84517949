"""``kvpipe bench``: the cached worker against the article's method, the worker against an echo.

Each comparison runs both of its sides in one run, on the same fresh local services (a Redis
and a Tansu broker), each side with topic, group and Redis key prefixes of its own. The
requests of a side are produced first (a backlog); then its consumer starts, and throughput is
N / (the consumer's partitions assigned -> the N-th distinct answer read back). Every answer is
checked: a side with a wrong, failed or missing answer has no figure.

- ``naive``: the article's model (two 1000x1000 float32 linear heads) served by the real worker
  with its cache, against the same worker whose registry reads the version pointer, manifest
  and every tensor from Redis for each request (:class:`NaiveRegistry`, batches of one).
- ``echo``: a bare aiokafka consume -> produce loop (the floor any Kafka worker sits on),
  against the real worker on the small MLP, same backlog and partition count.
- ``batching``: micro-batches against batch size 1, on the article's model and the small MLP.
- ``memo``: the result cache on and off, 30% of requests repeating an earlier input.
- ``e2e`` (:mod:`pipeline.bench.e2e`): open-loop latency per offered rate, worker and echo
  as processes of their own. ``scale`` (:mod:`pipeline.bench.scale`): one worker process
  against two. ``cache``: the offline eviction simulation.

Every suite prints its table and writes ``DIR/SUITE.json`` and, with matplotlib,
``DIR/SUITE.png`` (:mod:`pipeline.bench.plots`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import os
import platform
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from aiokafka.admin import AIOKafkaAdminClient

from consumers.inference import MakeRegistry, start_serving
from pipeline.bench.echo import echo_loop
from pipeline.cache.cache import ParamCache, Source
from pipeline.config import KafkaSettings, Settings, with_values
from pipeline.dev.local import LocalServices
from pipeline.errors import ConfigError, KvpipeError, UnreadableMessage
from pipeline.io.kafka import Consumer, Message, Producer, ensure_topics
from pipeline.io.kv import open_kv
from pipeline.io.wire import JSON, NPY, decode_result, encode_request
from pipeline.io.wire import Result as Answer
from pipeline.logging import configure_logging
from pipeline.params.models import Model, preset
from pipeline.params.registry import ModelRegistry, Resolved
from pipeline.params.store import Manifest, ParamStore
from pipeline.resource import AsyncResource
from pipeline.serving.worker import WorkerStats, tune_gc

MODEL = "bench"
NAIVE_GOAL = 100.0
ECHO_GOAL = 0.5
BATCHING_GOAL = 2.5
MEMO_GOAL = 1.0
DEFAULT_REQUESTS = {
    "naive": 2000,
    "echo": 50000,
    "batching": 3000,
    "batching-mlp": 20000,
    "memo": 3000,
    "scale": 8000,
}
DEFAULT_OUT = "bench-results"
DEFAULT_NAIVE_REQUESTS = 200
DEFAULT_ROUNDS = 2
PARTITIONS = 4
RTOL, ATOL = 1e-4, 1e-5
GROUP_TIMING = {"kafka.session_timeout_ms": 3000, "kafka.heartbeat_interval_ms": 300}

Array = npt.NDArray[np.float32]
Backlog = list[tuple[bytes, bytes, list[tuple[str, bytes]]]]
Emit = Callable[[str], None]


# -- figures -----------------------------------------------------------------------------------


@dataclass
class RunFigures:
    """One timed run of one side: how many, how long, and whether every answer was right."""

    requests: int
    seconds: float = 0.0
    backlog_s: float = 0.0
    ok: int = 0
    errors: int = 0
    wrong: int = 0
    missing: int = 0
    duplicates: int = 0
    failure: str | None = None
    error_codes: dict[str, int] = field(default_factory=dict)
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """Every request answered, correctly, and nothing broke."""
        return (
            self.failure is None
            and self.ok == self.requests
            and not (self.errors or self.wrong or self.missing)
            and self.seconds > 0
        )

    @property
    def rate(self) -> float | None:
        """Answers per second, or None when the run has no valid figure."""
        return self.requests / self.seconds if self.passed else None

    def problem(self) -> str:
        """Why the run has no figure (empty when it has one)."""
        if self.passed:
            return ""
        codes = f" {self.error_codes}" if self.error_codes else ""
        return self.failure or (
            f"ok {self.ok} of {self.requests}, errors {self.errors}{codes}, "
            f"wrong {self.wrong}, missing {self.missing}"
        )

    def as_dict(self) -> dict[str, Any]:
        """The figures as JSON-able values."""
        rate = self.rate
        return {
            "requests": self.requests,
            "seconds": round(self.seconds, 4),
            "rate": None if rate is None else round(rate, 2),
            "backlog_produce_s": round(self.backlog_s, 3),
            "passed": self.passed,
            "ok": self.ok,
            "errors": self.errors,
            "wrong": self.wrong,
            "missing": self.missing,
            "duplicates": self.duplicates,
            "failure": self.failure,
            "error_codes": self.error_codes,
            "detail": self.detail,
        }


@dataclass
class Side:
    """One side of a comparison over its runs; its rate is all answers over all timed seconds."""

    suite: str
    name: str
    label: str
    unit: str
    requests: int
    runs: list[RunFigures] = field(default_factory=list)

    def new_run(self) -> RunFigures:
        """Start the figures of one more run."""
        run = RunFigures(self.requests)
        self.runs.append(run)
        return run

    @property
    def passed(self) -> bool:
        """Every run of the side answered every request correctly."""
        return bool(self.runs) and all(r.passed for r in self.runs)

    @property
    def rate(self) -> float | None:
        """Answers per second over every run, or None when a run has no valid figure."""
        if not self.passed:
            return None
        return sum(r.requests for r in self.runs) / sum(r.seconds for r in self.runs)

    def as_dict(self) -> dict[str, Any]:
        """The side and its runs as JSON-able values."""
        rate = self.rate
        return {
            "side": self.name,
            "label": self.label,
            "unit": self.unit,
            "requests_per_run": self.requests,
            "rate": None if rate is None else round(rate, 2),
            "passed": self.passed,
            "runs": [r.as_dict() for r in self.runs],
        }


@dataclass
class Comparison:
    """Two sides measured on the same services; ``ratio`` is first.rate / second.rate."""

    suite: str
    first: Side
    second: Side
    goal: float

    @property
    def ratio(self) -> float | None:
        """The first side's rate over the second's, None when either has no figure."""
        a, b = self.first.rate, self.second.rate
        if a is None or b is None or b == 0:
            return None
        return a / b

    @property
    def passed(self) -> bool:
        """Both sides answered every request correctly (the goal is reported, not required)."""
        return self.first.passed and self.second.passed

    def as_dict(self) -> dict[str, Any]:
        """The comparison as JSON-able values."""
        ratio = self.ratio
        return {
            "sides": [self.first.as_dict(), self.second.as_dict()],
            "ratio": None if ratio is None else round(ratio, 4),
            "ratio_of": f"{self.first.name}/{self.second.name}",
            "goal": self.goal,
            "goal_met": ratio is not None and ratio >= self.goal,
            "passed": self.passed,
        }


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count() or 0
    return {
        "nproc": usable,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "aiokafka": _version("aiokafka"),
        "redis_py": _version("redis"),
    }


def side_line(side: Side) -> str:
    """One printed line for one side: its rate, then each run's."""
    noun = "messages" if side.unit == "msg/s" else "requests"
    head = f"{side.suite:<7} {side.label:<18}"
    rate = side.rate
    if rate is None:
        why = (
            "; ".join(f"run {i + 1}: {r.problem()}" for i, r in enumerate(side.runs) if r.problem())
            or "no run"
        )
        return f"{head}      FAIL  ({why})"
    if len(side.runs) == 1:
        return (
            f"{head} {rate:>9.1f} {side.unit} ({side.requests} {noun} "
            f"in {side.runs[0].seconds:.3f} s)"
        )
    each = ", ".join(f"{r.requests / r.seconds:.1f}" for r in side.runs)
    return (
        f"{head} {rate:>9.1f} {side.unit} ({side.requests} {noun} x {len(side.runs)} runs: {each})"
    )


def ratio_line(cmp: Comparison) -> str:
    """The printed ratio of a comparison against its goal."""
    head = f"{cmp.suite:<7} {'ratio':<18}"
    ratio = cmp.ratio
    if ratio is None:
        return f"{head}       n/a  (a side has no valid figure; goal >= {cmp.goal:g}x)"
    verdict = "met" if ratio >= cmp.goal else "NOT met"
    return f"{head} {ratio:>9.2f}x   (goal >= {cmp.goal:g}x: {verdict})"


# -- the article's method ----------------------------------------------------------------------


class NaiveRegistry(ModelRegistry):
    """The article's method: each resolve reads pointer, manifest and every tensor from Redis."""

    # No parameter is kept between calls (only the architecture object, which holds none; the
    # cache it is given is never used). The semaphore queues fetches for the Redis pool, whose
    # own 2 s wait limit would otherwise turn a deep backlog into timeouts, not a figure.

    def __init__(self, store: ParamStore, cache: ParamCache[Any], *, concurrency: int) -> None:
        super().__init__(store, cache)
        self._slots = asyncio.Semaphore(max(1, concurrency))
        self.fetches = 0
        self.bytes_fetched = 0

    async def resolve(self, name: str, version: int | None = None) -> Resolved:
        """Read and verify the whole version from Redis, every time."""
        async with self._slots:
            manifest, params = await self.store.load(name, version)
        self.fetches += 1
        self.bytes_fetched += manifest.nbytes
        model = self._model_for(manifest)
        return Resolved(name, manifest.version, model, manifest, params, Source.LOADED)


def naive_registry(store: ParamStore, cache: ParamCache[Any], settings: Settings) -> ModelRegistry:
    """The article's method in the worker: a registry that reads everything on every call."""
    return NaiveRegistry(store, cache, concurrency=settings.redis.pool_size)


# -- measuring -----------------------------------------------------------------------------------


class Arrivals(AsyncResource):
    """A topic read from its start without a group; notes when each distinct key first came."""

    def __init__(self, kafka: KafkaSettings, topic: str) -> None:
        self._consumer = Consumer(kafka, [topic], group_id=None, assign_from="start")
        self.first: dict[bytes, Message] = {}
        self.duplicates = 0
        self.last_at = 0.0

    async def start(self) -> None:
        await self._consumer.start()

    async def aclose(self) -> None:
        await self._consumer.aclose()

    async def collect(self, want: int, timeout_s: float, alive: asyncio.Task[Any]) -> bool:
        """Read until ``want`` distinct keys came, ``timeout_s`` passed or ``alive`` ended."""
        deadline = time.perf_counter() + timeout_s
        while len(self.first) < want and time.perf_counter() < deadline and not alive.done():
            messages = await self._consumer.getmany(timeout_ms=100, max_records=5000)
            now = time.perf_counter()
            for m in messages:
                key = m.key or b""
                if key in self.first:
                    self.duplicates += 1
                    continue
                self.first[key] = m
                if len(self.first) <= want:
                    self.last_at = now
        return len(self.first) >= want


async def _wait_event(event: asyncio.Event, task: asyncio.Task[Any], timeout_s: float) -> None:
    """Wait for ``event``; raise if ``task`` ends first or the time runs out."""
    waiter = asyncio.create_task(event.wait())
    try:
        done, _ = await asyncio.wait(
            {waiter, task}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
    if event.is_set():
        return
    if task in done:
        task.result()  # raises what stopped it
        raise KvpipeError("the consumer under test stopped before it was assigned partitions")
    raise KvpipeError(f"no partitions were assigned within {timeout_s:g} s")


async def _finish(task: asyncio.Task[Any], timeout_s: float) -> Any:
    """Wait (bounded) for a stopping task; cancel it when it does not end in time."""
    try:
        return await asyncio.wait_for(asyncio.shield(task), timeout_s)
    except TimeoutError:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise KvpipeError(f"the consumer under test did not stop within {timeout_s:g} s") from None


async def produce_backlog(kafka: KafkaSettings, topic: str, backlog: Backlog) -> float:
    """Produce every message and wait for all acknowledgements; returns the seconds it took."""
    async with Producer(kafka, send_timeout_s=300.0) as producer:
        started = time.perf_counter()
        futures = [
            await producer.enqueue(topic, value, key=key, headers=headers)
            for key, value, headers in backlog
        ]
        await producer.flush()
        await producer.wait_acked(futures)
        return time.perf_counter() - started


async def drop_topics(kafka: KafkaSettings) -> None:
    """Delete a finished run's topics (``PREFIX.*``) so they do not weigh on later runs."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=kafka.bootstrap.split(","),
        client_id=kafka.client_id,
        request_timeout_ms=int(kafka.request_timeout_s * 1000),
    )
    with contextlib.suppress(Exception):  # best effort: the services die with the bench anyway
        await asyncio.wait_for(admin.start(), kafka.request_timeout_s)
        names = await asyncio.wait_for(admin.list_topics(), kafka.request_timeout_s)
        mine = [t for t in names if t.startswith(f"{kafka.topic_prefix}.")]
        if mine:
            await asyncio.wait_for(admin.delete_topics(mine), kafka.request_timeout_s)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(admin.close(), kafka.request_timeout_s)


WIRES = {"json": JSON, "npy": NPY}


async def prepare_side(
    settings: Settings, model: Model, params: dict[str, Array], extra_topics: Sequence[str] = ()
) -> Manifest:
    """Publish ``model`` as the benchmark's model under the side's keys; make its topics."""
    k = settings.kafka
    async with open_kv(settings.redis) as kv:
        published = await ParamStore(kv, prefix=settings.redis.key_prefix).publish(
            MODEL, model.arch, params
        )
    topics = [k.requests_topic, k.results_topic, k.dlq_topic, k.updates_topic, *extra_topics]
    await ensure_topics(k, topics)
    return published.manifest


def request_backlog(inputs: Array, wire: str = JSON) -> tuple[list[str], Backlog]:
    """One request per row in the content type ``wire``; ids are the Kafka keys."""
    ids = [f"b{i}" for i in range(len(inputs))]
    backlog: Backlog = []
    for rid, row in zip(ids, inputs, strict=True):
        value, headers = encode_request(
            id=rid, model=MODEL, inputs=row.reshape(1, -1), content_type=wire
        )
        backlog.append((rid.encode(), value, headers))
    return ids, backlog


def side_settings(
    base: Settings, run: str, side: str, extra: dict[str, Any] | None = None
) -> Settings:
    """Settings of one side: topics, group and Redis keys no other side uses."""
    tag = f"bench-{run}-{side}"
    values: dict[str, Any] = {
        "kafka.topic_prefix": tag,
        "kafka.group_id": tag,
        "kafka.partitions": PARTITIONS,
        "redis.key_prefix": tag,
        "worker.worker_id": tag,
        **GROUP_TIMING,
    }
    values.update(extra or {})
    return with_values(base, values)


class Answers(Protocol):
    """What :func:`verify_results` reads: the first message of each key, and the repeats."""

    @property
    def first(self) -> dict[bytes, Message]: ...

    @property
    def duplicates(self) -> int: ...


def check_answer(
    msg: Message, rid: str, expected_row: Array, version: int
) -> tuple[str, Answer | None]:
    """One answer against numpy's row: ("ok", result), ("wrong", ...) or (its error code, ...)."""
    try:
        result = decode_result(msg.value or b"", msg.headers)
    except UnreadableMessage:
        return "wrong", None
    if not result.ok or result.outputs is None:
        return result.error_code or "unknown", result
    out = result.outputs
    if (
        result.id != rid
        or result.version != version
        or out.shape != (1, expected_row.shape[0])
        or not np.allclose(out[0], expected_row, rtol=RTOL, atol=ATOL)
    ):
        return "wrong", result
    return "ok", result


def verify_results(
    fig: RunFigures,
    arrivals: Answers,
    ids: Sequence[str],
    expected: Array,
    version: int,
) -> Counter[str]:
    """Check every answer against numpy; fills the counts of ``fig``; returns cache sources."""
    sources: Counter[str] = Counter()
    codes: Counter[str] = Counter()
    for i, rid in enumerate(ids):
        msg = arrivals.first.get(rid.encode())
        if msg is None:
            fig.missing += 1
            continue
        verdict, result = check_answer(msg, rid, expected[i], version)
        if verdict == "ok" and result is not None:
            fig.ok += 1
            sources[result.cache or "none"] += 1
        elif verdict == "wrong":
            fig.wrong += 1
        else:
            fig.errors += 1
            codes[verdict] += 1
    fig.duplicates = arrivals.duplicates
    fig.error_codes = dict(codes)
    return sources


async def run_worker_side(
    fig: RunFigures,
    settings: Settings,
    model: Model,
    params: dict[str, Array],
    inputs: Array,
    make_registry: MakeRegistry | None,
    timeout_s: float,
    wire: str = JSON,
) -> None:
    """Publish, produce the backlog, start a worker, time it to the last result, verify."""
    k = settings.kafka
    manifest = await prepare_side(settings, model, params)
    ids, backlog = request_backlog(inputs, wire)
    fig.detail["wire"] = wire
    fig.backlog_s = await produce_backlog(k, k.requests_topic, backlog)
    del backlog
    stop = asyncio.Event()
    async with Arrivals(k, k.results_topic) as arrivals:
        worker, serving = await start_serving(settings, stop, make_registry=make_registry)
        try:
            started = time.perf_counter()
            complete = await arrivals.collect(len(ids), timeout_s, serving)
            fig.seconds = arrivals.last_at - started
            if not complete:
                fig.failure = (
                    f"{len(arrivals.first)} of {len(ids)} results within {timeout_s:g} s"
                    if not serving.done()
                    else "the worker stopped early"
                )
        finally:
            stop.set()
            stats: WorkerStats | None = None
            try:
                stats = await _finish(serving, settings.worker.shutdown_timeout_s + 15)
            except KvpipeError as exc:
                fig.failure = fig.failure or str(exc)
            except Exception as exc:
                fig.failure = fig.failure or f"the worker failed: {type(exc).__name__}: {exc}"
    sources = verify_results(fig, arrivals, ids, model.forward(params, inputs), manifest.version)
    fig.detail["results_by_cache"] = dict(sources)
    fig.detail["param_mb"] = round(manifest.nbytes / 1e6, 3)
    if stats is not None:
        fig.detail["batches"] = stats.batches
        if stats.memo_hits or stats.memo_misses:
            fig.detail["memo_hit_rate"] = round(
                stats.memo_hits / (stats.memo_hits + stats.memo_misses), 4
            )
        fig.detail["mean_batch_rows"] = round(stats.batched_rows / max(1, stats.batches), 2)
        fig.detail["commits"] = stats.commits
    registry = worker.registry
    if isinstance(registry, NaiveRegistry):
        fig.detail["redis_fetches"] = registry.fetches
        fig.detail["redis_mb_fetched"] = round(registry.bytes_fetched / 1e6, 1)
    else:
        cache = registry.cache.stats
        fig.detail["cache_hit_rate"] = round(cache.hit_rate, 4)
        fig.detail["cache_loads"] = cache.loads


# -- the echo baseline ---------------------------------------------------------------------------


async def run_echo_side(
    fig: RunFigures, settings: Settings, backlog: Backlog, timeout_s: float
) -> None:
    """Produce the backlog, start the echo, time it to the last echoed message, check bytes."""
    k = settings.kafka
    sink = f"{k.topic_prefix}.echo"
    await ensure_topics(k, [k.requests_topic, sink])
    fig.backlog_s = await produce_backlog(k, k.requests_topic, backlog)
    stop = asyncio.Event()
    assigned = asyncio.Event()
    async with Arrivals(k, sink) as arrivals:
        echo = asyncio.create_task(echo_loop(k, k.requests_topic, sink, stop, assigned))
        try:
            await _wait_event(assigned, echo, 60.0)
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
                fig.detail["commits"] = await _finish(echo, 30.0)
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


# -- suites ------------------------------------------------------------------------------------

Step = Callable[[RunFigures, Settings], Coroutine[Any, Any, None]]


async def _run_once(side: Side, step: Step, settings: Settings) -> None:
    """One run of one side; a failure is recorded in its figures, not raised."""
    run = side.new_run()
    try:
        await step(run, settings)
    except Exception as exc:
        run.failure = run.failure or f"{type(exc).__name__}: {exc}"
    finally:
        await drop_topics(settings.kafka)


async def compare(
    cmp: Comparison,
    steps: dict[str, tuple[Step, dict[str, Any]]],
    *,
    base: Settings,
    tag: str,
    rounds: int,
    emit: Emit,
) -> Comparison:
    """Run both sides ``rounds`` times, order A B, B A, ..., each run on prefixes of its own."""
    for i in range(rounds):
        order = (cmp.first, cmp.second) if i % 2 == 0 else (cmp.second, cmp.first)
        for side in order:
            step, extra = steps[side.name]
            await _run_once(side, step, side_settings(base, tag, f"{side.name}-{i}", extra))
    emit(side_line(cmp.first))
    emit(side_line(cmp.second))
    emit(ratio_line(cmp))
    return cmp


async def bench_naive(
    base: Settings,
    tag: str,
    requests: int,
    naive_requests: int,
    rounds: int,
    emit: Emit,
    wire: str = NPY,
) -> Comparison:
    """The cached worker against the article's method, on the article's model."""

    model = preset("article")
    params = model.init(0)
    rng = np.random.default_rng(1)
    cached_inputs = rng.standard_normal((requests, model.input_dim)).astype(np.float32)
    naive_inputs = rng.standard_normal((naive_requests, model.input_dim)).astype(np.float32)

    async def cached(run: RunFigures, settings: Settings) -> None:
        await run_worker_side(
            run, settings, model, params, cached_inputs, None,
            timeout_s=60.0 + requests / 10, wire=wire,
        )  # fmt: skip

    async def naive(run: RunFigures, settings: Settings) -> None:
        await run_worker_side(
            run, settings, model, params, naive_inputs, naive_registry,
            timeout_s=60.0 + naive_requests / 2, wire=wire,
        )  # fmt: skip

    cmp = Comparison(
        "naive",
        Side("naive", "cached", "cached worker", "req/s", requests),
        Side("naive", "naive", "article method", "req/s", naive_requests),
        NAIVE_GOAL,
    )
    steps: dict[str, tuple[Step, dict[str, Any]]] = {
        "cached": (cached, {}),
        "naive": (naive, {"worker.max_batch_size": 1}),
    }
    return await compare(cmp, steps, base=base, tag=tag, rounds=rounds, emit=emit)


ABSides = tuple[tuple[str, str, dict[str, Any]], tuple[str, str, dict[str, Any]]]


async def _settings_ab(
    suite: str,
    inputs: Array,
    sides: ABSides,
    goal: float,
    *,
    base: Settings,
    tag: str,
    rounds: int,
    emit: Emit,
    detail: dict[str, Any] | None = None,
    model: Model | None = None,
    wire: str = NPY,
) -> Comparison:
    """The same worker on one model (the article's by default) and the same inputs, under
    two settings."""
    model = model or preset("article")
    params = model.init(0)
    requests = len(inputs)

    async def side(run: RunFigures, settings: Settings) -> None:
        run.detail.update(detail or {})
        await run_worker_side(
            run, settings, model, params, inputs, None,
            timeout_s=60.0 + requests / 10, wire=wire,
        )  # fmt: skip

    (key_a, label_a, values_a), (key_b, label_b, values_b) = sides
    cmp = Comparison(
        suite,
        Side(suite, key_a, label_a, "req/s", requests),
        Side(suite, key_b, label_b, "req/s", requests),
        goal,
    )
    steps: dict[str, tuple[Step, dict[str, Any]]] = {
        key_a: (side, values_a),
        key_b: (side, values_b),
    }
    return await compare(cmp, steps, base=base, tag=tag, rounds=rounds, emit=emit)


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
    return await _settings_ab(
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
    return await _settings_ab(
        "batching", inputs.astype(np.float32), sides, BATCHING_GOAL,
        base=base, tag=f"{tag}-mlp", rounds=rounds, emit=emit, model=model, wire=wire,
    )  # fmt: skip


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
    return await _settings_ab(
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
            run, settings, model, params, inputs, None,
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


@dataclass
class Options:
    """What the suites were asked for (None: each suite's default)."""

    requests: int | None = None
    naive_requests: int = DEFAULT_NAIVE_REQUESTS
    rounds: int = DEFAULT_ROUNDS
    rates: tuple[float, ...] | None = None
    duration_s: float | None = None
    layers: list[int] | None = None
    wire: str | None = None  # None: JSON for the small MLP, npy for the article's model

    def wire_for(self, model: str) -> str:
        """The request content type of a suite on ``model`` ("mlp" or "article")."""
        return self.wire or (JSON if model == "mlp" else NPY)

    def count(self, key: str) -> int:
        """Requests per run of the comparison ``key``."""
        return self.requests or DEFAULT_REQUESTS[key]


class Result(Protocol):
    """What every suite's result offers: whether every answer was right, and its JSON."""

    @property
    def passed(self) -> bool: ...

    def as_dict(self) -> dict[str, Any]: ...


async def run_suite(
    suite: str, settings: Settings, tag: str, opts: Options, emit: Emit
) -> dict[str, Result]:
    """One suite on running services; its results by key (batching has two)."""
    rounds = opts.rounds
    if suite == "echo":
        return {
            "echo": await bench_echo(
                settings, tag, opts.count("echo"), rounds, emit, opts.wire_for("mlp")
            )
        }
    if suite == "naive":
        n, naive_n = opts.count("naive"), opts.naive_requests
        wire = opts.wire_for("article")
        return {"naive": await bench_naive(settings, tag, n, naive_n, rounds, emit, wire)}
    if suite == "batching":
        n, n_mlp = opts.count("batching"), opts.count("batching-mlp")
        article = await bench_batching(settings, tag, n, rounds, emit, opts.wire_for("article"))
        mlp = await bench_batching_mlp(settings, tag, n_mlp, rounds, emit, opts.wire_for("mlp"))
        from pipeline.bench.e2e import bench_light_latency

        light_a = side_settings(settings, tag, "light-batched")
        light_b = side_settings(settings, tag, "light-single", {"worker.max_batch_size": 1})
        try:
            light = await bench_light_latency(
                light_a, light_b, rounds=rounds, wire=opts.wire_for("article"), emit=emit
            )
        finally:
            await drop_topics(light_a.kafka)
            await drop_topics(light_b.kafka)
        return {"batching": article, "batching-mlp": mlp, "batching-light": light}
    if suite == "memo":
        return {
            "memo": await bench_memo(
                settings, tag, opts.count("memo"), rounds, emit, opts.wire_for("article")
            )
        }
    if suite == "e2e":
        from pipeline.bench.e2e import DEFAULT_DURATION_S, DEFAULT_RATES, bench_e2e

        try:
            return {
                "e2e": await bench_e2e(
                    side_settings(settings, tag, "e2e-worker"),
                    side_settings(settings, tag, "e2e-echo"),
                    rates=opts.rates or DEFAULT_RATES,
                    duration_s=opts.duration_s or DEFAULT_DURATION_S,
                    emit=emit,
                    wire=opts.wire_for("mlp"),
                )
            }
        finally:
            await drop_topics(side_settings(settings, tag, "e2e-worker").kafka)
            await drop_topics(side_settings(settings, tag, "e2e-echo").kafka)
    if suite == "scale":
        from pipeline.bench.scale import bench_scale

        n = opts.count("scale")
        return {
            "scale": await bench_scale(
                settings, tag, n, rounds, emit, layers=opts.layers, wire=opts.wire_for("scale")
            )
        }
    raise ValueError(f"unknown suite {suite!r}")


async def run_bench(
    suites: Sequence[str],
    opts: Options | None = None,
    *,
    base: Settings | None = None,
    emit: Emit = print,
    seconds: dict[str, float] | None = None,
) -> dict[str, Result]:
    """Run the suites on fresh local services (stopped afterwards, also on failure); the
    time each took goes into ``seconds``."""
    opts = opts or Options()
    tag = uuid.uuid4().hex[:8]
    out: dict[str, Result] = {}
    async with LocalServices() as local:
        settings = local.settings(base)
        for suite in suites:
            started = time.perf_counter()
            out.update(await run_suite(suite, settings, tag, opts, emit))
            if seconds is not None:
                seconds[suite] = round(time.perf_counter() - started, 2)
    return out


def bench_cache(args: argparse.Namespace) -> dict[str, Any]:
    """Hit rates of the shipped eviction policies beside Belady's optimum (no services)."""
    from pipeline.bench.simulation import format_table, run_cache_bench

    accesses = getattr(args, "accesses", None) or 10**6
    print(
        f"cache   simulation: {accesses} accesses per trace, seed 0 "
        "(LRU, LFU, W-TinyLFU, Belady's MIN)",
        flush=True,
    )
    out = run_cache_bench(seed=0, accesses=accesses)
    print(format_table(out["rows"]), flush=True)
    print(f"cache   {out['seconds']:.1f} s", flush=True)
    return out


class _CacheResult:
    """The cache simulation as a suite result (it has no answers to get wrong)."""

    passed = True

    def __init__(self, out: dict[str, Any]) -> None:
        self.out = out

    def as_dict(self) -> dict[str, Any]:
        return self.out


def _write(path: Path, doc: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=2) + "\n")
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc}") from None


def write_outputs(
    out_dir: Path, suite: str, doc: dict[str, Any], emit: Emit = print
) -> tuple[Path, Path | None]:
    """``out_dir/<suite>.json`` and, with matplotlib, ``out_dir/<suite>.png``."""
    from pipeline.bench import plots

    json_path = out_dir / f"{suite}.json"
    _write(json_path, doc)
    png_path = out_dir / f"{suite}.png"
    if plots.write_plot(suite, doc, png_path):
        emit(f"{suite:<7} wrote {json_path} and {png_path}")
        return json_path, png_path
    emit(plots.MISSING)
    return json_path, None


def _parse_options(args: argparse.Namespace) -> Options:
    requests: int | None = getattr(args, "requests", None)
    naive_requests: int = getattr(args, "naive_requests", None) or DEFAULT_NAIVE_REQUESTS
    rounds: int = getattr(args, "rounds", None) or DEFAULT_ROUNDS
    if (requests is not None and requests <= 0) or naive_requests <= 0 or rounds <= 0:
        raise ConfigError("--requests, --naive-requests and --rounds must be positive")
    rates_arg: str | None = getattr(args, "rates", None)
    rates: tuple[float, ...] | None = None
    if rates_arg:
        try:
            rates = tuple(float(r) for r in rates_arg.split(",") if r.strip())
        except ValueError:
            raise ConfigError(f"--rates: not a list of numbers: {rates_arg!r}") from None
        if not rates or any(r <= 0 for r in rates):
            raise ConfigError("--rates must be positive numbers")
    duration: float | None = getattr(args, "duration", None)
    if duration is not None and duration <= 0:
        raise ConfigError("--duration must be positive")
    layers_arg: str | None = getattr(args, "layers", None)
    layers: list[int] | None = None
    if layers_arg:
        try:
            layers = [int(n) for n in layers_arg.replace("-", ",").split(",")]
        except ValueError:
            raise ConfigError(f"--layers: not a list of sizes: {layers_arg!r}") from None
    wire_arg: str | None = getattr(args, "wire", None)
    wire = None if wire_arg in (None, "auto") else WIRES[wire_arg]
    return Options(requests, naive_requests, rounds, rates, duration, layers, wire)


ALL_SUITES = ["echo", "naive", "batching", "e2e", "scale", "cache"]
KEYS = {"batching": ["batching", "batching-mlp", "batching-light"]}


def main(args: argparse.Namespace, settings: Settings) -> int:
    """``kvpipe bench``: 0 when every answer of every side was right, 1 otherwise."""
    configure_logging(fmt=settings.log_format, level=getattr(args, "log_level", None) or "error")
    tune_gc()  # the in-process sides run as a serving process would, both alike
    opts = _parse_options(args)
    suites = ALL_SUITES if args.suite == "all" else [args.suite]
    out_dir = Path(getattr(args, "out", None) or DEFAULT_OUT)
    info = machine()
    if args.suite == "e2e":
        how = "each rate on both sides, order A B, B A, ..."
    elif args.suite == "cache":
        how = "offline simulation"
    else:
        how = f"{opts.rounds} run(s) of each side, order A B, B A, ..."
    print(
        f"kvpipe bench {args.suite}: nproc {info['nproc']}, {info['platform']}, "
        f"python {info['python']}, numpy {info['numpy']}, aiokafka {info['aiokafka']}, "
        f"redis-py {info['redis_py']}; {how}; requests as "
        + (opts.wire or "JSON on the small MLP, npy on the larger models"),
        flush=True,
    )

    def emit(line: str) -> None:
        print(line, flush=True)

    started = time.perf_counter()
    seconds: dict[str, float] = {}
    live = [s for s in suites if s != "cache"]
    results = (
        asyncio.run(run_bench(live, opts, base=settings, emit=emit, seconds=seconds))
        if live
        else {}
    )
    if "cache" in suites:
        t = time.perf_counter()
        results["cache"] = _CacheResult(bench_cache(args))
        seconds["cache"] = round(time.perf_counter() - t, 2)
    passed = all(r.passed for r in results.values())
    elapsed = time.perf_counter() - started
    config = {
        "requests": {k: opts.count(k) for k in DEFAULT_REQUESTS},
        "naive_requests": opts.naive_requests,
        "rounds": opts.rounds,
        "partitions": PARTITIONS,
        "rtol": RTOL,
        "atol": ATOL,
        "rates": list(opts.rates) if opts.rates else None,
        "duration_s": opts.duration_s,
        "layers": opts.layers,
    }
    for suite in suites:
        keys = KEYS.get(suite, [suite])
        doc = {
            "suite": suite,
            "machine": info,
            "seconds": seconds.get(suite),
            "passed": all(results[k].passed for k in keys),
            "config": config,
            "results": {k: results[k].as_dict() for k in keys},
        }
        write_outputs(out_dir, suite, doc, emit)
    print(
        f"total {elapsed:.1f} s; "
        + (
            "every answer checked and correct"
            if passed
            else "FAIL: some answers were wrong or missing; those figures are void"
        )
    )
    if args.json:
        doc = {
            "machine": info,
            "seconds": round(elapsed, 2),
            "passed": passed,
            "config": config,
            "suites": {k: r.as_dict() for k, r in results.items() if k != "cache"},
            "cache": results["cache"].as_dict() if "cache" in results else None,
        }
        _write(Path(args.json), doc)
    return 0 if passed else 1


if __name__ == "__main__":  # pragma: no cover
    from pipeline.cli import main as cli_main

    sys.exit(cli_main(["bench", *sys.argv[1:]]))
