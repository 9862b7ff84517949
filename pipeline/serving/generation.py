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

The scheduler composes the parts, one job each: :class:`KVBudget` (admission under the
key/value byte budget), :class:`ChunkedPrefill` (the prompt, chunk by chunk, and the chunks'
write to Redis), :class:`DecodeGroups` (the decode thread and its turn-taking) and
:class:`TokenStream` (the progress and final messages through :class:`Delivery`); it owns the
tasks, one per generation, and stops a revoked partition's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Hashable, Iterable
from concurrent.futures import Executor

import numpy as np
import structlog

from pipeline.config import Settings
from pipeline.errors import KvpipeError, RequestError
from pipeline.io.stream import GenerationSpec
from pipeline.io.wire import error_result
from pipeline.params.prefix import PrefixCache
from pipeline.params.registry import ModelRegistry
from pipeline.params.transformer import transformer_of
from pipeline.resource import AsyncResource
from pipeline.serving.decode_groups import DecodeGroups
from pipeline.serving.delivery import Delivery
from pipeline.serving.item import Item
from pipeline.serving.kv_budget import KVBudget
from pipeline.serving.prefill import ChunkedPrefill
from pipeline.serving.sequence import DeadlinePassed, Generation, elapsed_ms
from pipeline.serving.stats import WorkerStats
from pipeline.serving.token_stream import TokenStream

__all__ = ["Generation", "GenerationScheduler"]

log = structlog.get_logger("kvpipe.generation")


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
        #: Keys/values of running sequences are bounded too: a sequence starts only when its
        #: prompt plus max_tokens fits beside the others (or runs alone), else it waits.
        self.budget = KVBudget(kv_budget_bytes)
        self.prefill = ChunkedPrefill(prefix)
        self.stream = TokenStream(delivery, worker_id=worker_id)
        self.decoder = DecodeGroups(self.stream.advance, max_batch=max_batch)
        self._running: dict[Hashable, set[asyncio.Task[None]]] = {}  # by request partition
        self._closed = False

    # -- the parts' settings and figures, as the worker, tests and bench see them ------------

    @property
    def executor(self) -> Executor | None:
        """The worker's compute threads, where prefill chunks run."""
        return self.prefill.executor

    @executor.setter
    def executor(self, executor: Executor | None) -> None:
        self.prefill.executor = executor

    @property
    def max_batch(self) -> int:
        return self.decoder.max_batch

    @max_batch.setter
    def max_batch(self, value: int) -> None:
        self.decoder.max_batch = value

    @property
    def kv_budget_bytes(self) -> int:
        return self.budget.budget_bytes

    @kv_budget_bytes.setter
    def kv_budget_bytes(self, value: int) -> None:
        self.budget.budget_bytes = value

    @property
    def kv_bytes(self) -> int:
        """Key/value bytes reserved by running sequences now."""
        return self.budget.used

    @property
    def kv_peak_bytes(self) -> int:
        return self.budget.peak

    @property
    def steps(self) -> int:
        """Decode steps run."""
        return self.decoder.steps

    @property
    def stepped_sequences(self) -> int:
        """Sequences advanced over all steps (mean batch = / steps)."""
        return self.decoder.stepped_sequences

    @property
    def active(self) -> int:
        return self.decoder.active

    # -- the tasks ---------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Cancel running generations (their offsets stay uncommitted); safe twice."""
        if self._closed:
            return
        self._closed = True
        try:
            await self.decoder.aclose()
            tasks = [t for running in self._running.values() for t in running]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
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
                self.budget.release(reserved)

    async def _run(self, seq: Generation, started: float) -> None:
        try:
            logits = await self.prefill.run(seq)
            seq.timings["prefill_ms"] = elapsed_ms(started) - seq.timings.get("lookup_ms", 0.0)
            await self.stream.advance(seq, logits)
            self.prefill.share(seq)
            if seq.finish is None:
                seq.done = asyncio.get_running_loop().create_future()
                self.decoder.join(seq)
                try:
                    await seq.done
                except asyncio.CancelledError:  # revoked or closing: leave the decode group
                    self.decoder.leave(seq)
                    raise
        except DeadlinePassed:
            seq.finish = "deadline"
            seq.error = seq.deadline_error()
        self.prefill.share(seq)  # a deadline during the prefill: what was computed is still shared
        await self.stream.final(seq)

    async def _open(
        self, item: Item, spec: GenerationSpec, started: float, queue_ms: float
    ) -> Generation:
        """Resolve the model, check the request against it, wait for its keys/values to fit
        the budget, find its cached prefix."""
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
        await self.budget.reserve(need)
        try:
            lookup_started = time.perf_counter()
            reuse = await self.prefix.lookup(resolved.name, resolved.version, model, spec.prompt)
            state = model.state_of(reuse.chunks)
            state.reserve(n + spec.max_tokens - state.length)
        except BaseException:
            self.budget.release(need)
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
        seq.timings["lookup_ms"] = elapsed_ms(lookup_started)
        return seq
