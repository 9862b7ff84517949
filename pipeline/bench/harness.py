"""How a side is run: its own topics and keys, a produced backlog, a timed consumer, a verdict."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Protocol, runtime_checkable

from aiokafka.admin import AIOKafkaAdminClient

from consumers.inference import start_serving
from pipeline.bench.figures import (
    MODEL,
    Array,
    Backlog,
    Comparison,
    Emit,
    RunFigures,
    Side,
    ratio_line,
    request_backlog,
    side_line,
    verify_results,
)
from pipeline.config import KafkaSettings, Settings, with_values
from pipeline.errors import KvpipeError
from pipeline.io.kafka import Consumer, Message, Producer, ensure_topics
from pipeline.io.kv import open_kv
from pipeline.io.wire import JSON, NPY
from pipeline.params.models import Model, preset
from pipeline.params.store import Manifest, ParamStore
from pipeline.resource import AsyncResource
from pipeline.serving.worker import Worker, WorkerStats

PARTITIONS = 4
GROUP_TIMING = {"kafka.session_timeout_ms": 3000, "kafka.heartbeat_interval_ms": 300}

#: What starts the worker under test and returns once it owns partitions (the task drains it
#: when ``stop`` is set): :func:`consumers.inference.start_serving` unless a suite composes its own.
Start = Callable[[Settings, asyncio.Event], Awaitable[tuple[Worker, asyncio.Task[WorkerStats]]]]


@runtime_checkable
class FetchCounts(Protocol):
    """A registry that reads everything from Redis each time, and counts it (no cache figures)."""

    fetches: int
    bytes_fetched: int


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


async def wait_event(event: asyncio.Event, task: asyncio.Task[Any], timeout_s: float) -> None:
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


async def finish(task: asyncio.Task[Any], timeout_s: float) -> Any:
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


async def prepare_side(
    settings: Settings, model: Model, params: dict[str, Array], extra_topics: Sequence[str] = ()
) -> Manifest:
    """Publish ``model`` as the benchmark's model under the side's keys; make its topics."""
    async with open_kv(settings.redis) as kv:
        published = await ParamStore(kv, prefix=settings.redis.key_prefix).publish(
            MODEL, model.arch, params
        )
    await side_topics(settings, extra_topics)
    return published.manifest


async def side_topics(settings: Settings, extra_topics: Sequence[str] = ()) -> None:
    """Make a side's requests, results, dead-letter and updates topics (and ``extra_topics``)."""
    k = settings.kafka
    topics = [k.requests_topic, k.results_topic, k.dlq_topic, k.updates_topic, *extra_topics]
    await ensure_topics(k, topics)


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
        "worker.processes": 1,  # one process per side unless a suite asks for more
        **GROUP_TIMING,
    }
    values.update(extra or {})
    return with_values(base, values)


async def run_worker_side(
    fig: RunFigures,
    settings: Settings,
    model: Model,
    params: dict[str, Array],
    inputs: Array,
    timeout_s: float,
    wire: str = JSON,
    start: Start = start_serving,
) -> None:
    """Publish, produce the backlog, start a worker, time it to the last result, verify."""
    manifest = await prepare_side(settings, model, params)
    ids, arrivals, worker, stats = await serve_backlog(
        fig, settings, inputs, timeout_s, wire, start
    )
    sources = verify_results(fig, arrivals, ids, model.forward(params, inputs), manifest.version)
    fig.detail["results_by_cache"] = {str(k): n for k, n in sources.items()}
    fig.detail["param_mb"] = round(manifest.nbytes / 1e6, 3)
    worker_detail(fig, worker, stats)


async def serve_backlog(
    fig: RunFigures,
    settings: Settings,
    inputs: Array,
    timeout_s: float,
    wire: str = JSON,
    start: Start = start_serving,
) -> tuple[list[str], Arrivals, Worker, WorkerStats | None]:
    """Produce one request per row of ``inputs`` (the side's model already published), start a
    worker, time it from its assignment to the last distinct answer, stop it; the answers are
    the caller's to check."""
    k = settings.kafka
    ids, backlog = request_backlog(inputs, wire)
    fig.detail["wire"] = wire
    fig.backlog_s = await produce_backlog(k, k.requests_topic, backlog)
    del backlog
    stop = asyncio.Event()
    async with Arrivals(k, k.results_topic) as arrivals:
        worker, serving = await start(settings, stop)
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
                stats = await finish(serving, settings.worker.shutdown_timeout_s + 15)
            except KvpipeError as exc:
                fig.failure = fig.failure or str(exc)
            except Exception as exc:
                fig.failure = fig.failure or f"the worker failed: {type(exc).__name__}: {exc}"
    return ids, arrivals, worker, stats


def worker_detail(fig: RunFigures, worker: Worker, stats: WorkerStats | None) -> None:
    """The worker's batches, commits and cache (or Redis fetch) figures into ``fig.detail``."""
    if stats is not None:
        fig.detail["batches"] = stats.batches
        if stats.memo_hits or stats.memo_misses:
            fig.detail["memo_hit_rate"] = round(
                stats.memo_hits / (stats.memo_hits + stats.memo_misses), 4
            )
        fig.detail["mean_batch_rows"] = round(stats.batched_rows / max(1, stats.batches), 2)
        fig.detail["commits"] = stats.commits
    registry = worker.registry
    if isinstance(registry, FetchCounts):
        fig.detail["redis_fetches"] = registry.fetches
        fig.detail["redis_mb_fetched"] = round(registry.bytes_fetched / 1e6, 1)
    else:
        cache = registry.cache.stats
        fig.detail["cache_hit_rate"] = round(cache.hit_rate, 4)
        fig.detail["cache_loads"] = cache.loads


# -- comparing ---------------------------------------------------------------------------------

Step = Callable[[RunFigures, Settings], Coroutine[Any, Any, None]]


async def run_once(side: Side, step: Step, settings: Settings) -> None:
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
            await run_once(side, step, side_settings(base, tag, f"{side.name}-{i}", extra))
    emit(side_line(cmp.first))
    emit(side_line(cmp.second))
    emit(ratio_line(cmp))
    return cmp


ABSides = tuple[tuple[str, str, dict[str, Any]], tuple[str, str, dict[str, Any]]]


async def compare_settings(
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
    """The same worker, model (the article's by default) and inputs under two settings."""
    model = model or preset("article")
    params = model.init(0)
    requests = len(inputs)

    async def side(run: RunFigures, settings: Settings) -> None:
        run.detail.update(detail or {})
        await run_worker_side(
            run, settings, model, params, inputs,
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
