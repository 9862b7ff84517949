"""Generation in the worker: prefill with reused prefix keys/values, decode in batches, stream.

A request with a ``prompt`` comes here instead of the batcher. Its sequence resolves the model
(one version for its whole life), waits until its keys/values fit the scheduler's budget,
finds the longest cached prefix (:mod:`pipeline.params.prefix`), prefills the rest one chunk
at a time in the compute threads, one chunk of any request at a time (so neither a long prompt
nor a burst of new ones holds the running streams for long; a chunk another request is
computing is joined, not computed twice), then joins the decode group of its (model, version):
every step advances up to ``max_batch`` of the group's sequences (in turn) by one token in one
numpy call (:meth:`Transformer.decode`) on a decode thread of its own. The chunks it computed
go to Redis once its first token is out.

Each new token goes out at once as a stream message on the request's topic and partition (the
request's partition number, like every answer), not waited for; the final message carries every
token, so a lost progress message costs nothing. The request's offset is finished only when the
final message is acknowledged (:meth:`Delivery.deliver`), so a partition's commits wait behind
a running generation: bounded by ``max_tokens`` and the deadline, never past its answer.
"""

from __future__ import annotations

import asyncio
import codecs
import time
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import structlog

from pipeline.config import Settings
from pipeline.errors import KvpipeError, RequestError
from pipeline.io.stream import GenerationSpec, StreamMessage, encode_stream
from pipeline.io.wire import H_CONTENT_TYPE, JSON, Result, Status, error_result
from pipeline.params.keys import PrefixKey
from pipeline.params.prefix import PrefixCache, Reuse
from pipeline.params.registry import ModelRegistry, Resolved
from pipeline.params.transformer import EOS, KVState, Transformer, sample, transformer_of
from pipeline.resource import AsyncResource
from pipeline.serving.delivery import Delivery, Outgoing
from pipeline.serving.item import Item
from pipeline.serving.stats import WorkerStats

log = structlog.get_logger("kvpipe.generation")

T = TypeVar("T")
_JSON_HEADERS = [(H_CONTENT_TYPE, JSON.encode())]


@dataclass(eq=False)
class Generation:
    """One generation in progress."""

    item: Item
    spec: GenerationSpec
    resolved: Resolved
    model: Transformer
    state: KVState
    rng: np.random.Generator
    topic: str
    partition: int | None
    started: float  # perf_counter at dispatch
    queue_ms: float
    reuse: Reuse | None = None
    tokens: list[int] = field(default_factory=list)
    text: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace")
    )
    seq: int = 0
    computed: int = 0  # prompt tokens this request computed itself
    joined: int = 0  # prompt tokens another request computed for it (single-flight)
    #: Chunks this request computed, written to Redis once its first token is out.
    unshared: list[tuple[PrefixKey, Any]] = field(default_factory=list)
    kv_reserved: int = 0  # bytes of the scheduler's key/value budget this sequence holds
    timings: dict[str, float] = field(default_factory=dict)
    done: asyncio.Future[None] | None = None
    finish: str | None = None
    error: KvpipeError | None = None

    @property
    def id(self) -> str:
        return self.item.request.id

    def generated(self) -> bytes:
        return bytes(t for t in self.tokens if t < 256)


class GenerationScheduler(AsyncResource):
    """Runs the generations of one worker (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        registry: ModelRegistry,
        prefix: PrefixCache,
        delivery: Delivery,
        stats: WorkerStats,
        *,
        worker_id: str,
        max_batch: int = 64,
        kv_budget_bytes: int = 1 << 30,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.prefix = prefix
        self.delivery = delivery
        self.stats = stats
        self.worker_id = worker_id
        self.max_batch = max_batch
        self.executor: Executor | None = None  # the worker's compute threads: prefill chunks
        #: Decode steps run on a thread of their own, so they never queue behind prefill chunks
        #: in the compute threads (a burst of new prompts would stall every running stream).
        self._decode_pool: ThreadPoolExecutor | None = None
        self._prefill_slot = asyncio.Semaphore(1)
        #: Keys/values of running sequences are bounded too: a sequence starts only when its
        #: prompt plus max_tokens fits beside the others (or runs alone), else it waits.
        self.kv_budget_bytes = kv_budget_bytes
        self.kv_bytes = 0  # reserved by running sequences now
        self.kv_peak_bytes = 0
        self._kv_freed = asyncio.Event()
        self._running: dict[Hashable, set[asyncio.Task[None]]] = {}  # by request partition
        self._active: dict[tuple[str, int], list[Generation]] = {}
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._closed = False
        self.steps = 0  # decode steps run
        self.stepped_sequences = 0  # sequences advanced over all steps (mean batch = / steps)

    @property
    def active(self) -> int:
        return sum(len(g) for g in self._active.values())

    async def aclose(self) -> None:
        """Cancel running generations (their offsets stay uncommitted); safe twice."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._loop_task is not None:
                self._loop_task.cancel()
                await asyncio.gather(self._loop_task, return_exceptions=True)
            tasks = [t for running in self._running.values() for t in running]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            if self._decode_pool is not None:
                self._decode_pool.shutdown(wait=False, cancel_futures=True)
            await self.prefix.aclose()

    def submit(self, item: Item) -> None:
        """Start generating for ``item`` (its request has a ``generation``)."""
        work = self.delivery.answer_all([item], self._serve(item), model=item.request.model)
        task = asyncio.get_running_loop().create_task(work)
        partition = item.message.partition
        self._running.setdefault(partition, set()).add(task)
        task.add_done_callback(lambda t: self._finished(partition, t))

    def _finished(self, partition: Hashable, task: asyncio.Task[None]) -> None:
        running = self._running.get(partition)
        if running is not None:
            running.discard(task)
            if not running:
                del self._running[partition]
        error = None if task.cancelled() else task.exception()
        if error is not None:
            log.error("generation_task_failed", error=repr(error))

    def cancel(self, partitions: Iterable[Hashable]) -> int:
        """Stop the generations of revoked partitions (their next owner answers them; their
        offsets were left uncommitted); how many were running."""
        tasks = [t for p in partitions for t in self._running.pop(p, ())]
        for task in tasks:
            task.cancel()
        return len(tasks)

    async def _compute(self, fn: Callable[..., T], *args: Any) -> T:
        """A prefill chunk in the compute threads, one at a time: beside the decode thread,
        so a burst of new prompts costs the running streams one chunk's worth of CPU, never
        all of their prefills at once (they queue here, chunk by chunk, in arrival order)."""
        async with self._prefill_slot:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.executor, fn, *args)

    async def _decode(self, fn: Callable[..., T], *args: Any) -> T:
        if self._decode_pool is None:
            self._decode_pool = ThreadPoolExecutor(1, thread_name_prefix="kvpipe-decode")
        return await asyncio.get_running_loop().run_in_executor(self._decode_pool, fn, *args)

    # -- one sequence ------------------------------------------------------------------------

    async def _serve(self, item: Item) -> None:
        request = item.request
        spec = request.generation
        assert spec is not None
        started = time.perf_counter()
        queue_ms = max(0.0, time.time() * 1000 - item.message.timestamp_ms)
        reserved = 0
        try:
            try:
                seq = await self._open(item, spec, started, queue_ms)
            except KvpipeError as exc:
                answer = error_result(request, exc, worker=self.worker_id)
                await self.delivery.reply([(item, answer)])
                return
            reserved = seq.kv_reserved
            await self._run(seq, started)
        finally:
            if reserved:
                self._release(reserved)

    async def _run(self, seq: Generation, started: float) -> None:
        try:
            logits = await self._prefill(seq)
            seq.timings["prefill_ms"] = _ms(started) - seq.timings.get("lookup_ms", 0.0)
            await self._advance(seq, logits)
            self._share(seq)
            if seq.finish is None:
                seq.done = asyncio.get_running_loop().create_future()
                self._join(seq)
                try:
                    await seq.done
                except asyncio.CancelledError:  # revoked or closing: leave the decode group
                    self._leave((seq.resolved.name, seq.resolved.version), seq)
                    raise
        except _DeadlinePassed:
            seq.finish = "deadline"
            seq.error = RequestError(
                f"deadline passed after {len(seq.tokens)} generated tokens; generation stopped",
                code="deadline_exceeded",
            )
        await self._final(seq)

    async def _open(
        self, item: Item, spec: GenerationSpec, started: float, queue_ms: float
    ) -> Generation:
        """Resolve the model, check the request against it, find its cached prefix."""
        request = item.request
        resolved = await self.registry.resolve(request.model, request.version)
        model = transformer_of(resolved.model)
        if model is None:
            raise RequestError(
                f"model {request.model!r} is not a transformer; send inputs, not a prompt",
                code="not_generative",
            )
        n = len(spec.prompt)
        if n + spec.max_tokens > model.n_ctx:
            raise RequestError(
                f"prompt of {n} tokens plus max_tokens {spec.max_tokens} is over the model's "
                f"context of {model.n_ctx} tokens; shorten the prompt or ask for fewer tokens",
                code="context_too_long",
            )
        topic = request.reply_to or self.settings.kafka.results_topic
        if request.reply_to is not None:
            since = item.message.timestamp_ms / 1000
            if await self.delivery.topics.missing({topic}, since=since):
                # answered on the results topic by Delivery.reply, which sees it is missing
                raise RequestError(
                    f"reply-to topic {topic!r} does not exist; create it before sending requests",
                    code="bad_reply_to",
                )
        count = self.delivery.producer.partition_count(topic)
        rng = np.random.default_rng(spec.seed)
        need = (n + spec.max_tokens) * model.kv_bytes_per_token
        await self._reserve(need)
        try:
            lookup_started = time.perf_counter()
            reuse = await self.prefix.lookup(resolved.name, resolved.version, model, spec.prompt)
            state = model.state_of(reuse.chunks)
            state.reserve(n + spec.max_tokens - state.length)
        except BaseException:
            self._release(need)
            raise
        seq = Generation(
            item=item,
            spec=spec,
            resolved=resolved,
            model=model,
            state=state,
            rng=rng,
            topic=topic,
            partition=None if count is None else item.message.partition.partition % count,
            started=started,
            queue_ms=queue_ms,
            reuse=reuse,
            kv_reserved=need,
        )
        seq.timings["lookup_ms"] = _ms(lookup_started)
        return seq

    async def _reserve(self, need: int) -> None:
        """Wait until ``need`` bytes of keys/values fit beside the running sequences."""
        while self.kv_bytes and self.kv_bytes + need > self.kv_budget_bytes:
            self._kv_freed.clear()
            await self._kv_freed.wait()
        self.kv_bytes += need
        self.kv_peak_bytes = max(self.kv_peak_bytes, self.kv_bytes)

    def _release(self, need: int) -> None:
        self.kv_bytes -= need
        self._kv_freed.set()

    async def _prefill(self, seq: Generation) -> np.ndarray[Any, Any]:
        """Compute the prompt after the reused prefix, one chunk per compute call; full chunks
        are shared (single-flight) and kept (local and Redis); returns the last logits."""
        model, params, prompt = seq.model, seq.resolved.params, list(seq.spec.prompt)
        chunk = model.kv_chunk
        assert seq.reuse is not None
        keys = seq.reuse.keys
        usable = (len(prompt) - 1) // chunk
        for i in range(len(seq.reuse.chunks), usable):
            self._check_deadline(seq)
            key = keys[i]
            lo, hi = i * chunk, (i + 1) * chunk
            have = self.prefix.cached(key)
            if have is not None:
                seq.state.append(have)
                seq.joined += chunk
                continue
            state = seq.state

            async def run(lo: int = lo, hi: int = hi, state: KVState = state) -> Any:
                await self._compute(model.prefill, params, prompt[lo:hi], state)
                return state.span(lo, hi)

            kv, leader = await self.prefix.compute(key, run)
            if leader:
                seq.computed += chunk
                seq.unshared.append((key, kv))
            else:
                seq.state.append(kv)
                seq.joined += chunk
        self._check_deadline(seq)
        start = seq.state.length
        logits = await self._compute(model.prefill, params, prompt[start:], seq.state)
        seq.computed += len(prompt) - start
        for i in range(usable, len(keys)):  # a prompt ending on a chunk boundary: keep it too
            span = seq.state.span(i * chunk, (i + 1) * chunk)
            self.prefix.remember(keys[i], span)
            seq.unshared.append((keys[i], span))
        return logits

    def _check_deadline(self, seq: Generation) -> None:
        deadline = seq.item.request.deadline_ms
        if deadline is not None and time.time() * 1000 > deadline:
            raise _DeadlinePassed

    async def _advance(self, seq: Generation, logits: np.ndarray[Any, Any]) -> None:
        """Sample the next token, stream it, and decide whether the sequence is finished."""
        spec = seq.spec
        token = sample(logits, temperature=spec.temperature, top_k=spec.top_k, rng=seq.rng)
        if not seq.tokens:
            seq.timings["ttft_ms"] = _ms(seq.started)
        seq.tokens.append(token)
        piece = seq.text.decode(bytes([token])) if token < 256 else ""
        await self._progress(seq, [token], piece)
        if token == EOS:
            seq.finish = "eos"
        elif spec.stop and any(seq.generated().endswith(s) for s in spec.stop):
            seq.finish = "stop"
        elif len(seq.tokens) >= spec.max_tokens:
            seq.finish = "length"
        else:
            deadline = seq.item.request.deadline_ms
            if deadline is not None and time.time() * 1000 > deadline:
                seq.finish = "deadline"
                seq.error = RequestError(
                    f"deadline passed after {len(seq.tokens)} generated tokens; generation stopped",
                    code="deadline_exceeded",
                )

    async def _progress(self, seq: Generation, tokens: list[int], text: str) -> None:
        """One progress message, sent without waiting for its acknowledgement."""
        msg = StreamMessage(
            id=seq.id,
            model=seq.resolved.name,
            version=seq.resolved.version,
            seq=seq.seq,
            start=len(seq.tokens) - len(tokens),
            tokens=tokens,
            text=text if seq.spec.text else None,
            worker=self.worker_id,
        )
        seq.seq += 1
        try:
            fut = await self.delivery.producer.enqueue(
                seq.topic,
                encode_stream(msg),
                key=seq.id.encode(),
                headers=_JSON_HEADERS,
                partition=seq.partition,
            )
        except KvpipeError as exc:  # the final message carries every token anyway
            log.debug("progress_not_sent", request_id=seq.id, error=str(exc))
            return
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())

    def _share(self, seq: Generation) -> None:
        """Write the chunks this request computed to Redis (in the background)."""
        for key, kv in seq.unshared:
            self.prefix.share(key, kv)
        seq.unshared.clear()

    async def _final(self, seq: Generation) -> None:
        """The last message: every token, why it stopped, usage, provenance, timings; its
        acknowledgement finishes the request's offset."""
        self._share(seq)  # a deadline during the prefill: what was computed is still shared
        reuse = seq.reuse or Reuse(keys=[])
        chunk = seq.model.kv_chunk
        seq.timings.update(queue_ms=round(seq.queue_ms, 3), total_ms=_ms(seq.started))
        text = seq.generated().decode("utf-8", "replace") if seq.spec.text else None
        error = seq.error
        msg = StreamMessage(
            id=seq.id,
            model=seq.resolved.name,
            version=seq.resolved.version,
            seq=seq.seq,
            start=0,
            tokens=list(seq.tokens),
            text=text,
            final=True,
            status="ok" if error is None else "error",
            error_code=None if error is None else error.code,
            error_message=None if error is None else str(error),
            finish_reason=seq.finish,
            usage={
                "prompt_tokens": len(seq.spec.prompt),
                "completion_tokens": len(seq.tokens),
            },
            prefix={
                "reused_tokens": (reuse.local + reuse.redis) * chunk,
                "local_tokens": reuse.local * chunk,
                "redis_tokens": reuse.redis * chunk,
                "joined_tokens": seq.joined,
                "computed_tokens": seq.computed,
                "damaged_chunks": reuse.damaged,
                "bytes_read": reuse.bytes_read,
            },
            timings={k: round(v, 3) for k, v in seq.timings.items()},
            worker=self.worker_id,
        )
        result = Result(
            id=seq.id,
            model=seq.resolved.name,
            status=Status.OK if error is None else Status.ERROR,
            version=seq.resolved.version,
            error_code=msg.error_code,
            error_message=msg.error_message,
            worker=self.worker_id,
            timings=msg.timings,
        )
        try:
            self.delivery.count([result])  # stats and metrics, as for every answer
        except Exception:  # counting must never cost an answer
            log.exception("count_failed")
        seq.item.answered = True
        out = Outgoing(
            seq.item, seq.topic, encode_stream(msg), _JSON_HEADERS, result, seq.id.encode()
        )
        log.debug(
            "generation_done",
            request_id=seq.id,
            model=seq.resolved.name,
            tokens=len(seq.tokens),
            finish=seq.finish,
            **msg.prefix,
        )
        await self.delivery.deliver([out])

    # -- decode batching ---------------------------------------------------------------------

    def _join(self, seq: Generation) -> None:
        key = (seq.resolved.name, seq.resolved.version)
        self._active.setdefault(key, []).append(seq)
        self._wake.set()
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._decode_loop())

    async def _decode_loop(self) -> None:
        """Advance every active sequence by one token per step, one numpy call per group."""
        while not self._closed:
            if not self._active:
                self._wake.clear()
                await self._wake.wait()
                continue
            for key in list(self._active):
                group = self._active.get(key, [])[: self.max_batch]
                if not group:
                    continue
                try:
                    await self._step(key, group)
                except Exception as exc:  # one bad step fails its sequences, never the loop
                    log.exception("decode_failed", model=key[0], sequences=len(group))
                    for s in group:
                        if s.finish is None:
                            s.finish, s.error = "error", KvpipeError(f"internal error: {exc}")
                        self._leave(key, s)

    async def _step(self, key: tuple[str, int], group: list[Generation]) -> None:
        model, params = group[0].model, group[0].resolved.params
        logits = await self._decode(
            model.decode, params, [s.tokens[-1] for s in group], [s.state for s in group]
        )
        self.steps += 1
        self.stepped_sequences += len(group)
        for s, row in zip(group, logits, strict=True):
            await self._advance(s, row)
            if s.finish is not None:
                self._leave(key, s)
        waiting = self._active.get(key)
        if waiting is not None and len(waiting) > self.max_batch:  # the next step: the others
            stepped = {id(s) for s in group}
            waiting.sort(key=lambda s: id(s) in stepped)

    def _leave(self, key: tuple[str, int], seq: Generation) -> None:
        group = self._active.get(key)
        if group is not None and seq in group:
            group.remove(seq)
            if not group:
                del self._active[key]
        if seq.done is not None and not seq.done.done():
            seq.done.set_result(None)


class _DeadlinePassed(Exception):
    """The request's deadline passed during its prefill."""


def _ms(since: float) -> float:
    return (time.perf_counter() - since) * 1000
