"""Answered once, optionally: request ids recorded in Redis after their answers are acknowledged.

With ``KVPIPE_DEDUPE_TTL`` set, a worker records the ids of acknowledged answers in one
round trip per batch (one ``HSET`` of the ids into the hash of the current time bucket, sent
as soon as the acknowledgements are in), before their offsets can be committed, and looks
the ids of a fetched batch up (``HMGET`` on the current and the previous bucket, sent at
once): a redelivered request whose id is recorded with its message's :func:`fingerprint` (the
value and headers) is skipped and its offset committed. Another message under a recorded id
(a corrected resend, a stranger claiming the id) is a new request and answered.

Only a message another worker may have answered is looked up: one produced before this
worker's latest assignment of its partition (a previous owner stopped before that), with
:data:`CLOCK_SLACK_S` for producers whose clocks run ahead. In steady state, once a minute
has passed since the last rebalance, nothing is looked up at all. A producer clock ahead by
more than that is answered again (at-least-once).

Buckets are ``ttl`` seconds of wall-clock time (``floor(epoch / ttl)``, so every worker of the
group agrees while their clocks agree to well within ``ttl``); a bucket's hash expires
``2 ttl`` after it was first written, so an id is remembered for at least ``ttl`` and at
most ``2 ttl`` seconds. One command per batch with the ids as its arguments costs far less
than a ``SET`` per id (measured: ``kvpipe bench dedupe``).

What is left: a worker killed between a result's acknowledgement and its record answers that
request again after the rebalance (at most the batches acknowledged in that one round trip).
Consumers should still drop duplicate ids. Redis unreachable or slow: dedupe steps aside
(answer anyway, at-least-once), says so once, and tries again after a pause; it never holds
the fetch loop, and a batch or a commit waits for it at most its call timeout.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Hashable, Iterable, Sequence

import structlog

from pipeline.errors import KvpipeError
from pipeline.io.kafka import Message
from pipeline.io.kv import KeyValue

log = structlog.get_logger("kvpipe.worker")

__all__ = ["Dedupe", "DedupeStats", "fingerprint"]

#: Seconds a Redis call of dedupe may take before it is given up (serving goes on without
#: it). Neither call holds the fetch loop: a lookup delays only its own batch, a record only
#: the next commit.
CALL_TIMEOUT_S = 2.0
#: Seconds dedupe stays off after a failed call before it tries Redis again.
PAUSE_S = 5.0
#: Messages stamped up to this long after an assignment are looked up too (producer clocks
#: ahead of the worker's).
CLOCK_SLACK_S = 60.0


def fingerprint(message: Message) -> bytes:
    """What makes a redelivery the same request: its value and headers (reply-to and deadline
    among them), 16 bytes. Another message under a recorded id (a corrected resend, or a
    stranger's request reusing the id) does not match, so it is answered."""
    h = hashlib.blake2b(message.value or b"", digest_size=16)
    for name, value in message.headers:
        h.update(b"\0%d:%s\0" % (len(name), name.encode("utf-8", "surrogatepass")))
        h.update(value)
    return h.digest()


class DedupeStats:
    """What dedupe did since the worker started."""

    __slots__ = (
        "degraded", "failures", "lookups", "record_calls", "record_s", "record_s_max",
        "recorded", "skipped",
    )  # fmt: skip

    def __init__(self) -> None:
        self.lookups = 0  # ids looked up
        self.skipped = 0  # redelivered requests skipped: already answered
        self.recorded = 0  # answered ids recorded
        self.record_calls = 0  # record round trips that succeeded
        self.record_s = 0.0  # their total time: acknowledged but not yet recorded (the window)
        self.record_s_max = 0.0
        self.failures = 0  # calls that failed or took too long (served at-least-once)
        self.degraded = False  # off for now, after a failure

    def as_dict(self) -> dict[str, float | int | bool]:
        calls = max(1, self.record_calls)
        return {
            "lookups": self.lookups,
            "skipped": self.skipped,
            "recorded": self.recorded,
            "ids_per_record": round(self.recorded / calls, 2),
            "record_ms_mean": round(self.record_s / calls * 1000, 3),
            "record_ms_max": round(self.record_s_max * 1000, 3),
            "failures": self.failures,
            "degraded": self.degraded,
        }


class Dedupe:
    """Which request ids of one consumer group were answered, kept in Redis for ``ttl_s``
    to ``2 ttl_s`` seconds.

    Keys: ``{key_prefix}:answered:{requests topic}:{group}:{bucket}``, hashes whose fields
    are the ids (at most 256 characters, checked at intake), so deployments, topics and
    groups never share a record. ``clock`` is the wall clock (epoch seconds).
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
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not ttl_s > 0:
            raise ValueError("dedupe needs a positive TTL")
        self.kv = kv
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self.pause_s = pause_s
        self.stats = DedupeStats()
        self.clock = clock
        self._prefix = f"{key_prefix}:answered:{topic}:{group}:"
        self._retry_at = 0.0
        self._expiring = -1  # the bucket this worker has set the expiry of
        self._pending: set[asyncio.Task[None]] = set()  # records under way
        self._lookup_until: dict[Hashable, float] = {}  # partition -> newest suspect, epoch ms

    def assigned(self, partitions: Iterable[Hashable]) -> None:
        """This worker now owns ``partitions``: what was produced until now (and the clock
        slack) may have been answered by their previous owner."""
        until = (self.clock() + CLOCK_SLACK_S) * 1000
        for partition in partitions:
            self._lookup_until[partition] = until

    def may_be_answered(self, partition: Hashable, timestamp_ms: float) -> bool:
        """Whether a message of ``partition`` stamped ``timestamp_ms`` may have been answered
        by another worker (so it is worth a lookup)."""
        return timestamp_ms <= self._lookup_until.get(partition, -1.0)

    def bucket(self) -> int:
        """The time bucket answers are recorded in now."""
        return int(self.clock() // self.ttl_s)

    def key(self, bucket: int) -> str:
        """The Redis hash holding the ids answered during ``bucket``."""
        return f"{self._prefix}{bucket}"

    async def answered(self, entries: Sequence[tuple[str, bytes]]) -> list[bool]:
        """For each (id, :func:`fingerprint`), whether that request was recorded as answered
        (one round trip): the id with a different message under it is a new request. All
        False when dedupe is off for now: answering twice beats not answering."""
        if not entries or not self._available():
            return [False] * len(entries)
        ids = [rid for rid, _ in entries]
        self.stats.lookups += len(ids)
        now = self.bucket()
        try:
            async with asyncio.timeout(self.timeout_s):
                current, previous = await asyncio.gather(
                    self.kv.hmget(self.key(now), ids), self.kv.hmget(self.key(now - 1), ids)
                )
        except (KvpipeError, TimeoutError) as exc:
            self._failed("lookup", exc)
            return [False] * len(ids)
        self._succeeded()
        seen = [fp in (c, p) for (_, fp), c, p in zip(entries, current, previous, strict=True)]
        self.stats.skipped += sum(seen)
        return seen

    async def record(self, entries: Sequence[tuple[str, bytes]]) -> None:
        """Record (id, fingerprint) pairs as answered for ``ttl_s`` (one round trip); a failure
        is logged once per outage and costs only the promise (they may be answered again)."""
        if not entries or not self._available():
            return
        bucket = self.bucket()
        key = self.key(bucket)
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout_s):
                await self.kv.hset_many(key, dict(entries))
                if bucket != self._expiring:  # once per bucket and worker: the hash expires
                    await self.kv.expire(key, 2 * self.ttl_s)
                    self._expiring = bucket
        except (KvpipeError, TimeoutError) as exc:
            self._failed("record", exc)
            return
        took = time.perf_counter() - started
        self._succeeded()
        st = self.stats
        st.recorded += len(entries)
        st.record_calls += 1
        st.record_s += took
        st.record_s_max = max(st.record_s_max, took)

    def record_soon(self, entries: Sequence[tuple[str, bytes]]) -> None:
        """Start recording ``ids`` (their answers were just acknowledged) at once, in a task
        of its own: the sooner the command is on the wire, the narrower the window.
        :meth:`settle` waits for it; the answers' offsets need not, only their commit."""
        if not entries or not self._available():
            return
        task = asyncio.get_running_loop().create_task(self.record(entries))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def settle(self) -> None:
        """Wait until every record started so far has landed or failed: call it after taking
        the offsets to commit and before committing them."""
        pending = list(self._pending)  # before any await: exactly the records started so far
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    def abandon(self) -> None:
        """Drop the records under way, as a process that dies does (their answers may be
        given again: the window)."""
        for task in list(self._pending):
            task.cancel()

    async def aclose(self) -> None:
        """Wait for the records still under way (each bounded by the call timeout)."""
        await self.settle()

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
