"""Delivery: answers and dead letters encoded, routed, sent, acknowledged, retried.

A message is finished (its offset committable) only when the broker acknowledged its answer.
One answer that cannot be encoded or routed costs no other its answer: it becomes an error
result, or at worst a dead letter. Reply-to topics must exist (checked by listing, never by
naming one); a kvpipe topic deleted while serving is said loudly and created again.
"""

from __future__ import annotations

import asyncio
from collections import Counter as Tally
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

import structlog

from pipeline.config import KafkaSettings
from pipeline.errors import BrokerUnavailable, KvpipeError, RequestError, UnreadableMessage
from pipeline.io.inputs import MAX_ECHO_CHARS, safe_text
from pipeline.io.kafka import Message, MessageTooLarge, Producer, TopicDirectory
from pipeline.io.wire import (
    H_DLQ_REASON,
    H_DLQ_SOURCE,
    Request,
    Result,
    Status,
    encode_result,
    error_result,
)
from pipeline.metrics import WorkerMetrics
from pipeline.serving.commits import OffsetTracker
from pipeline.serving.dedupe import Dedupe, fingerprint
from pipeline.serving.item import Item
from pipeline.serving.stats import WorkerStats
from pipeline.serving.tracing import Tracing

log = structlog.get_logger("kvpipe.worker")

QUIET_CODES = frozenset({
    # the client's own mistakes, answered in the result; not worth a warning each
    "unknown_model", "unknown_version", "bad_shape", "bad_dtype", "bad_ids", "non_finite",
    "too_large", "bad_request", "bad_input", "deadline_exceeded", "bad_reply_to",
    "non_finite_output", "unsupported_datatype", "unsupported_content_type", "unknown_output",
    # logged once per batch as params_failed
    "params_unavailable", "params_corrupt",
})  # fmt: skip


@dataclass(slots=True)
class Outgoing:
    """One message to send: an answer (``result`` set) or a dead letter."""

    item: Item
    topic: str
    value: bytes
    headers: list[tuple[str, bytes]]
    result: Result | None
    key: bytes | None
    span: Any = None  # its produce span, ended when acknowledged (serving/tracing.py)


class Delivery:
    """Sends answers for one worker; ``abandon`` (set at close) stops retrying."""

    def __init__(
        self,
        kafka: KafkaSettings,
        producer: Producer,
        book: OffsetTracker,
        stats: WorkerStats,
        *,
        worker_id: str,
        abandon: asyncio.Event,
        metrics: WorkerMetrics | None = None,
        dedupe: Dedupe | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self._kafka = kafka
        self.tracing = tracing or Tracing.off()
        self.dedupe = dedupe
        self.producer = producer
        self._book = book
        self.stats = stats
        self.worker_id = worker_id
        self._abandon = abandon
        self.metrics = metrics
        self.topics = TopicDirectory(producer.existing_topics)
        self._own_topics = {kafka.results_topic, kafka.dlq_topic}

    async def answer_all(self, items: list[Item], work: Awaitable[None], **where: Any) -> None:
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
            await self.reply(
                [(it, error_result(it.request, failure, worker=self.worker_id)) for it in left]
            )
        except Exception:
            log.exception("reply_failed", requests=len(left), **where)
            left = [it for it in left if not it.answered]
            for it in left:
                it.answered = True
            await self.deliver([self.dead_letter_out(it, failure) for it in left])

    def dead_letter_out(self, item: Item, exc: KvpipeError) -> Outgoing:
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
        return Outgoing(item, self._kafka.dlq_topic, msg.value or b"", headers, None, msg.key)

    async def dead_letter(self, msg: Message, exc: UnreadableMessage) -> None:
        item = Item(msg, Request(id="", model="", inputs=None), answered=True)
        await self.deliver([self.dead_letter_out(item, exc)])

    async def reply(self, answers: list[tuple[Item, Result]]) -> None:
        """Answer each request on its topic. One answer that cannot be encoded or routed
        costs no other its answer: it becomes an error result, or at worst a dead letter."""
        if not answers:
            return
        since = max(it.message.timestamp_ms for it, _ in answers) / 1000
        wanted = {it.request.reply_to for it, _ in answers if it.request.reply_to is not None}
        missing = await self.topics.missing(wanted, since=since) if wanted else set()
        outgoing: list[Outgoing] = []
        for item, result in answers:
            if item.request.reply_to in missing:
                result = self._unroutable(item, result)
            outgoing.append(self._encode(item, result))
            item.answered = True
        try:
            self._count([o.result for o in outgoing if o.result is not None])
        except Exception:  # counting must never cost an answer
            log.exception("count_failed")
        await self.deliver(outgoing)

    def _unroutable(self, item: Item, result: Result) -> Result:
        """The error result for a reply-to topic that does not exist (sent to results)."""
        topic, item.request.reply_to = item.request.reply_to, None
        err = RequestError(
            f"reply-to topic {topic!r} does not exist; create it before sending requests",
            code="bad_reply_to",
        )
        out = error_result(item.request, err, worker=self.worker_id)
        out.version = result.version
        return out

    def _encode(self, item: Item, result: Result) -> Outgoing:
        """The message answering ``item``; if ``result`` cannot be encoded, an internal error
        result instead, and if not even that, the request as a dead letter."""
        topic = item.request.reply_to or self._kafka.results_topic
        try:
            request = item.request
            value, headers = encode_result(result, request.content_type, request.wanted_outputs)
            span = self.tracing.result_headers(item, topic, result, headers)
            return Outgoing(item, topic, value, headers, result, result.id.encode(), span)
        except Exception as exc:
            log.exception("encode_failed", request_id=safe_text(result.id, 80))
            reason = f"internal error: result not encodable: {type(exc).__name__}: {exc}"
        try:
            fallback = Result(
                id=result.id,
                model=safe_text(result.model, MAX_ECHO_CHARS),
                status=Status.ERROR,
                version=result.version,
                error_code="internal",
                error_message=safe_text(reason, 500),
                worker=self.worker_id,
            )
            value, headers = encode_result(fallback, item.request.content_type)
            span = self.tracing.result_headers(item, topic, fallback, headers)
            return Outgoing(item, topic, value, headers, fallback, fallback.id.encode(), span)
        except Exception:
            return self.dead_letter_out(item, KvpipeError(reason, code="internal"))

    def count(self, results: list[Result]) -> None:
        """Count answers sent outside :meth:`reply` (a generation's final message) as its own."""
        self._count(results)

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

    async def deliver(self, outgoing: list[Outgoing]) -> None:
        """Send and wait for acks; retry what failed until it lands or the worker abandons.
        A message is finished (its offset committable) only when the broker acknowledged it
        (with dedupe, it is committed only once its request id is recorded as answered)."""
        delay = 0.1
        while outgoing:
            futures: list[tuple[Outgoing, asyncio.Future[Any] | None]] = []
            try:
                async with asyncio.timeout(self.producer.send_timeout_s):
                    for out in outgoing:
                        futures.append(await self._enqueue(out))
            except TimeoutError:
                futures += [(out, None) for out in outgoing[len(futures) :]]
            live = [f for _, f in futures if f is not None]
            if live:
                await asyncio.wait(live, timeout=self.producer.send_timeout_s)
            failed: list[Outgoing] = []
            acked: list[Outgoing] = []
            reasons: set[str] = set()
            for out, fut in futures:
                if (
                    fut is not None
                    and fut.done()
                    and not fut.cancelled()
                    and fut.exception() is None
                ):
                    acked.append(out)
                    continue
                if fut is None or not fut.done():
                    reasons.add("not acknowledged in time")
                    if fut is not None:
                        fut.cancel()
                elif not fut.cancelled():
                    reasons.add(type(fut.exception()).__name__)
                failed.append(out)
            if acked:
                await self._finish(acked)
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

    async def _finish(self, acked: list[Outgoing]) -> None:
        """Acknowledged messages: their offsets committable, and with dedupe their ids being
        recorded as answered (one round trip for the lot, which the commit waits for)."""
        if self.dedupe is not None:
            self.dedupe.record_soon(
                [
                    (o.item.request.id, fingerprint(o.item.message))
                    for o in acked
                    if o.item.request.id
                ]
            )
        finish, sent = self._book.finish, self.tracing.sent
        for out in acked:
            finish(out.item.message.partition, out.item.message.offset)
            sent(out.item, out.span)

    async def _reroute(self, failed: list[Outgoing]) -> list[Outgoing]:
        """After failed sends: a client's reply topic that is gone gets its answer on the
        results topic instead; a kvpipe topic that is gone is said loudly and created again."""
        missing = await self.topics.absent({o.topic for o in failed})
        if not missing:
            return failed
        await self._recreate(missing & self._own_topics)
        out: list[Outgoing] = []
        for o in failed:
            if o.topic in missing and o.topic not in self._own_topics and o.result is not None:
                o = self._encode(o.item, self._unroutable(o.item, o.result))
            out.append(o)
        return out

    async def check_own_topics(self) -> None:
        """Periodically: a results or DLQ topic deleted while serving is created again (some
        brokers acknowledge sends into a deleted topic, so failed sends alone can miss it)."""
        await self._recreate(await self.topics.absent(self._own_topics))

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
        await self.topics.refresh()

    async def _enqueue(self, out: Outgoing) -> tuple[Outgoing, asyncio.Future[Any] | None]:
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

    def _partition_for(self, out: Outgoing) -> int | None:
        """The request's partition number modulo the topic's partitions: the answers to one
        request partition stay in order on one partition, and no key is hashed per message.
        None (hash the key) until the producer knows the topic."""
        n = self.producer.partition_count(out.topic)  # from its metadata: a dict lookup
        return None if n is None else out.item.message.partition.partition % n

    def _shrink(self, out: Outgoing, exc: MessageTooLarge) -> Outgoing:
        """Replace a message too large to send by a small one that says so."""
        if out.result is None:  # a dead letter: keep the reason, cut the payload
            cut = [*out.headers, ("kvpipe-dlq-truncated", b"1")]
            return Outgoing(out.item, out.topic, out.value[:1024], cut, None, out.key)
        err = KvpipeError(str(exc), code="result_too_large")
        small = error_result(out.item.request, err, worker=self.worker_id)
        small.version = out.result.version
        self.stats.errors_by_code["result_too_large"] += 1
        return self._encode(out.item, small)
