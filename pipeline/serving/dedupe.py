"""Answered once, optionally: request ids recorded in Redis after their answers are acknowledged.

With ``KVPIPE_DEDUPE_TTL`` set, a worker records the ids of every acknowledged answer of a
batch in one round trip (pipelined ``SET key 1 PX ttl``), before their offsets can be
committed, and looks the ids of each fetched batch up in one round trip (``MGET``): a
redelivered request whose id is recorded is skipped and its offset committed.

What is left: a worker killed between a result's acknowledgement and its record answers that
request again after the rebalance (at most the batches acknowledged in that one round trip).
Consumers should still drop duplicate ids. Redis unreachable or slow: dedupe steps aside
(answer anyway, at-least-once), says so once, and tries again after a pause; it never holds
serving up for longer than its own short timeout.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import structlog

from pipeline.errors import KvpipeError
from pipeline.io.kv import KeyValue

log = structlog.get_logger("kvpipe.worker")

__all__ = ["Dedupe", "DedupeStats"]

#: Seconds a Redis call of dedupe may take before it is given up (serving goes on without it).
CALL_TIMEOUT_S = 0.5
#: Seconds dedupe stays off after a failed call before it tries Redis again.
PAUSE_S = 5.0


class DedupeStats:
    """What dedupe did since the worker started."""

    __slots__ = ("degraded", "failures", "lookups", "recorded", "skipped")

    def __init__(self) -> None:
        self.lookups = 0  # ids looked up
        self.skipped = 0  # redelivered requests skipped: already answered
        self.recorded = 0  # answered ids recorded
        self.failures = 0  # calls that failed or took too long (served at-least-once)
        self.degraded = False  # off for now, after a failure


class Dedupe:
    """Which request ids of one consumer group were answered, kept in Redis for ``ttl_s``.

    Keys: ``{key_prefix}:answered:{requests topic}:{group}:{id}`` (ids are at most 256
    characters, checked at intake), so deployments, topics and groups never share a record.
    """

    def __init__(
        self,
        kv: KeyValue,
        *,
        key_prefix: str,
        topic: str,
        group: str,
        ttl_s: float,
        timeout_s: float = CALL_TIMEOUT_S,
        pause_s: float = PAUSE_S,
    ) -> None:
        if not ttl_s > 0:
            raise ValueError("dedupe needs a positive TTL")
        self.kv = kv
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self.pause_s = pause_s
        self.stats = DedupeStats()
        self._prefix = f"{key_prefix}:answered:{topic}:{group}:"
        self._retry_at = 0.0

    def key(self, request_id: str) -> str:
        """The Redis key that records ``request_id`` as answered."""
        return self._prefix + request_id

    async def answered(self, ids: Sequence[str]) -> list[bool]:
        """For each id, whether it was recorded as answered (one round trip). All False when
        dedupe is off for now: answering twice beats not answering."""
        if not ids or not self._available():
            return [False] * len(ids)
        self.stats.lookups += len(ids)
        try:
            async with asyncio.timeout(self.timeout_s):
                found = await self.kv.mget([self.key(i) for i in ids])
        except (KvpipeError, TimeoutError) as exc:
            self._failed("lookup", exc)
            return [False] * len(ids)
        self._succeeded()
        seen = [v is not None for v in found]
        self.stats.skipped += sum(seen)
        return seen

    async def record(self, ids: Sequence[str]) -> None:
        """Record ``ids`` as answered for ``ttl_s`` (one round trip); a failure is logged once
        per outage and costs only the promise (those ids may be answered again)."""
        if not ids or not self._available():
            return
        marks = dict.fromkeys((self.key(i) for i in ids), b"1")
        try:
            async with asyncio.timeout(self.timeout_s):
                await self.kv.set_many(marks, ex=self.ttl_s)
        except (KvpipeError, TimeoutError) as exc:
            self._failed("record", exc)
            return
        self._succeeded()
        self.stats.recorded += len(ids)

    def _available(self) -> bool:
        return not self.stats.degraded or time.monotonic() >= self._retry_at

    def _failed(self, what: str, exc: BaseException) -> None:
        self.stats.failures += 1
        self._retry_at = time.monotonic() + self.pause_s
        if not self.stats.degraded:
            self.stats.degraded = True
            log.warning(
                "dedupe_unavailable",
                during=what,
                error=str(exc) or f"no answer within {self.timeout_s:g} s",
                action=f"answering without dedupe (at-least-once); trying again every "
                f"{self.pause_s:g} s",
            )

    def _succeeded(self) -> None:
        if self.stats.degraded:
            self.stats.degraded = False
            log.info("dedupe_restored", failures=self.stats.failures)
