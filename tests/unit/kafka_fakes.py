"""Kafka at the boundary, in memory: topics, one consumer group member, a producer.

Enough of the broker for the worker's unit tests: fetch in order from committed positions,
commit, produce with acknowledgements (or failures, to inject), list topics. No network.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.cache.cache import ParamCache
from pipeline.config import Settings
from pipeline.io.kafka import Message, Partition
from pipeline.params.registry import ModelRegistry
from pipeline.params.store import ParamStore
from pipeline.serving.worker import Worker


class UnknownTopic(Exception):
    """What a broker without auto-creation answers for a topic it does not have."""


@dataclass
class Record:
    topic: str
    partition: int
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]

    def header(self, name: str) -> bytes | None:
        return next((v for k, v in reversed(self.headers) if k == name), None)


@dataclass
class FakeBroker:
    """Topics of numbered partitions; ``committed`` holds the group's positions."""

    partitions: int = 4
    topics: dict[str, list[list[Record | Message]]] = field(default_factory=dict)
    committed: dict[Partition, int] = field(default_factory=dict)
    #: topic -> exception every send to it fails with (a deleted topic, say)
    failing: dict[str, BaseException] = field(default_factory=dict)

    def create(self, *topics: str) -> None:
        for topic in topics:
            self.topics.setdefault(topic, [[] for _ in range(self.partitions)])

    def append(
        self,
        topic: str,
        partition: int,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes]] = (),
        key: bytes | None = None,
    ) -> Message:
        """A request as a client would produce it."""
        self.create(topic)
        log = self.topics[topic][partition]
        msg = Message(
            Partition(topic, partition),
            len(log),
            key,
            value,
            tuple(headers),
            int(time.time() * 1000),
        )
        log.append(msg)
        return msg

    def records(self, topic: str) -> list[Record]:
        return [r for part in self.topics.get(topic, []) for r in part if isinstance(r, Record)]

    def end(self, topic: str) -> dict[Partition, int]:
        return {Partition(topic, i): len(p) for i, p in enumerate(self.topics.get(topic, []))}

    def all_committed(self, topic: str) -> bool:
        """Whether the group has committed every record of ``topic``."""
        return all(self.committed.get(p, 0) == end for p, end in self.end(topic).items() if end)


class FakeConsumer:
    """The worker's consumer: every partition of the requests topic, from committed."""

    def __init__(self, broker: FakeBroker, worker: Worker, *, max_per_fetch: int = 50) -> None:
        self.broker = broker
        self.worker = worker
        self.topic = worker.settings.kafka.requests_topic
        self.max_per_fetch = max_per_fetch
        self.positions: dict[Partition, int] = {}

    async def start(self) -> None:
        self.broker.create(self.topic)
        for p in self.broker.end(self.topic):
            self.positions[p] = self.broker.committed.get(p, 0)
        await self.worker._on_assigned(list(self.positions))

    async def getmany(self, *, timeout_ms: int, max_records: int) -> list[Message]:
        out: list[Message] = []
        limit = min(max_records, self.max_per_fetch)
        for p, pos in self.positions.items():
            log = self.broker.topics[p.topic][p.partition]
            take = [m for m in log[pos : pos + limit - len(out)] if isinstance(m, Message)]
            out += take
            self.positions[p] = pos + len(take)
        if not out:
            await asyncio.sleep(min(timeout_ms, 5) / 1000)
        return out

    async def commit(self, offsets: dict[Partition, int]) -> None:
        for p, o in offsets.items():
            assert o >= self.broker.committed.get(p, 0), "a commit moved backwards"
            self.broker.committed[p] = o

    def assignment(self) -> list[Partition]:
        return list(self.positions)

    async def behind(self) -> int:
        return 0

    async def lag(self) -> dict[Partition, int]:
        return {}

    async def aclose(self) -> None:
        return None


class FakeProducer:
    """Acknowledges a send by appending it to the topic, or fails it as told."""

    def __init__(self, broker: FakeBroker, *, send_timeout_s: float = 0.5) -> None:
        self.broker = broker
        self.send_timeout_s = send_timeout_s
        self.sent = 0

    def partition_count(self, topic: str) -> int | None:
        parts = self.broker.topics.get(topic)
        return len(parts) if parts else None

    async def existing_topics(self) -> frozenset[str]:
        return frozenset(self.broker.topics)

    async def create_topics(self, topics: Sequence[str]) -> list[str]:
        created = [t for t in topics if t not in self.broker.topics]
        self.broker.create(*created)
        self.broker.failing = {t: e for t, e in self.broker.failing.items() if t not in created}
        return created

    async def enqueue(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes | None = None,
        headers: Sequence[tuple[str, bytes]] = (),
        partition: int | None = None,
    ) -> asyncio.Future[Any]:
        assert isinstance(value, bytes) and (key is None or isinstance(key, bytes))
        for k, v in headers:
            k.encode("utf-8")  # a real client encodes header names; this must not fail
            assert isinstance(v, bytes)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        error = self.broker.failing.get(topic)
        if error is None and topic not in self.broker.topics:
            error = UnknownTopic(topic)
        if error is not None:
            fut.set_exception(error)
            return fut
        parts = self.broker.topics[topic]
        p = partition if partition is not None else 0
        parts[p].append(Record(topic, p, key, value, list(headers)))
        self.sent += 1
        fut.set_result(None)
        return fut


async def run_until_committed(worker: Any, broker: FakeBroker, topic: str) -> None:
    """Run a started worker until every record of ``topic`` is committed (or it stops by
    itself, or 20 s pass), then stop it and wait for its drain."""
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    for _ in range(2000):
        if broker.all_committed(topic) or task.done():
            break
        await asyncio.sleep(0.01)  # polls the fake broker's state; nothing to wait on
    stop.set()
    await asyncio.wait_for(task, 30)


def fake_worker(
    settings: Settings,
    broker: FakeBroker,
    store: ParamStore,
    *,
    version_ttl_s: float = 60.0,
    producer: FakeProducer | None = None,
    **parts: Any,
) -> Worker:
    """A worker on the fake broker, its parameters read from ``store`` through caches of its
    own; ``parts`` go to :class:`Worker` (dedupe, tracing...)."""
    registry = ModelRegistry(
        store, ParamCache(capacity_bytes=10**8, ttl_s=60.0), version_ttl_s=version_ttl_s
    )
    return Worker(
        settings,
        registry=registry,
        producer=producer or FakeProducer(broker),  # type: ignore[arg-type]
        consumer_factory=lambda w: FakeConsumer(broker, w),  # type: ignore[arg-type,return-value]
        **parts,
    )
