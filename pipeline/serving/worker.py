"""The inference worker: consume requests, batch per model, compute in threads, answer, commit.

At-least-once: a partition's offset is committed only once every message before it has its
result (or dead-letter record) acknowledged by the broker. A message never stops the worker:
unreadable bytes go to the dead-letter topic, wrong requests get an error result.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import os
import socket
import time
from collections import Counter, defaultdict
from collections import Counter as Tally
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog
from threadpoolctl import threadpool_limits

from pipeline.cache.cache import ParamCache, Source
from pipeline.config import Settings
from pipeline.errors import BrokerUnavailable, KvpipeError, RequestError, UnreadableMessage
from pipeline.io.kafka import (
    CommitRejected,
    Consumer,
    Message,
    MessageTooLarge,
    Partition,
    Producer,
    TopicDirectory,
)
from pipeline.io.npy import from_npy, to_npy
from pipeline.io.wire import (
    H_DLQ_REASON,
    H_DLQ_SOURCE,
    MAX_ECHO_CHARS,
    Request,
    Result,
    decode_request,
    encode_result,
    error_result,
    safe_text,
)
from pipeline.metrics import WorkerMetrics
from pipeline.params.models import Model
from pipeline.params.registry import ModelRegistry, Resolved, worst
from pipeline.params.updates import UpdateListener
from pipeline.resource import AsyncResource
from pipeline.serving.commits import OffsetTracker

log = structlog.get_logger("kvpipe.worker")


@dataclass
class WorkerStats:
    """Counters since the worker started."""

    received: int = 0
    ok: int = 0
    errors: int = 0
    dead_lettered: int = 0
    batches: int = 0
    batched_rows: int = 0
    commits: int = 0
    commit_failures: int = 0
    send_retries: int = 0
    batches_waited_on_load: int = 0
    memo_hits: int = 0
    memo_misses: int = 0
    memo_shared_hits: int = 0
    consumer_restarts: int = 0
    rebalances: int = 0
    topics_recreated: int = 0
    errors_by_code: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["errors_by_code"] = dict(self.errors_by_code)
        return out


@dataclass(slots=True)
class _MemoSplit:
    """A batch split by the result cache (see ``Worker._memo_split``)."""

    hits: list[tuple[_Item, Any]] = field(default_factory=list)
    misses: list[_Item] = field(default_factory=list)
    keys: list[tuple[str, str, int, bytes]] = field(default_factory=list)
    repeats: list[tuple[_Item, int]] = field(default_factory=list)
    owned: list[asyncio.Future[Any]] = field(default_factory=list)  # one per key, for others
    borrowed: list[tuple[_Item, asyncio.Future[Any]]] = field(default_factory=list)


@dataclass(slots=True)
class _Item:
    message: Message
    request: Request
    answered: bool = False  # an answer (result or dead letter) was handed to delivery


@dataclass(slots=True)
class _Outgoing:
    item: _Item
    topic: str
    value: bytes
    headers: list[tuple[str, bytes]]
    result: Result | None  # None: a dead letter
    key: bytes | None


QUIET_CODES = frozenset({
    # the client's own mistakes, answered in the result; not worth a warning each
    "unknown_model", "unknown_version", "bad_shape", "bad_dtype", "bad_ids", "non_finite",
    "too_large", "bad_request", "bad_input", "deadline_exceeded", "bad_reply_to",
    "non_finite_output",
    # logged once per batch as params_failed
    "params_unavailable", "params_corrupt",
})  # fmt: skip


def _stack(requests: list[Request]) -> npt.NDArray[Any]:
    arrays = [r.inputs for r in requests if r.inputs is not None]
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def _input_problem(model: Model, request: Request) -> KvpipeError | None:
    """Why ``request`` cannot run on ``model`` (width, dtype, id range), or None."""
    x = request.inputs
    assert x is not None
    if model.kind == "embedding":
        if x.dtype.kind not in "iu":
            return RequestError('this model scores integer ids: send "ids"', code="bad_dtype")
        why = model.check_ids(x)  # type: ignore[attr-defined]
        return None if why is None else RequestError(why, code="bad_ids")
    if x.shape[1] != model.input_dim:
        return RequestError(
            f"inputs have {x.shape[1]} columns; the model takes {model.input_dim}",
            code="bad_shape",
        )
    return None


def _forward(model: Model, params: Mapping[str, Any], x: Any) -> tuple[Any, bool]:
    """The model's outputs, and whether every one is finite (checked in the compute thread)."""
    with np.errstate(over="ignore", invalid="ignore"):  # non-finite outputs are answered
        y = model.forward(params, x)
    return y, bool(np.isfinite(y).all())


def _retrieve(fut: asyncio.Future[Any]) -> None:
    """Mark a shared future's exception as seen (each waiter handles it)."""
    if not fut.cancelled():
        fut.exception()


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
    ) -> None:
        self.settings = settings
        self._consumer_factory = consumer_factory
        self.registry = registry
        self.producer = producer
        self.listener = listener
        self.metrics = metrics
        if metrics is not None:
            metrics.bind(self._live_figures)
        self.worker_id = settings.worker.worker_id or default_worker_id()
        self.stats = WorkerStats()
        self._kafka = settings.kafka
        self._limits = settings.limits
        self._cfg = settings.worker
        self._consumer: Consumer | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._tracker_tasks: set[asyncio.Task[None]] = set()
        self._tracker = OffsetTracker()
        self._stopping = False
        self._abandon = asyncio.Event()
        self.assigned = asyncio.Event()
        self._corrupt_logged: set[tuple[str, str]] = set()
        self._topics = TopicDirectory(producer.existing_topics)
        self._own_topics = {self._kafka.results_topic, self._kafka.dlq_topic}
        self._pending: dict[tuple[str, int | None], list[_Item]] = {}
        self._pending_rows: dict[tuple[str, int | None], int] = {}
        self._timers: dict[tuple[str, int | None], asyncio.TimerHandle] = {}
        self._memo: ParamCache[Any] | None = None
        self._memo_pending: dict[tuple[str, str, int, bytes], asyncio.Future[Any]] = {}
        if settings.cache.result_models:
            self._memo = ParamCache(
                capacity_bytes=settings.cache.result_bytes,
                ttl_s=settings.cache.ttl_s,
                entry_overhead_bytes=400,
            )
        self._closed = False

    @property
    def consumer(self) -> Consumer:
        if self._consumer is None:
            raise RuntimeError("worker is not started; use 'async with Worker(...)'")
        return self._consumer

    @property
    def in_flight(self) -> int:
        return self._tracker.in_flight

    async def start(self) -> None:
        # Compute threads already use the cores; BLAS threads inside each would oversubscribe
        # them and starve the event loop (measured: about 30% fewer requests per second).
        threadpool_limits(limits=self._cfg.blas_threads, user_api="blas")
        self._executor = ThreadPoolExecutor(
            max_workers=self._cfg.compute_threads, thread_name_prefix="kvpipe-compute"
        )
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
        for timer in self._timers.values():
            timer.cancel()
        tasks = list(self._tracker_tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
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
        next_commit = loop.time() + self._cfg.commit_interval_s
        next_stats = loop.time() + 10.0
        next_topics = loop.time() + self._cfg.topic_check_s
        watchdog_s = self._cfg.watchdog_s
        watch_every = min(watchdog_s / 4, 5.0)
        progress = next_watch = loop.time()
        behind_since: float | None = None
        log.info(
            "worker_started",
            worker=self.worker_id,
            topic=self._kafka.requests_topic,
            group=self._kafka.group_id,
        )
        while not stop.is_set():
            room = self._cfg.max_in_flight - self._tracker.in_flight
            if room <= 0:
                progress = loop.time()  # holding back on purpose, not stuck
                await self._tracker.wait_changed(0.05)
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
                    progress = loop.time()
                    self._dispatch(messages)
            now = loop.time()
            if watchdog_s and now >= next_watch and now - progress >= watch_every:
                # Stuck = behind the broker's end for watchdog_s with nothing fetched; an idle
                # worker that is caught up is not stuck, so waiting starts when it falls behind.
                next_watch = now + watch_every
                behind = await self.consumer.behind()
                if not behind:
                    behind_since = None
                elif behind_since is None or behind_since < progress:
                    behind_since = now
                elif now - behind_since >= watchdog_s:
                    await self._restart_consumer(behind, now - behind_since)
                    progress, behind_since = loop.time(), None
            if now >= next_commit:
                await self._commit()
                next_commit = now + self._cfg.commit_interval_s
            if now >= next_stats:
                log.info("worker_stats", **self.snapshot())
                await self._record_lag()
                next_stats = now + 10.0
            if now >= next_topics:
                self._spawn(self._check_own_topics())
                next_topics = now + self._cfg.topic_check_s
        await self.drain()

    async def drain(self) -> None:
        """Wait (bounded) for fetched work to be answered, then commit what is complete."""
        self._stopping = True
        for key in list(self._pending):
            self._flush(key)
        idle = await self._tracker.wait_idle(None, self._cfg.shutdown_timeout_s)
        await self._commit()
        log.info(
            "worker_drained",
            worker=self.worker_id,
            complete=idle,
            left_uncommitted=self._tracker.in_flight,
            **self.stats.as_dict(),
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

    def _live_figures(self) -> dict[str, Any]:
        live: dict[str, Any] = {
            "cache": self.registry.cache.stats,
            "in_flight": self._tracker.in_flight,
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
            "in_flight": self._tracker.in_flight,
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
        for key in list(self._pending):
            self._flush(key)  # waiting batches run now, so their partitions can commit
        idle = await self._tracker.wait_idle(partitions, min(self._cfg.shutdown_timeout_s, 5.0))
        offsets = self._tracker.committable(partitions)
        try:
            await self.consumer.commit(offsets)  # type: ignore[arg-type]
            self._tracker.committed(offsets)
        except (CommitRejected, BrokerUnavailable) as exc:
            self.stats.commit_failures += 1
            log.warning("commit_on_revoke_failed", error=str(exc))
        dropped = self._tracker.forget(partitions)
        if self.metrics is not None:
            for p in partitions:
                self.metrics.forget_partition(str(p))
        log.info(
            "partitions_revoked",
            partitions=[str(p) for p in partitions],
            finished=idle,
            dropped_uncommitted=dropped,
        )

    async def _on_assigned(self, partitions: list[Partition]) -> None:
        if partitions:
            self.assigned.set()
        log.info("partitions_assigned", partitions=[str(p) for p in partitions])

    async def _commit(self) -> None:
        offsets = self._tracker.committable()
        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)  # type: ignore[arg-type]
        except (CommitRejected, BrokerUnavailable) as exc:
            self.stats.commit_failures += 1
            log.warning("commit_failed", error=str(exc))
            return
        self._tracker.committed(offsets)
        self.stats.commits += 1

    # -- dispatch --------------------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tracker_tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tracker_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task_failed", error=repr(task.exception()))

    def _dispatch(self, messages: Sequence[Message]) -> None:
        groups: dict[tuple[str, int | None], list[_Item]] = defaultdict(list)
        now_ms = time.time() * 1000
        if self.metrics is not None:
            self.metrics.requests.inc(len(messages))
        for msg in messages:
            self._tracker.add(msg.partition, msg.offset)
            self.stats.received += 1
            try:
                request = decode_request(msg.value, msg.headers, self._limits)
            except UnreadableMessage as exc:
                self._spawn(self._dead_letter(msg, exc))
                continue
            except Exception as exc:  # a decoder bug must not stop the worker
                log.exception("decode_failed", source=f"{msg.partition}@{msg.offset}")
                reason = UnreadableMessage(
                    f"internal error: {type(exc).__name__}: {exc}", code="internal"
                )
                self._spawn(self._dead_letter(msg, reason))
                continue
            item = _Item(msg, request)
            if request.reply_to is not None and not self._kafka.reply_allowed(request.reply_to):
                refused, request.reply_to = request.reply_to, None  # answered on the results topic
                request.error = request.error or RequestError(
                    f"reply-to topic {refused!r} is not allowed (KVPIPE_REPLY_TOPICS)",
                    code="bad_reply_to",
                )
            if (
                request.error is None
                and request.deadline_ms is not None
                and now_ms > request.deadline_ms
            ):
                request.error = RequestError(
                    "deadline passed before the request was run", code="deadline_exceeded"
                )
            if request.error is not None:
                answer = error_result(request, request.error, worker=self.worker_id)
                self._spawn(self._answer_all([item], self._reply([(item, answer)])))
                continue
            groups[(request.model, request.version)].append(item)
        for key, items in groups.items():
            self._pending.setdefault(key, []).extend(items)
            self._pending_rows[key] = self._pending_rows.get(key, 0) + sum(
                it.request.rows for it in items
            )
            wait_s = self._cfg.max_wait_ms / 1000
            if self._stopping or wait_s <= 0 or self._pending_rows[key] >= self._cfg.max_batch_size:
                self._flush(key)
            elif key not in self._timers:
                self._timers[key] = asyncio.get_running_loop().call_later(wait_s, self._flush, key)
                self._spawn(self._prefetch(*key))

    async def _prefetch(self, model: str, version: int | None) -> None:
        """While a batch fills, load what it will need (single-flight: the batch joins it)."""
        with contextlib.suppress(KvpipeError):  # the batch meets the same error, answers it
            await self.registry.resolve(model, version)

    def _flush(self, key: tuple[str, int | None]) -> None:
        """Run what waits for one (model, version) as batches of at most max_batch_size rows."""
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        items = self._pending.pop(key, [])
        self._pending_rows.pop(key, None)
        model, version = key
        limit = self._cfg.max_batch_size
        chunk: list[_Item] = []
        rows = 0
        for item in items:
            if chunk and rows + item.request.rows > limit:
                self._spawn(self._run_batch(model, version, chunk))
                chunk, rows = [], 0
            chunk.append(item)
            rows += item.request.rows
        if chunk:
            self._spawn(self._run_batch(model, version, chunk))

    async def _run_batch(self, model: str, version: int | None, items: list[_Item]) -> None:
        await self._answer_all(items, self._batch(model, version, items), model=model)

    async def _answer_all(self, items: list[_Item], work: Awaitable[None], **where: Any) -> None:
        """Run ``work``, which answers ``items``; whatever fails in it, every item not yet
        answered still gets one (an internal error result, else a dead letter), so no
        partition is left with an offset that can never be committed."""
        try:
            await work
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("batch_failed", requests=len(items), **where)
            failure = KvpipeError(f"internal error: {type(exc).__name__}: {exc}")
        left = [it for it in items if not it.answered]
        try:
            await self._reply(
                [(it, error_result(it.request, failure, worker=self.worker_id)) for it in left]
            )
        except Exception:
            log.exception("reply_failed", requests=len(left), **where)
            left = [it for it in left if not it.answered]
            for it in left:
                it.answered = True
            await self._deliver([self._dead_letter_out(it, failure) for it in left])

    async def _batch(self, model: str, version: int | None, items: list[_Item]) -> None:
        started = time.perf_counter()
        started_wall = time.time() * 1000
        answers: list[tuple[_Item, Result]] = []
        try:
            resolved = await self.registry.resolve(model, version)
            if resolved.source is not Source.HIT:
                self.stats.batches_waited_on_load += 1
            good = self._admit(resolved, items, answers)
            params, source = resolved.params, resolved.source
            if good and resolved.model.kind == "embedding":
                ids = _stack([it.request for it in good])
                rows, rows_source = await self.registry.rows(resolved, ids)
                params = {**params, **rows}
                source = worst([source, rows_source])
        except KvpipeError as exc:
            self._log_params_failure(model, version, exc, len(items))
            answered = {id(it) for it, _ in answers}
            answers += [
                (it, error_result(it.request, exc, worker=self.worker_id))
                for it in items
                if id(it) not in answered
            ]
            await self._reply(answers)
            return
        loaded = time.perf_counter()
        memo = await self._memo_split(resolved, good)
        memo_timings = {"load_ms": round((loaded - started) * 1000, 3), "compute_ms": 0.0}
        try:
            if memo is not None:
                good = memo.misses
                answers += self._ok_results(
                    memo.hits, resolved.version, "memo", False, started_wall, memo_timings
                )
            await self._compute_batch(
                model, resolved, params, source, good, memo, answers, started, loaded, started_wall,
                memo_timings,
            )  # fmt: skip
        finally:
            if memo is not None:
                self._memo_release(memo)
        if memo is not None and memo.borrowed:
            answers += await self._memo_borrowed(memo, resolved.version, started_wall, memo_timings)
        for _, res in answers:
            if res.version is None:
                res.version = resolved.version
        await self._reply(answers)

    async def _compute_batch(
        self,
        model: str,
        resolved: Resolved,
        params: Any,
        source: Source,
        good: list[_Item],
        memo: _MemoSplit | None,
        answers: list[tuple[_Item, Result]],
        started: float,
        loaded: float,
        started_wall: float,
        memo_timings: dict[str, float],
    ) -> None:
        """Compute ``good`` as one batch; append its answers (and its in-batch repeats')."""
        if good:
            try:
                outputs = await self._compute(resolved.model, params, [it.request for it in good])
            except Exception as exc:
                log.exception("compute_failed", model=model, version=resolved.version)
                failure = KvpipeError(f"compute failed: {type(exc).__name__}: {exc}")
                failed = good + ([it for it, _ in memo.repeats] if memo is not None else [])
                answers += [
                    (it, error_result(it.request, failure, worker=self.worker_id)) for it in failed
                ]
            else:
                computed = time.perf_counter()
                n_rows = sum(it.request.rows for it in good)
                self.stats.batches += 1
                self.stats.batched_rows += n_rows
                if self.metrics is not None:
                    queue_s = max(0.0, started_wall - good[0].message.timestamp_ms) / 1000
                    self.metrics.record_batch(
                        model,
                        resolved.version,
                        n_rows,
                        queue_s,
                        loaded - started,
                        computed - loaded,
                    )
                if memo is not None:
                    self._memo_store(memo, outputs)
                    answers += self._ok_results(
                        [(it, outputs[j]) for it, j in memo.repeats],
                        resolved.version,
                        "memo",
                        source is Source.STALE,
                        started_wall,
                        memo_timings,
                    )
                timings = {
                    "load_ms": round((loaded - started) * 1000, 3),
                    "compute_ms": round((computed - loaded) * 1000, 3),
                }
                answers += self._ok_results(
                    list(zip(good, outputs, strict=True)),
                    resolved.version,
                    source.value,
                    source is Source.STALE,
                    started_wall,
                    timings,
                )

    def _ok_results(
        self,
        pairs: list[tuple[_Item, Any]],
        version: int,
        cache: str,
        stale: bool,
        started_wall: float,
        timings: dict[str, float],
    ) -> list[tuple[_Item, Result]]:
        """Ok results for (item, outputs) pairs, with queue and total times per request."""
        done_wall = time.time() * 1000
        out: list[tuple[_Item, Result]] = []
        for it, outputs in pairs:
            if isinstance(outputs, KvpipeError):  # this request's outputs were not finite
                bad = error_result(it.request, outputs, worker=self.worker_id)
                bad.version = version
                out.append((it, bad))
                continue
            sent = it.message.timestamp_ms
            out.append(
                (
                    it,
                    Result(
                        id=it.request.id,
                        model=it.request.model,
                        status="ok",
                        version=version,
                        outputs=outputs,
                        cache=cache,
                        stale=stale,
                        worker=self.worker_id,
                        timings={
                            "queue_ms": round(max(0.0, started_wall - sent), 3),
                            **timings,
                            "total_ms": round(max(0.0, done_wall - sent), 3),
                        },
                    ),
                )
            )
        return out

    def _memo_key(self, resolved: Resolved, request: Request) -> tuple[str, str, int, bytes]:
        x = request.inputs
        assert x is not None
        digest = hashlib.blake2b(x.tobytes(), digest_size=16)
        digest.update(f"{x.dtype.str}{x.shape}".encode())
        return ("out", resolved.name, resolved.version, digest.digest())

    def _memo_on(self, resolved: Resolved) -> bool:
        """Result memoization: opted in per model, dense models only (embedding rows change
        without a new version, so their outputs cannot be keyed by version)."""
        if self._memo is None or resolved.model.kind != "dense":
            return False
        chosen = self.settings.cache.result_models
        return "*" in chosen or resolved.name in chosen

    async def _memo_split(self, resolved: Resolved, items: list[_Item]) -> _MemoSplit | None:
        """Split a batch by the result cache: answered already (here or, when shared, in
        Redis), being computed by another batch, to compute, and repeats of an input earlier
        in this same batch (computed once, answered for each)."""
        if not items or not self._memo_on(resolved):
            return None
        assert self._memo is not None
        split = _MemoSplit()
        first: dict[tuple[str, str, int, bytes], int] = {}
        loop = asyncio.get_running_loop()
        for it in items:
            key = self._memo_key(resolved, it.request)
            out = self._memo.peek(key)
            if out is not None:
                split.hits.append((it, out))
            elif key in first:
                split.repeats.append((it, first[key]))
            elif key in self._memo_pending:  # another batch is computing this input
                split.borrowed.append((it, self._memo_pending[key]))
            else:
                first[key] = len(split.misses)
                split.misses.append(it)
                split.keys.append(key)
                fut: asyncio.Future[Any] = loop.create_future()
                fut.add_done_callback(_retrieve)
                self._memo_pending[key] = fut
                split.owned.append(fut)
        if split.misses and self.settings.cache.result_shared_ttl_s > 0:
            await self._memo_shared(resolved, split)
        self.stats.memo_hits += len(split.hits) + len(split.repeats) + len(split.borrowed)
        self.stats.memo_misses += len(split.misses)
        return split

    async def _memo_shared(self, resolved: Resolved, split: _MemoSplit) -> None:
        """Move the misses another worker already answered (kept in Redis) to the hits.

        This batch owns those keys while it asks, so no batch here computes them meanwhile.
        Redis trouble costs the lookup, never the answer: the misses are computed.
        """
        assert self._memo is not None
        try:
            blobs = await self.registry.store.read_outputs(
                resolved.name, resolved.version, [k[3] for k in split.keys]
            )
        except KvpipeError as exc:
            log.debug("memo_shared_read_failed", error=str(exc))
            return
        found: dict[int, Any] = {}
        for i, (it, blob) in enumerate(zip(split.misses, blobs, strict=True)):
            out = self._shared_output(resolved, it.request, blob)
            if out is not None:
                found[i] = out
        if not found:
            return
        kept = _MemoSplit(hits=split.hits, borrowed=split.borrowed)
        index: dict[int, int] = {}
        for i, (it, key, fut) in enumerate(zip(split.misses, split.keys, split.owned, strict=True)):
            if i in found:
                self._memo.put(key, found[i])
                fut.set_result(found[i])
                del self._memo_pending[key]
                kept.hits.append((it, found[i]))
            else:
                index[i] = len(kept.misses)
                kept.misses.append(it)
                kept.keys.append(key)
                kept.owned.append(fut)
        for it, j in split.repeats:
            if j in found:
                kept.hits.append((it, found[j]))
            else:
                kept.repeats.append((it, index[j]))
        self.stats.memo_shared_hits += len(found)
        split.hits, split.misses, split.keys = kept.hits, kept.misses, kept.keys
        split.owned, split.repeats = kept.owned, kept.repeats

    def _shared_output(self, resolved: Resolved, request: Request, blob: bytes | None) -> Any:
        """A shared output, if it is one: float32 ``.npy`` of the shape this request gets."""
        if blob is None:
            return None
        try:
            out = from_npy(blob, max_elements=request.rows * resolved.model.output_dim)
        except ValueError:
            return None
        if out.dtype != np.float32 or out.shape != (request.rows, resolved.model.output_dim):
            return None
        out.flags.writeable = False
        return out

    def _memo_store(self, split: _MemoSplit, outputs: list[Any]) -> None:
        """Keep the outputs, hand them to batches waiting for the same inputs, and (when
        shared) copy them to Redis in the background."""
        assert self._memo is not None
        share = self.settings.cache.result_shared_ttl_s
        blobs: dict[bytes, bytes] = {}
        for key, fut, out in zip(split.keys, split.owned, outputs, strict=True):
            if isinstance(out, KvpipeError):  # not kept: answered as an error, never memoized
                if not fut.done():
                    fut.set_exception(out)
                continue
            out = np.array(out)  # its own buffer: a split view would pin the whole batch
            out.flags.writeable = False
            self._memo.put(key, out)
            if not fut.done():
                fut.set_result(out)
            if share > 0:
                blobs[key[3]] = to_npy(out)
        if blobs:
            _, model, version, _ = split.keys[0]
            self._spawn(self._memo_share(model, version, blobs, share))

    async def _memo_share(
        self, model: str, version: int, blobs: dict[bytes, bytes], ttl: float
    ) -> None:
        try:
            await self.registry.store.write_outputs(model, version, blobs, ttl)
        except KvpipeError as exc:
            log.debug("memo_shared_write_failed", error=str(exc))

    def _memo_release(self, split: _MemoSplit) -> None:
        """Whatever happened to the batch, no other batch waits for it any longer."""
        for key, fut in zip(split.keys, split.owned, strict=True):
            if not fut.done():
                fut.set_exception(KvpipeError("the batch computing this input failed"))
            if self._memo_pending.get(key) is fut:
                del self._memo_pending[key]

    async def _memo_borrowed(
        self, split: _MemoSplit, version: int, started_wall: float, timings: dict[str, float]
    ) -> list[tuple[_Item, Result]]:
        """Answers to inputs another batch computed meanwhile (its error if it failed)."""
        pairs: list[tuple[_Item, Any]] = []
        errors: list[tuple[_Item, Result]] = []
        for it, fut in split.borrowed:
            try:
                pairs.append((it, await asyncio.shield(fut)))
            except KvpipeError as exc:
                errors.append((it, error_result(it.request, exc, worker=self.worker_id)))
        return self._ok_results(pairs, version, "memo", False, started_wall, timings) + errors

    def _log_params_failure(
        self, model: str, version: int | None, exc: KvpipeError, requests: int
    ) -> None:
        """A warning per failed batch, except corrupt parameters: once per message."""
        if exc.code == "params_corrupt":
            key = (model, str(exc))
            if key in self._corrupt_logged:
                return
            if len(self._corrupt_logged) >= 1000:  # bounded: start over, each logged once more
                self._corrupt_logged.clear()
            self._corrupt_logged.add(key)
            log.error("params_corrupt", model=model, version=version, error=str(exc))
            return
        # a model nobody published is the client's mistake, answered in its results
        level = log.debug if exc.code in ("unknown_model", "unknown_version") else log.warning
        level(
            "params_failed",
            model=model,
            version=version,
            code=exc.code,
            error=str(exc),
            requests=requests,
        )

    def _admit(
        self, resolved: Resolved, items: list[_Item], answers: list[tuple[_Item, Result]]
    ) -> list[_Item]:
        """The items this model can run; the others get their error result in ``answers``."""
        model = resolved.model
        good: list[_Item] = []
        for it in items:
            problem = _input_problem(model, it.request)
            if problem is None:
                good.append(it)
            else:
                answers.append((it, error_result(it.request, problem, worker=self.worker_id)))
        return good

    async def _compute(
        self, model: Model, params: Mapping[str, Any], requests: list[Request]
    ) -> list[Any]:
        x = _stack(requests)
        if model.kind == "dense" and x.dtype != np.float32:
            x = x.astype(np.float32)
        loop = asyncio.get_running_loop()
        y, finite = await loop.run_in_executor(self._executor, _forward, model, params, x)
        bounds = np.cumsum([r.rows for r in requests])[:-1]
        outputs: list[Any] = np.split(y, bounds)
        if not finite:
            for i, out in enumerate(outputs):
                if not np.isfinite(out).all():
                    outputs[i] = KvpipeError(
                        "the model's output is NaN or infinite for these inputs",
                        code="non_finite_output",
                    )
        return outputs

    # -- output ----------------------------------------------------------------------------

    def _dead_letter_out(self, item: _Item, exc: KvpipeError) -> _Outgoing:
        """The original message, bound for the dead-letter topic with the reason."""
        msg = item.message
        reason = f"{exc.code}: {exc}"[:900]
        headers = [(k, v) for k, v in msg.headers if k not in (H_DLQ_REASON, H_DLQ_SOURCE)]
        headers += [
            (H_DLQ_REASON, reason.encode("utf-8", "backslashreplace")),
            (H_DLQ_SOURCE, f"{msg.partition}@{msg.offset}".encode()),
        ]
        log.warning("dead_lettered", source=f"{msg.partition}@{msg.offset}", reason=reason)
        self.stats.dead_lettered += 1
        if self.metrics is not None:
            self.metrics.dead_letters.inc()
        return _Outgoing(item, self._kafka.dlq_topic, msg.value or b"", headers, None, msg.key)

    async def _dead_letter(self, msg: Message, exc: UnreadableMessage) -> None:
        item = _Item(msg, Request(id="", model="", inputs=None), answered=True)
        await self._deliver([self._dead_letter_out(item, exc)])

    async def _reply(self, answers: list[tuple[_Item, Result]]) -> None:
        """Answer each request on its topic. One answer that cannot be encoded or routed
        costs no other its answer: it becomes an error result, or at worst a dead letter."""
        if not answers:
            return
        since = max(it.message.timestamp_ms for it, _ in answers) / 1000
        wanted = {it.request.reply_to for it, _ in answers if it.request.reply_to is not None}
        missing = await self._topics.missing(wanted, since=since) if wanted else set()
        outgoing: list[_Outgoing] = []
        for item, result in answers:
            if item.request.reply_to in missing:
                result = self._unroutable(item, result)
            outgoing.append(self._encode(item, result))
            item.answered = True
        try:
            self._count([o.result for o in outgoing if o.result is not None])
        except Exception:  # counting must never cost an answer
            log.exception("count_failed")
        await self._deliver(outgoing)

    def _unroutable(self, item: _Item, result: Result) -> Result:
        """The error result for a reply-to topic that does not exist (sent to results)."""
        topic, item.request.reply_to = item.request.reply_to, None
        err = RequestError(
            f"reply-to topic {topic!r} does not exist; create it before sending requests",
            code="bad_reply_to",
        )
        out = error_result(item.request, err, worker=self.worker_id)
        out.version = result.version
        return out

    def _encode(self, item: _Item, result: Result) -> _Outgoing:
        """The message answering ``item``; if ``result`` cannot be encoded, an internal error
        result instead, and if not even that, the request as a dead letter."""
        topic = item.request.reply_to or self._kafka.results_topic
        try:
            value, headers = encode_result(result, item.request.content_type)
            return _Outgoing(item, topic, value, headers, result, result.id.encode())
        except Exception as exc:
            log.exception("encode_failed", request_id=safe_text(result.id, 80))
            reason = f"internal error: result not encodable: {type(exc).__name__}: {exc}"
        try:
            fallback = Result(
                id=result.id,
                model=safe_text(result.model, MAX_ECHO_CHARS),
                status="error",
                version=result.version,
                error_code="internal",
                error_message=safe_text(reason, 500),
                worker=self.worker_id,
            )
            value, headers = encode_result(fallback)
            return _Outgoing(item, topic, value, headers, fallback, fallback.id.encode())
        except Exception:
            return self._dead_letter_out(item, KvpipeError(reason, code="internal"))

    def _count(self, results: list[Result]) -> None:
        if self.metrics is not None:
            self.metrics.record_results(
                Tally((r.model, r.status, r.error_code or "") for r in results),
                [r.timings["total_ms"] / 1000 for r in results if "total_ms" in r.timings],
            )
        for result in results:
            if result.ok:
                self.stats.ok += 1
                continue
            self.stats.errors += 1
            self.stats.errors_by_code[result.error_code or "internal"] += 1
            level = log.debug if result.error_code in QUIET_CODES else log.warning
            level(
                "request_failed",
                request_id=result.id,
                model=result.model,
                code=result.error_code,
                error=result.error_message,
            )

    async def _deliver(self, outgoing: list[_Outgoing]) -> None:
        """Send and wait for acks; retry what failed until it lands or the worker abandons.
        A message is finished (its offset committable) only when the broker acknowledged it."""
        delay = 0.1
        while outgoing:
            futures: list[tuple[_Outgoing, asyncio.Future[Any] | None]] = []
            try:
                async with asyncio.timeout(self.producer.send_timeout_s):
                    for out in outgoing:
                        futures.append(await self._enqueue(out))
            except TimeoutError:
                futures += [(out, None) for out in outgoing[len(futures) :]]
            live = [f for _, f in futures if f is not None]
            if live:
                await asyncio.wait(live, timeout=self.producer.send_timeout_s)
            failed: list[_Outgoing] = []
            reasons: set[str] = set()
            for out, fut in futures:
                if (
                    fut is not None
                    and fut.done()
                    and not fut.cancelled()
                    and fut.exception() is None
                ):
                    self._tracker.finish(out.item.message.partition, out.item.message.offset)
                    continue
                if fut is None or not fut.done():
                    reasons.add("not acknowledged in time")
                    if fut is not None:
                        fut.cancel()
                elif not fut.cancelled():
                    reasons.add(type(fut.exception()).__name__)
                failed.append(out)
            if not failed:
                return
            self.stats.send_retries += len(failed)
            log.warning(
                "send_failed",
                count=len(failed),
                topics=sorted({o.topic for o in failed})[:10],
                reasons=sorted(reasons),
                retry_in_s=delay,
            )
            if self._abandon.is_set():
                return
            failed = await self._reroute(failed)
            try:
                await asyncio.wait_for(self._abandon.wait(), delay)
                return
            except TimeoutError:
                pass
            delay = min(delay * 2, 5.0)
            outgoing = failed

    async def _reroute(self, failed: list[_Outgoing]) -> list[_Outgoing]:
        """After failed sends: a client's reply topic that is gone gets its answer on the
        results topic instead; a kvpipe topic that is gone is said loudly and created again."""
        missing = await self._topics.absent({o.topic for o in failed})
        if not missing:
            return failed
        await self._recreate(missing & self._own_topics)
        out: list[_Outgoing] = []
        for o in failed:
            if o.topic in missing and o.topic not in self._own_topics and o.result is not None:
                o = self._encode(o.item, self._unroutable(o.item, o.result))
            out.append(o)
        return out

    async def _check_own_topics(self) -> None:
        """Periodically: a results or DLQ topic deleted while serving is created again (some
        brokers acknowledge sends into a deleted topic, so failed sends alone can miss it)."""
        await self._recreate(await self._topics.absent(self._own_topics))

    async def _recreate(self, topics: set[str]) -> None:
        if not topics:
            return
        log.error(
            "topic_missing",
            topics=sorted(topics),
            action="creating it again; answers stay uncommitted until they are acknowledged",
        )
        try:
            await self.producer.create_topics(sorted(topics))
        except KvpipeError as exc:
            log.error("topic_create_failed", topics=sorted(topics), error=str(exc))
            return
        self.stats.topics_recreated += len(topics)
        await self._topics.refresh()

    async def _enqueue(self, out: _Outgoing) -> tuple[_Outgoing, asyncio.Future[Any] | None]:
        for _ in range(2):
            try:
                fut = await self.producer.enqueue(
                    out.topic,
                    out.value,
                    key=out.key,
                    headers=out.headers,
                    partition=self._partition_for(out),
                )
                return out, fut
            except MessageTooLarge as exc:
                out = self._shrink(out, exc)
            except BrokerUnavailable:
                return out, None
        return out, None

    def _partition_for(self, out: _Outgoing) -> int | None:
        """The request's partition number modulo the topic's partitions: the answers to one
        request partition stay in order on one partition, and no key is hashed per message.
        None (hash the key) until the producer knows the topic."""
        n = self.producer.partition_count(out.topic)  # from its metadata: a dict lookup
        return None if n is None else out.item.message.partition.partition % n

    def _shrink(self, out: _Outgoing, exc: MessageTooLarge) -> _Outgoing:
        """Replace a message too large to send by a small one that says so."""
        if out.result is None:  # a dead letter: keep the reason, cut the payload
            cut = [*out.headers, ("kvpipe-dlq-truncated", b"1")]
            return _Outgoing(out.item, out.topic, out.value[:1024], cut, None, out.key)
        err = KvpipeError(str(exc), code="result_too_large")
        small = error_result(out.item.request, err, worker=self.worker_id)
        small.version = out.result.version
        self.stats.errors_by_code["result_too_large"] += 1
        return self._encode(out.item, small)
