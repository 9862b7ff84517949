"""The Kafka adapter: producer, consumer and topic set-up over aiokafka, errors translated.

In ``pipeline`` and ``consumers`` this is the only module that imports aiokafka, except the
dev tooling: ``pipeline.bench`` (the bare consume -> produce echo it measures against, and its
topic clean-up) and ``pipeline.dev.local`` (the local broker's readiness check). The forbidden
contract in ``pyproject.toml`` (``lint-imports``, run by ``make lint``) allows exactly those.
Every network step carries its own timeout, because aiokafka's ``send_and_wait`` and
``stop()`` can hang when the broker is gone (aiokafka#1101).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    CommitFailedError,
    CorruptRecordException,
    KafkaError,
    MessageSizeTooLargeError,
    TopicAlreadyExistsError,
)

from pipeline.config import KafkaSettings
from pipeline.errors import BrokerUnavailable, KvpipeError
from pipeline.resource import AsyncResource

Headers = Sequence[tuple[str, bytes]]


class MessageTooLarge(KvpipeError):
    """The broker or producer refuses a message for its size."""

    code = "result_too_large"


class CommitRejected(KvpipeError):
    """A commit was refused, usually because the partitions were revoked meanwhile."""

    code = "commit_rejected"
    retryable = True


@dataclass(frozen=True, slots=True)
class Partition:
    """A topic partition, hashable, free of aiokafka types."""

    topic: str
    partition: int

    def __str__(self) -> str:
        return f"{self.topic}[{self.partition}]"


@dataclass(frozen=True, slots=True)
class Message:
    """A consumed record."""

    partition: Partition
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers
    timestamp_ms: int
    #: Set (and ``value`` None) when the broker's bytes for this offset could not be parsed.
    problem: str | None = None


def _options(settings: KafkaSettings) -> dict[str, Any]:
    """aiokafka's connection options, security included (passed through, never logged)."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap.split(","),
        "client_id": settings.client_id,
        "request_timeout_ms": int(settings.request_timeout_s * 1000),
        "security_protocol": settings.security_protocol,
    }
    if settings.security_protocol.endswith("SSL"):
        from aiokafka.helpers import create_ssl_context

        options["ssl_context"] = create_ssl_context(cafile=settings.ssl_cafile or None)
    if settings.security_protocol.startswith("SASL"):
        options["sasl_mechanism"] = settings.sasl_mechanism
        options["sasl_plain_username"] = settings.sasl_username
        options["sasl_plain_password"] = settings.sasl_password
    return options


def _unavailable(settings: KafkaSettings, what: str, exc: BaseException) -> BrokerUnavailable:
    detail = str(exc) or type(exc).__name__
    if "Unable to bootstrap" in detail or isinstance(exc, OSError):
        detail = "no broker answered"
    elif isinstance(exc, TimeoutError):
        detail = "timed out"
    return BrokerUnavailable(
        f"Kafka at {settings.bootstrap}: {what} failed ({detail}); check KVPIPE_KAFKA and that "
        "the broker is up (kvpipe local up starts one)"
    )


async def _bounded(
    settings: KafkaSettings, what: str, step: Awaitable[Any], timeout: float | None = None
) -> Any:
    try:
        return await asyncio.wait_for(step, timeout or settings.request_timeout_s)
    except (KafkaError, OSError, TimeoutError) as exc:
        raise _unavailable(settings, what, exc) from None


async def ensure_topics(
    settings: KafkaSettings, topics: Iterable[str], *, partitions: int | None = None
) -> list[str]:
    """Create the topics that do not exist yet; returns the names created."""
    admin = AIOKafkaAdminClient(**_options(settings))
    await _bounded(settings, "connecting the admin client", admin.start())
    try:
        existing = set(await _bounded(settings, "listing topics", admin.list_topics()))
        wanted = [t for t in dict.fromkeys(topics) if t not in existing]
        if not wanted:
            return []
        count = partitions or settings.partitions
        new = [NewTopic(name=t, num_partitions=count, replication_factor=1) for t in wanted]
        try:
            await _bounded(settings, "creating topics", admin.create_topics(new))
        except BrokerUnavailable as exc:
            if not isinstance(exc.__context__, TopicAlreadyExistsError):
                raise
        return wanted
    finally:
        await asyncio.wait_for(admin.close(), settings.request_timeout_s)


async def list_topics(settings: KafkaSettings) -> frozenset[str]:
    """Every topic the cluster has, listed without naming any (naming one creates it on
    brokers that auto-create topics: Tansu always, Kafka by default)."""
    admin = AIOKafkaAdminClient(**_options(settings))
    await _bounded(settings, "connecting the admin client", admin.start())
    try:
        return frozenset(await _bounded(settings, "listing topics", admin.list_topics()))
    finally:
        await asyncio.wait_for(admin.close(), settings.request_timeout_s)


async def delete_topics(settings: KafkaSettings, topics: Iterable[str]) -> list[str]:
    """Delete those of ``topics`` that exist; returns the names deleted."""
    admin = AIOKafkaAdminClient(**_options(settings))
    await _bounded(settings, "connecting the admin client", admin.start())
    try:
        existing = set(await _bounded(settings, "listing topics", admin.list_topics()))
        doomed = [t for t in dict.fromkeys(topics) if t in existing]
        if doomed:
            response = await _bounded(settings, "deleting topics", admin.delete_topics(doomed))
            # 3: UNKNOWN_TOPIC_OR_PARTITION, deleted meanwhile by someone else
            failed = [(t, c) for t, c, *_ in response.topic_error_codes if c not in (0, 3)]
            if failed:
                raise BrokerUnavailable(
                    f"Kafka at {settings.bootstrap}: deleting topics failed "
                    f"(topic, error code: {failed}); check the client's DeleteTopics rights"
                )
        return doomed
    finally:
        await asyncio.wait_for(admin.close(), settings.request_timeout_s)


class Producer(AsyncResource):
    """An aiokafka producer with bounded start, send and stop."""

    def __init__(
        self,
        settings: KafkaSettings,
        *,
        linger_ms: int | None = None,
        batch_bytes: int | None = None,
        send_timeout_s: float = 10.0,
    ) -> None:
        self.settings = settings
        self.send_timeout_s = send_timeout_s
        self._producer = AIOKafkaProducer(
            **_options(settings),
            acks="all",
            linger_ms=settings.linger_ms if linger_ms is None else linger_ms,
            max_batch_size=batch_bytes or settings.producer_batch_bytes,
            max_request_size=settings.max_message_bytes,
            enable_idempotence=False,
        )
        self._started = False
        self._closed = False

    async def start(self) -> None:
        await _bounded(self.settings, "starting the producer", self._producer.start())
        self._started = True

    def partition_count(self, topic: str) -> int | None:
        """Partitions of ``topic`` as far as the producer's metadata knows (None: not yet)."""
        parts = self._producer.client.cluster.partitions_for_topic(topic)
        return len(parts) if parts else None

    async def create_topics(self, topics: Sequence[str]) -> list[str]:
        """Create those of ``topics`` that do not exist (the worker's own, when deleted)."""
        return await ensure_topics(self.settings, topics)

    async def existing_topics(self) -> frozenset[str]:
        """Every topic the cluster has. Listed without naming any topic: a metadata request
        that names one makes many brokers (Tansu, Kafka's default) create it."""
        client = self._producer.client
        metadata = await _bounded(self.settings, "listing topics", client.fetch_all_metadata())
        listed = frozenset(metadata.topics())
        # Stop tracking topics that are gone (a client's reply topic deleted on its close):
        # aiokafka's metadata refreshes name every tracked topic, which would create them again.
        tracked = set(getattr(client, "_topics", ()))
        if tracked - listed:
            client.set_topics([t for t in tracked if t in listed])
        return listed

    async def enqueue(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes | None = None,
        headers: Headers = (),
        partition: int | None = None,
    ) -> asyncio.Future[Any]:
        """Hand a message to the producer; the returned future resolves when acknowledged.

        This waits only while the producer's buffer is full; callers that must not wait
        forever when the broker is gone bound a whole run of calls with one timeout (a
        timer per message costs more than the send itself).
        """
        try:
            fut: asyncio.Future[Any] = await self._producer.send(
                topic, value=value, key=key, headers=list(headers), partition=partition
            )
        except MessageSizeTooLargeError as exc:
            raise MessageTooLarge(f"message of {len(value)} bytes refused: {exc}") from None
        except (KafkaError, TimeoutError) as exc:
            raise _unavailable(self.settings, f"sending to {topic}", exc) from None
        return fut

    async def wait_acked(self, futures: Sequence[asyncio.Future[Any]]) -> None:
        """Wait until every future is acknowledged, within the send timeout."""
        if not futures:
            return
        try:
            await asyncio.wait_for(asyncio.gather(*futures), self.send_timeout_s)
        except MessageSizeTooLargeError as exc:
            raise MessageTooLarge(f"message refused: {exc}") from None
        except (KafkaError, TimeoutError) as exc:
            raise _unavailable(self.settings, "waiting for acknowledgements", exc) from None

    async def send(
        self, topic: str, value: bytes, *, key: bytes | None = None, headers: Headers = ()
    ) -> None:
        """Send one message and wait for its acknowledgement."""
        try:
            fut = await asyncio.wait_for(
                self.enqueue(topic, value, key=key, headers=headers), self.send_timeout_s
            )
        except TimeoutError as exc:
            raise _unavailable(self.settings, f"sending to {topic}", exc) from None
        await self.wait_acked([fut])

    async def flush(self) -> None:
        await _bounded(self.settings, "flushing", self._producer.flush(), self.send_timeout_s)

    async def aclose(self) -> None:
        """Flush and stop, bounded; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(KafkaError, OSError, TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._producer.stop()), self.send_timeout_s)


class TopicDirectory:
    """Which topics exist, from listings of all topics: at most one listing at a time, and
    none newer than ``min_interval_s`` apart unless a caller's question is newer than it."""

    def __init__(
        self, list_topics: Callable[[], Awaitable[frozenset[str]]], *, min_interval_s: float = 0.2
    ) -> None:
        self._list = list_topics
        self._min_interval_s = min_interval_s
        self._known: frozenset[str] = frozenset()
        self._listed_at = 0.0  # epoch seconds when the last good listing started
        self._refresh: asyncio.Future[None] | None = None

    async def missing(self, topics: Iterable[str], *, since: float = 0.0) -> set[str]:
        """The ``topics`` that do not exist, judged by a listing started after ``since``
        (epoch seconds) when the last one is older. Empty when the broker cannot be asked:
        then nothing is known to be missing and sends simply retry."""
        wanted = set(topics)
        for _ in range(2):  # a listing joined under way may have started before ``since``
            unknown = wanted - self._known
            if not unknown or self._listed_at > since:
                return unknown
            try:
                await self.refresh()
            except BrokerUnavailable:
                return set()
        return wanted - self._known

    async def absent(self, topics: Iterable[str]) -> set[str]:
        """The ``topics`` missing from a new listing (after failed sends: a known topic may
        have been deleted). Empty when the broker cannot be asked."""
        try:
            await self.refresh()
        except BrokerUnavailable:
            return set()
        return set(topics) - self._known

    async def refresh(self) -> None:
        """List the topics again (joins a listing already under way)."""
        if self._refresh is None:
            self._refresh = asyncio.ensure_future(self._do_refresh())
        fut = self._refresh
        try:
            await asyncio.shield(fut)
        finally:
            if self._refresh is fut and fut.done():
                self._refresh = None

    async def _do_refresh(self) -> None:
        wait = self._listed_at + self._min_interval_s - time.time()
        if wait > 0:
            await asyncio.sleep(wait)
        started = time.time()
        self._known = await self._list()
        self._listed_at = started


RebalanceCallback = Callable[[list[Partition]], Awaitable[None]]


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(
        self,
        on_revoked: RebalanceCallback,
        on_assigned: RebalanceCallback,
        forget: Callable[[Iterable[TopicPartition]], None],
    ) -> None:
        self._on_revoked = on_revoked
        self._on_assigned = on_assigned
        self._forget = forget

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        revoked = list(revoked)
        self._forget(revoked)
        await self._on_revoked([Partition(tp.topic, tp.partition) for tp in revoked])

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await self._on_assigned([Partition(tp.topic, tp.partition) for tp in assigned])


async def _noop(_: list[Partition]) -> None:
    return None


#: What aiokafka raises for records it cannot parse (its C reader raises the decode error bare).
_UNPARSABLE = (CorruptRecordException, UnicodeDecodeError)


class Consumer(AsyncResource):
    """An aiokafka consumer with manual, explicit commits and bounded start and stop.

    With a ``group_id`` it subscribes; without one and with ``assign_from`` it takes every
    partition of the topics at start, from their start or their end.
    """

    def __init__(
        self,
        settings: KafkaSettings,
        topics: Sequence[str],
        *,
        group_id: str | None,
        assign_from: Literal["start", "end"] | None = None,
        auto_offset_reset: str = "earliest",
        on_revoked: RebalanceCallback = _noop,
        on_assigned: RebalanceCallback = _noop,
        session_timeout_ms: int = 10_000,
        heartbeat_interval_ms: int = 1_000,
        max_poll_interval_ms: int = 300_000,
        fetch_max_wait_ms: int | None = None,
        stop_timeout_s: float = 10.0,
    ) -> None:
        self.settings = settings
        self.topics = list(topics)
        self.group_id = group_id
        self.assign_from = assign_from
        self.stop_timeout_s = stop_timeout_s
        self._listener = _Listener(on_revoked, on_assigned, self._forget)
        #: Per partition, one past the last offset handed out: where to go back to when a
        #: fetch fails on a record it cannot parse (aiokafka drops what it drained meanwhile).
        self._next: dict[TopicPartition, int] = {}
        self._earliest = auto_offset_reset == "earliest"
        self._consumer = AIOKafkaConsumer(
            **_options(settings),
            group_id=group_id,
            enable_auto_commit=False,
            auto_offset_reset=auto_offset_reset,
            session_timeout_ms=session_timeout_ms,
            heartbeat_interval_ms=heartbeat_interval_ms,
            max_poll_interval_ms=max_poll_interval_ms,
            fetch_max_wait_ms=(
                settings.fetch_max_wait_ms if fetch_max_wait_ms is None else fetch_max_wait_ms
            ),
            metadata_max_age_ms=5_000,
            max_partition_fetch_bytes=settings.partition_fetch_bytes,
        )
        self._closed = False

    async def start(self) -> None:
        await _bounded(self.settings, "starting the consumer", self._consumer.start())
        if self.group_id is not None:
            self._consumer.subscribe(self.topics, listener=self._listener)
        elif self.assign_from is not None:
            await self.assign_all(from_end=self.assign_from == "end")

    async def assign_all(self, *, from_end: bool = True) -> list[Partition]:
        """Without a group: take every partition of the topics, from the end or the start."""
        tps: list[TopicPartition] = []
        for topic in self.topics:
            parts = await _bounded(self.settings, "reading partitions", self._partitions_for(topic))
            tps += [TopicPartition(topic, p) for p in sorted(parts)]
        self._consumer.assign(tps)
        if from_end:
            await _bounded(self.settings, "seeking to end", self._consumer.seek_to_end(*tps))
        else:
            await _bounded(
                self.settings, "seeking to start", self._consumer.seek_to_beginning(*tps)
            )
        for tp in tps:  # where a fetch that fails to parse goes back to (see getmany)
            self._next[tp] = await _bounded(
                self.settings, "reading positions", self._consumer.position(tp)
            )
        return [Partition(tp.topic, tp.partition) for tp in tps]

    async def _partitions_for(self, topic: str) -> set[int]:
        while True:
            parts = self._consumer.partitions_for_topic(topic)
            if parts:
                return set(parts)
            await self._consumer._client.force_metadata_update()
            await asyncio.sleep(0.1)

    def assignment(self) -> list[Partition]:
        return [Partition(tp.topic, tp.partition) for tp in self._consumer.assignment()]

    async def getmany(self, *, timeout_ms: int, max_records: int) -> list[Message]:
        """Fetch what is there (up to ``max_records``), waiting at most ``timeout_ms``.

        A record batch aiokafka cannot parse (a header name that is not UTF-8, say: any
        librdkafka producer can send one) would fail every fetch for good; its offsets come
        back one by one as messages with ``problem`` set, so the caller can dead-letter them."""
        try:
            batches = await self._consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
        except _UNPARSABLE:
            return await self._around_corrupt(max_records)
        except KafkaError as exc:
            raise _unavailable(self.settings, "fetching", exc) from None
        return self._messages(batches)

    def _messages(self, batches: Mapping[TopicPartition, Sequence[Any]]) -> list[Message]:
        out: list[Message] = []
        for tp, records in batches.items():
            part = Partition(tp.topic, tp.partition)
            for r in records:
                out.append(
                    Message(part, r.offset, r.key, r.value, tuple(r.headers or ()), r.timestamp)
                )
            if records:
                self._next[tp] = records[-1].offset + 1
        return out

    def _forget(self, partitions: Iterable[TopicPartition]) -> None:
        for tp in partitions:
            self._next.pop(tp, None)

    async def _resume_at(self, tp: TopicPartition) -> int | None:
        """The first offset of ``tp`` not handed out yet (the group's commit before any)."""
        offset = self._next.get(tp)
        if offset is None and self.group_id is not None:
            offset = await _bounded(self.settings, "reading offsets", self._consumer.committed(tp))
        if offset is None and self._earliest:  # where the group starts without a commit
            starts = await _bounded(
                self.settings, "reading offsets", self._consumer.beginning_offsets([tp])
            )
            offset = starts[tp]
        return offset

    async def _around_corrupt(self, max_records: int) -> list[Message]:
        """After a fetch failed on records aiokafka cannot parse: go back to what was handed
        out, then fetch partition by partition; a partition that fails is stepped past one
        offset, which comes back as a message with its problem (every offset is accounted)."""
        tps = sorted(self._consumer.assignment())
        for tp in tps:
            offset = await self._resume_at(tp)
            if offset is not None:
                self._consumer.seek(tp, offset)
        out: list[Message] = []
        for tp in tps:
            try:
                got = await self._consumer.getmany(tp, timeout_ms=500, max_records=max_records)
            except _UNPARSABLE as exc:
                offset = await self._resume_at(tp)
                if offset is None:
                    offset = await _bounded(
                        self.settings, "reading a position", self._consumer.position(tp)
                    )
                self._consumer.seek(tp, offset + 1)
                self._next[tp] = offset + 1
                problem = f"the broker's record batch cannot be parsed: {type(exc).__name__}: {exc}"
                part, now_ms = Partition(tp.topic, tp.partition), int(time.time() * 1000)
                out.append(Message(part, offset, None, None, (), now_ms, problem))
            except KafkaError as exc:
                raise _unavailable(self.settings, "fetching", exc) from None
            else:
                out += self._messages(got)
        return out

    async def lag(self) -> dict[Partition, int]:
        """Messages between this consumer's position and the end, per assigned partition."""
        out: dict[Partition, int] = {}
        for tp in self._consumer.assignment():
            high = self._consumer.highwater(tp)
            if high is None:
                continue
            try:
                position = await asyncio.wait_for(self._consumer.position(tp), 2.0)
            except (KafkaError, TimeoutError):
                continue
            out[Partition(tp.topic, tp.partition)] = max(0, high - position)
        return out

    async def behind(self) -> int | None:
        """Messages the broker holds past this consumer's positions; None if it cannot tell."""
        tps = list(self._consumer.assignment())
        if not tps:
            return 0
        try:
            ends = await asyncio.wait_for(
                self._consumer.end_offsets(tps), self.settings.request_timeout_s
            )
            total = 0
            for tp in tps:
                position = await asyncio.wait_for(self._consumer.position(tp), 2.0)
                total += max(0, ends[tp] - position)
        except (KafkaError, TimeoutError, OSError):
            return None
        return total

    async def commit(self, offsets: dict[Partition, int]) -> None:
        """Commit positions (the next offset to read) for the given partitions."""
        if not offsets:
            return
        tps = {TopicPartition(p.topic, p.partition): o for p, o in offsets.items()}
        try:
            await asyncio.wait_for(self._consumer.commit(tps), self.settings.request_timeout_s)
        except CommitFailedError as exc:
            raise CommitRejected(f"commit refused: {exc}") from None
        except (KafkaError, TimeoutError) as exc:
            raise _unavailable(self.settings, "committing", exc) from None

    async def committed(self, partition: Partition) -> int | None:
        tp = TopicPartition(partition.topic, partition.partition)
        result: int | None = await _bounded(
            self.settings, "reading committed offsets", self._consumer.committed(tp)
        )
        return result

    async def aclose(self) -> None:
        """Leave the group and close, bounded; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(KafkaError, OSError, TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._consumer.stop()), self.stop_timeout_s)
