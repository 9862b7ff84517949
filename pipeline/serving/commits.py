"""Offsets: the in-order book of what is answered, and when and how it is committed.

A partition is committed only up to its first unfinished message; on a timer, on revocation
(the revoked partitions' finished work, then they are forgotten) and at drain. With a
``settle`` step (dedupe), the offsets are taken, then ``settle`` waits for what must land
before them (the records of their answers), then they are committed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Iterable
from typing import Protocol, cast

import structlog

from pipeline.errors import BrokerUnavailable
from pipeline.io.kafka import CommitRejected, Partition
from pipeline.serving.stats import WorkerStats

log = structlog.get_logger("kvpipe.worker")


class _Book:
    __slots__ = ("committed", "done", "pending", "position")

    def __init__(self) -> None:
        self.pending: deque[int] = deque()
        self.done: set[int] = set()
        self.position: int | None = None
        self.committed: int | None = None


class OffsetTracker:
    """Tracks fetched offsets per partition and which have been fully answered.

    A message is finished when its result (or dead-letter record) is acknowledged by the
    broker. The committable position of a partition is one past the last message before which
    every message is finished, whatever order they finished in.
    """

    def __init__(self) -> None:
        self._books: dict[Hashable, _Book] = {}
        self._in_flight = 0
        self._changed = asyncio.Event()

    @property
    def in_flight(self) -> int:
        """Messages fetched but not yet finished, over all partitions."""
        return self._in_flight

    def in_flight_for(self, partitions: Iterable[Hashable]) -> int:
        return sum(len(self._books[p].pending) for p in partitions if p in self._books)

    def add(self, partition: Hashable, offset: int) -> None:
        """A message was fetched and is now being worked on."""
        book = self._books.get(partition)
        if book is None:
            book = self._books[partition] = _Book()
        if book.pending and offset <= book.pending[-1]:
            raise ValueError(f"offset {offset} of {partition} is not after {book.pending[-1]}")
        book.pending.append(offset)
        self._in_flight += 1

    def finish(self, partition: Hashable, offset: int) -> None:
        """A message's answer was acknowledged; advance the partition's position if we can."""
        book = self._books.get(partition)
        if book is None:
            return  # partition was revoked and forgotten meanwhile
        book.done.add(offset)
        while book.pending and book.pending[0] in book.done:
            first = book.pending.popleft()
            book.done.discard(first)
            book.position = first + 1
            self._in_flight -= 1
        self._changed.set()

    def committable(self, partitions: Iterable[Hashable] | None = None) -> dict[Hashable, int]:
        """Partitions whose position moved since their last commit, with that position."""
        names = self._books if partitions is None else partitions
        out: dict[Hashable, int] = {}
        for name in names:
            book = self._books.get(name)
            if book is not None and book.position is not None and book.position != book.committed:
                out[name] = book.position
        return out

    def committed(self, offsets: dict[Hashable, int]) -> None:
        """Record that ``offsets`` were committed."""
        for name, position in offsets.items():
            book = self._books.get(name)
            if book is not None:
                book.committed = position

    def forget(self, partitions: Iterable[Hashable]) -> int:
        """Drop partitions (revoked); returns how many unfinished messages were dropped."""
        dropped = 0
        for name in partitions:
            book = self._books.pop(name, None)
            if book is not None:
                dropped += len(book.pending)
        self._in_flight -= dropped
        self._changed.set()
        return dropped

    async def wait_changed(self, timeout: float) -> None:
        """Wait until some message finishes (or ``timeout`` passes)."""
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    async def wait_idle(self, partitions: Iterable[Hashable] | None, timeout: float) -> bool:
        """Wait until the partitions (all when None) have nothing in flight; False on timeout."""
        names = list(self._books if partitions is None else partitions)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.in_flight_for(names) > 0:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            await self.wait_changed(min(remaining, 0.5))
        return True


class Committer(Protocol):
    """What commits need of a consumer."""

    async def commit(self, offsets: dict[Partition, int]) -> None: ...


class Commits:
    """The commit policy over an :class:`OffsetTracker`: every ``interval_s``, on revocation
    and at drain; a refused commit is counted and logged, and tried again next time."""

    def __init__(
        self,
        stats: WorkerStats,
        *,
        interval_s: float,
        settle: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.book = OffsetTracker()
        self.stats = stats
        self.interval_s = interval_s
        self.settle = settle

    async def commit(self, consumer: Committer) -> None:
        """Commit every partition whose position moved."""
        offsets = self.book.committable()
        if not offsets:
            return
        if self.settle is not None:
            await self.settle()
        try:
            await consumer.commit(cast(dict[Partition, int], offsets))
        except (CommitRejected, BrokerUnavailable) as exc:
            self.stats.commit_failures += 1
            log.warning("commit_failed", error=str(exc))
            return
        self.book.committed(offsets)
        self.stats.commits += 1

    async def revoke(
        self, consumer: Committer, partitions: list[Partition], *, timeout_s: float
    ) -> tuple[bool, int]:
        """Wait (bounded) for the partitions' work, commit it, forget them.

        Returns whether everything finished, and how many unfinished messages were dropped
        (left uncommitted: the next owner answers them again)."""
        idle = await self.book.wait_idle(partitions, timeout_s)
        offsets = self.book.committable(partitions)
        if self.settle is not None:
            await self.settle()
        try:
            await consumer.commit(cast(dict[Partition, int], offsets))
            self.book.committed(offsets)
        except (CommitRejected, BrokerUnavailable) as exc:
            self.stats.commit_failures += 1
            log.warning("commit_on_revoke_failed", error=str(exc))
        return idle, self.book.forget(partitions)
