"""Training announcements: what a publish changed, told to every worker on the updates topic.

Each worker reads every partition of the updates topic (no consumer group: every worker must
see every announcement), from the end at start, and applies each one to its cache. The TTL
of the version pointer is the safety net when an announcement is lost.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import orjson
import structlog

from pipeline.config import KafkaSettings
from pipeline.errors import BrokerUnavailable, UnreadableMessage
from pipeline.io.kafka import Consumer, Producer
from pipeline.names import is_valid_name
from pipeline.params.registry import ModelRegistry
from pipeline.resource import AsyncResource

log = structlog.get_logger("kvpipe.updates")

Kind = Literal["dense", "embedding", "rollback"]


@dataclass(frozen=True)
class Announcement:
    """One publish: a dense model's new serving version, or rows of an embedding table."""

    model: str
    kind: Kind
    version: int | None = None
    table: str | None = None
    rows: tuple[int, ...] = ()
    published_at: float = field(default_factory=time.time)

    def to_bytes(self) -> bytes:
        return orjson.dumps(
            {
                "model": self.model,
                "kind": self.kind,
                "version": self.version,
                "table": self.table,
                "rows": list(self.rows),
                "published_at": self.published_at,
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Announcement:
        try:
            raw = orjson.loads(data)
            kind = raw["kind"]
            if kind not in ("dense", "embedding", "rollback"):
                raise ValueError(f"unknown kind {kind!r}")
            version = raw.get("version")
            model, table = raw["model"], raw.get("table")
            if not is_valid_name(model) or not (table is None or is_valid_name(table)):
                raise ValueError("the model or table is not a valid name")
            return cls(
                model=model,
                kind=kind,
                version=None if version is None else int(version),
                table=table,
                rows=tuple(int(r) for r in raw.get("rows") or ()),
                published_at=float(raw.get("published_at") or 0.0),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UnreadableMessage(f"not an announcement: {exc}") from None


async def announce(producer: Producer, kafka: KafkaSettings, announcement: Announcement) -> None:
    """Send an announcement and wait for the broker to acknowledge it."""
    await producer.send(
        kafka.updates_topic, announcement.to_bytes(), key=announcement.model.encode()
    )


def apply(registry: ModelRegistry, announcement: Announcement) -> None:
    """Apply one announcement to a worker's cache."""
    if announcement.kind in ("dense", "rollback") and announcement.version is not None:
        registry.set_version(announcement.model, announcement.version)
    if announcement.kind == "embedding":
        if announcement.table is not None and announcement.rows:
            registry.invalidate_rows(
                announcement.model, announcement.table, list(announcement.rows)
            )
        if announcement.version is not None:
            registry.set_version(announcement.model, announcement.version)


@dataclass
class ListenerStats:
    """Counters of the update listener."""

    applied: int = 0
    unreadable: int = 0
    lag_ms_last: float = 0.0


class UpdateListener(AsyncResource):
    """Applies every announcement on the updates topic to ``registry`` while running."""

    def __init__(self, kafka: KafkaSettings, registry: ModelRegistry) -> None:
        self.kafka = kafka
        self.registry = registry
        self.stats = ListenerStats()
        self._consumer = Consumer(
            kafka,
            [kafka.updates_topic],
            group_id=None,
            assign_from="end",
            auto_offset_reset="latest",
            fetch_max_wait_ms=max(kafka.fetch_max_wait_ms, 100),  # rare; idle polls cost CPU
        )
        self._closed = False

    async def start(self) -> None:
        await self._consumer.start()

    async def aclose(self) -> None:
        """Stop reading; safe to call twice."""
        if not self._closed:
            self._closed = True
            await self._consumer.aclose()

    async def run(self, stop: asyncio.Event) -> None:
        """Read and apply until ``stop`` is set."""
        while not stop.is_set():
            try:
                messages = await self._consumer.getmany(timeout_ms=100, max_records=1000)
            except BrokerUnavailable as exc:
                log.warning("updates_fetch_failed", error=str(exc))
                await asyncio.sleep(0.5)
                continue
            self.apply_messages([m.value or b"" for m in messages])

    def apply_messages(self, values: Sequence[bytes]) -> list[Announcement]:
        applied: list[Announcement] = []
        for value in values:
            try:
                ann = Announcement.from_bytes(value)
            except UnreadableMessage as exc:
                self.stats.unreadable += 1
                log.warning("announcement_unreadable", error=str(exc))
                continue
            apply(self.registry, ann)
            self.stats.applied += 1
            self.stats.lag_ms_last = max(0.0, (time.time() - ann.published_at) * 1000)
            applied.append(ann)
            log.info(
                "update_applied",
                model=ann.model,
                kind=ann.kind,
                version=ann.version,
                rows=len(ann.rows),
                lag_ms=round(self.stats.lag_ms_last, 1),
            )
        return applied
