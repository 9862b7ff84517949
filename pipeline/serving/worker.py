"""The inference worker: consume requests, batch per model, compute in threads, answer, commit.

At-least-once: a partition's offset is committed only once every message before it has its
result (or dead-letter record) acknowledged by the broker. A message never stops the worker:
unreadable bytes go to the dead-letter topic, wrong requests get an error result.

The worker is the run loop (fetch, backpressure, timers), its lifecycle (start, drain,
rebalance) and the composition of its parts: :class:`~.batcher.Batcher`,
:class:`~.runner.BatchRunner` (with :class:`~.memo.ResultMemo`), :class:`~.delivery.Delivery`,
:class:`~.commits.Commits` and :class:`~.watchdog.Watchdog`.
"""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import structlog
from threadpoolctl import threadpool_limits

from pipeline.config import Settings
from pipeline.errors import BrokerUnavailable, UnreadableMessage
from pipeline.io.kafka import Consumer, Message, Partition, Producer
from pipeline.io.wire import error_result
from pipeline.metrics import WorkerMetrics
from pipeline.params.onnx import set_session_threads
from pipeline.params.prefix import PrefixCache
from pipeline.params.registry import ModelRegistry
from pipeline.params.updates import UpdateListener
from pipeline.resource import AsyncResource
from pipeline.serving.batcher import Batcher, BatchKey
from pipeline.serving.commits import Commits
from pipeline.serving.dedupe import Dedupe, fingerprint
from pipeline.serving.delivery import Delivery
from pipeline.serving.generation import GenerationScheduler
from pipeline.serving.intake import read_item
from pipeline.serving.item import Item, Tasks
from pipeline.serving.memo import ResultMemo
from pipeline.serving.runner import BatchRunner
from pipeline.serving.stats import WorkerStats
from pipeline.serving.tracing import Tracing
from pipeline.serving.watchdog import Watchdog

log = structlog.get_logger("kvpipe.worker")

__all__ = ["Worker", "WorkerStats", "default_worker_id", "tune_gc"]


def tune_gc() -> None:
    """For a process that serves: fewer, cheaper garbage collections.

    A worker allocates a few dozen short-lived objects per message; with the default
    thresholds the collector runs every few dozen messages and each full pass walks every
    long-lived object (measured: +35% messages/s with this). Objects that exist at startup
    are frozen out of collection. Process-wide, so the process entry point calls it.
    """
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Worker(AsyncResource):
    """One member of the worker group. ``async with Worker(...) as w: await w.run(stop)``."""

    def __init__(
        self,
        settings: Settings,
        *,
        registry: ModelRegistry,
        producer: Producer,
        listener: UpdateListener | None = None,
        metrics: WorkerMetrics | None = None,
        consumer_factory: Callable[[Worker], Consumer] | None = None,
        dedupe: Dedupe | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.settings = settings
        self.tracing = tracing or Tracing(settings.tracing)
        self.dedupe = dedupe
        self.registry = registry
        self.producer = producer
        self.listener = listener
        self.metrics = metrics
        if metrics is not None:
            metrics.bind(self._live_figures)
        self.worker_id = settings.worker.worker_id or default_worker_id()
        self.stats = WorkerStats()
        self._kafka = settings.kafka
        self._cfg = settings.worker
        self._consumer_factory = consumer_factory
        self._consumer: Consumer | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._tasks = Tasks(lambda exc: log.error("task_failed", error=repr(exc)))
        self._abandon = asyncio.Event()
        self._stopping = False
        self._closed = False
        self.assigned = asyncio.Event()
        self.commits = Commits(
            self.stats,
            interval_s=self._cfg.commit_interval_s,
            settle=dedupe.settle if dedupe is not None else None,
        )
        self.delivery = Delivery(
            self._kafka,
            producer,
            self.commits.book,
            self.stats,
            worker_id=self.worker_id,
            abandon=self._abandon,
            metrics=metrics,
            dedupe=dedupe,
            tracing=self.tracing,
        )
        memo = None
        if settings.cache.result_models:
            memo = ResultMemo(settings.cache, registry.store, self.stats, self._tasks.spawn)
        self.runner = BatchRunner(
            registry,
            self.delivery.reply,
            self.stats,
            worker_id=self.worker_id,
            memo=memo,
            metrics=metrics,
            tracing=self.tracing,
        )
        prefix = PrefixCache(
            registry.store.kv,
            key_prefix=settings.redis.key_prefix,
            capacity_bytes=settings.cache.prefix_bytes,
            ttl_s=settings.cache.prefix_ttl_s,
        )
        self.generation = GenerationScheduler(
            settings,
            registry,
            prefix,
            self.delivery,
            self.stats,
            worker_id=self.worker_id,
            max_batch=settings.cache.generation_batch,
            kv_budget_bytes=settings.cache.generation_kv_bytes,
        )
        self.batcher: Batcher[BatchKey, Item] = Batcher(
            self._run_batch,
            rows=lambda it: it.request.rows,
            max_rows=self._cfg.max_batch_size,
            max_wait_s=self._cfg.max_wait_ms / 1000,
        )

    @property
    def consumer(self) -> Consumer:
        if self._consumer is None:
            raise RuntimeError("worker is not started; use 'async with Worker(...)'")
        return self._consumer

    @property
    def in_flight(self) -> int:
        return self.commits.book.in_flight

    async def start(self) -> None:
        # Compute threads already use the cores; BLAS threads inside each would oversubscribe
        # them and starve the event loop (measured: about 30% fewer requests per second).
        threadpool_limits(limits=self._cfg.blas_threads, user_api="blas")
        set_session_threads(self._cfg.blas_threads)  # onnxruntime's own pool, the same rule
        self._executor = ThreadPoolExecutor(
            max_workers=self._cfg.compute_threads, thread_name_prefix="kvpipe-compute"
        )
        self.runner.executor = self._executor
        self.generation.executor = self._executor
        self._consumer = self._new_consumer()
        await self._consumer.start()

    def _new_consumer(self) -> Consumer:
        if self._consumer_factory is not None:  # tests: a consumer at the boundary
            return self._consumer_factory(self)
        return Consumer(
            self._kafka,
            [self._kafka.requests_topic],
            group_id=self._kafka.group_id,
            on_revoked=self._on_revoked,
            on_assigned=self._on_assigned,
            session_timeout_ms=self._kafka.session_timeout_ms,
            heartbeat_interval_ms=self._kafka.heartbeat_interval_ms,
        )

    async def aclose(self) -> None:
        """Cancel leftover work, leave the group, stop compute threads; safe twice."""
        if self._closed:
            return
        self._closed = True
        self._abandon.set()
        self.batcher.cancel()
        await self._tasks.cancel_all()
        await self.generation.aclose()
        try:
            if self._consumer is not None:
                await self._consumer.aclose()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=False, cancel_futures=True)

    # -- main loop -------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set, then drain: finish and answer what was fetched, commit."""
        loop = asyncio.get_running_loop()
        book = self.commits.book
        next_commit = loop.time() + self.commits.interval_s
        next_stats = loop.time() + 10.0
        next_topics = loop.time() + self._cfg.topic_check_s
        watchdog = Watchdog(self._cfg.watchdog_s, now=loop.time())
        log.info(
            "worker_started",
            worker=self.worker_id,
            topic=self._kafka.requests_topic,
            group=self._kafka.group_id,
        )
        while not stop.is_set():
            room = self._cfg.max_in_flight - book.in_flight
            if room <= 0:
                watchdog.progress(loop.time())  # holding back on purpose, not stuck
                await book.wait_changed(0.05)
            else:
                try:
                    messages = await self.consumer.getmany(
                        timeout_ms=100, max_records=min(room, self._cfg.fetch_max_records)
                    )
                except BrokerUnavailable as exc:
                    log.warning("fetch_failed", error=str(exc))
                    await asyncio.sleep(0.5)
                    messages = []
                if messages:
                    watchdog.progress(loop.time())
                    self._dispatch(messages)
            now = loop.time()
            stuck = await watchdog.check(self.consumer, now)
            if stuck is not None:
                await self._restart_consumer(*stuck)
                watchdog.progress(loop.time())
            if now >= next_commit:
                await self.commits.commit(self.consumer)
                next_commit = now + self.commits.interval_s
            if now >= next_stats:
                log.info("worker_stats", **self.snapshot())
                await self._record_lag()
                next_stats = now + 10.0
            if now >= next_topics:
                self._tasks.spawn(self.delivery.check_own_topics())
                next_topics = now + self._cfg.topic_check_s
        await self.drain()

    async def drain(self) -> None:
        """Wait (bounded) for fetched work to be answered, then commit what is complete."""
        self._stopping = True
        self.batcher.flush_all()
        book = self.commits.book
        idle = await book.wait_idle(None, self._cfg.shutdown_timeout_s)
        await self.commits.commit(self.consumer)
        log.info(
            "worker_drained",
            worker=self.worker_id,
            complete=idle,
            left_uncommitted=book.in_flight,
            **self.stats.as_dict(),
            **({"dedupe": self.dedupe.stats.as_dict()} if self.dedupe is not None else {}),
        )

    async def _restart_consumer(self, behind: int, stuck_s: float) -> None:
        """Replace a consumer that stopped fetching (aiokafka#1154): finish and commit what
        was fetched, leave the group, join again with a new consumer."""
        old = self.consumer
        log.warning(
            "consumer_stuck",
            worker=self.worker_id,
            stuck_s=round(stuck_s, 1),
            behind=behind,
            partitions=[str(p) for p in old.assignment()],
        )
        await self._on_revoked(old.assignment())
        await old.aclose()
        self.assigned.clear()
        self.stats.consumer_restarts += 1
        for attempt in range(1, 4):
            self._consumer = self._new_consumer()
            try:
                await self._consumer.start()
            except BrokerUnavailable as exc:
                await self._consumer.aclose()
                log.warning("consumer_restart_failed", attempt=attempt, error=str(exc))
                if attempt == 3:
                    raise  # exit loudly: a supervisor restarts a process, nothing restarts a hang
                await asyncio.sleep(attempt)
            else:
                break
        log.info("consumer_restarted", worker=self.worker_id, restarts=self.stats.consumer_restarts)

    # -- figures ---------------------------------------------------------------------------

    def _live_figures(self) -> dict[str, Any]:
        live: dict[str, Any] = {
            "cache": self.registry.cache.stats,
            "in_flight": self.in_flight,
            "assigned_partitions": 0
            if self._consumer is None
            else len(self._consumer.assignment()),
            "consumer_restarts": self.stats.consumer_restarts,
        }
        if self.listener is not None:
            live["updates_applied"] = self.listener.stats.applied
        return live

    async def _record_lag(self) -> None:
        if self.metrics is None or self._consumer is None:
            return
        try:
            lags = await self._consumer.lag()
        except BrokerUnavailable:
            return
        for partition, lag in lags.items():
            self.metrics.consumer_lag.labels(str(partition)).set(lag)

    def snapshot(self) -> dict[str, Any]:
        cache = self.registry.cache.stats
        return {
            "in_flight": self.in_flight,
            **self.stats.as_dict(),
            "cache_hit_rate": round(cache.hit_rate, 4),
            "cache_bytes": cache.bytes,
            "cache_loads": cache.loads,
            "updates_applied": None if self.listener is None else self.listener.stats.applied,
        }

    # -- rebalance -------------------------------------------------------------------------

    async def _on_revoked(self, partitions: list[Partition]) -> None:
        """Finish work of revoked partitions (bounded), commit it, then forget them."""
        if not partitions:
            return
        self.stats.rebalances += 1
        self.batcher.flush_all()  # waiting batches run now, so their partitions can commit
        timeout_s = min(self._cfg.shutdown_timeout_s, 5.0)
        idle, dropped = await self.commits.revoke(self.consumer, partitions, timeout_s=timeout_s)
        stopped = self.generation.cancel(partitions)  # their next owner generates them again
        if self.metrics is not None:
            for p in partitions:
                self.metrics.forget_partition(str(p))
        log.info(
            "partitions_revoked",
            partitions=[str(p) for p in partitions],
            finished=idle,
            dropped_uncommitted=dropped,
            generations_stopped=stopped,
        )

    async def _on_assigned(self, partitions: list[Partition]) -> None:
        if self.dedupe is not None:
            self.dedupe.assigned(partitions)
        if partitions:
            self.assigned.set()
        log.info("partitions_assigned", partitions=[str(p) for p in partitions])

    # -- dispatch --------------------------------------------------------------------------

    def _dispatch(self, messages: Sequence[Message]) -> None:
        """Read each message: dead letters and error results go out at once, the rest wait
        for their (model, version) batch; with dedupe, requests already answered are skipped
        (looked up in a task, while the loop fetches on)."""
        now_ms = time.time() * 1000
        started_ns = time.time_ns()
        book = self.commits.book
        if self.metrics is not None:
            self.metrics.requests.inc(len(messages))
        items: list[Item] = []
        for msg in messages:
            book.add(msg.partition, msg.offset)
            self.stats.received += 1
            try:
                items.append(read_item(msg, self.settings, now_ms))
            except UnreadableMessage as exc:
                self.tracing.unreadable(msg, exc, started_ns)
                self._tasks.spawn(self.delivery.dead_letter(msg, exc))
        self.tracing.consumed(items, started_ns)
        if self.dedupe is not None and any(self._suspect(it) for it in items):
            self._tasks.spawn(self._route_unanswered(items))
        else:
            self._route(items)

    def _route(self, items: list[Item]) -> None:
        """Error results at once, the rest to their batches."""
        groups: dict[BatchKey, list[Item]] = defaultdict(list)
        for item in items:
            request = item.request
            if request.error is not None:
                answer = error_result(request, request.error, worker=self.worker_id)
                self._tasks.spawn(
                    self.delivery.answer_all([item], self.delivery.reply([(item, answer)]))
                )
                continue
            if request.generation is not None:  # a prompt: streamed by the generation scheduler
                self.generation.submit(item)
                continue
            groups[(request.model, request.version)].append(item)
        for key, items in groups.items():
            if self.batcher.add(key, items, now=self._stopping):
                self._tasks.spawn(self.runner.prefetch(*key))

    def _suspect(self, item: Item) -> bool:
        """Whether another worker may have answered ``item`` already (dedupe looks it up)."""
        assert self.dedupe is not None
        return self.dedupe.may_be_answered(item.message.partition, item.message.timestamp_ms)

    async def _route_unanswered(self, items: list[Item]) -> None:
        self._route(await self._skip_answered(items))

    async def _skip_answered(self, items: list[Item]) -> list[Item]:
        """The items whose request id is not recorded as answered (one lookup); the others
        are finished as they are, so their offsets commit without a second answer."""
        assert self.dedupe is not None
        keyed = [it for it in items if it.request.id and self._suspect(it)]
        seen = await self.dedupe.answered(
            [(it.request.id, fingerprint(it.message)) for it in keyed]
        )
        if not any(seen):
            return items
        skip = {id(it) for it, s in zip(keyed, seen, strict=True) if s}
        book = self.commits.book
        for it in keyed:
            if id(it) in skip:
                book.finish(it.message.partition, it.message.offset)
        self.stats.skipped_answered += len(skip)
        if self.metrics is not None:
            self.metrics.dedupe_skipped.inc(len(skip))
        log.info("answered_skipped", count=len(skip))
        return [it for it in items if id(it) not in skip]

    def _run_batch(self, key: BatchKey, items: list[Item]) -> None:
        model, version = key
        self._tasks.spawn(
            self.delivery.answer_all(items, self.runner.run(model, version, items), model=model)
        )
