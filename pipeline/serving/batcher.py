"""Micro-batching: requests wait per (model, version) until a batch is full or its time is up.

No I/O: it holds items, starts and cancels timers, and hands batches of at most ``max_rows``
rows to ``run``. The clock and timers come in (``call_later``), so tests drive it by hand.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable, Sequence
from typing import Generic, Protocol, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")
BatchKey = tuple[str, int | None]  # (model, pinned version or None for the serving one)


class Timer(Protocol):
    def cancel(self) -> None: ...


CallLater = Callable[[float, Callable[[], None]], Timer]


def _loop_call_later(delay: float, callback: Callable[[], None]) -> Timer:
    return asyncio.get_running_loop().call_later(delay, callback)


class Batcher(Generic[K, T]):
    """Pending work per key. ``add`` runs a key at once when it is full (or waiting is off),
    else starts its timer; ``flush`` runs what waits now (drain, revocation)."""

    def __init__(
        self,
        run: Callable[[K, list[T]], None],
        *,
        rows: Callable[[T], int],
        max_rows: int,
        max_wait_s: float,
        call_later: CallLater = _loop_call_later,
    ) -> None:
        self._run = run
        self._rows = rows
        self.max_rows = max_rows
        self.max_wait_s = max_wait_s
        self._call_later = call_later
        self._pending: dict[K, list[T]] = {}
        self._pending_rows: dict[K, int] = {}
        self._timers: dict[K, Timer] = {}

    @property
    def waiting(self) -> int:
        """Items held, over all keys."""
        return sum(len(items) for items in self._pending.values())

    def add(self, key: K, items: Sequence[T], *, now: bool = False) -> bool:
        """Queue ``items`` under ``key``; True when a timer started (a batch began filling)."""
        self._pending.setdefault(key, []).extend(items)
        rows = self._pending_rows[key] = self._pending_rows.get(key, 0) + sum(
            self._rows(it) for it in items
        )
        if now or self.max_wait_s <= 0 or rows >= self.max_rows:
            self.flush(key)
            return False
        if key in self._timers:
            return False
        self._timers[key] = self._call_later(self.max_wait_s, lambda: self.flush(key))
        return True

    def flush(self, key: K) -> None:
        """Run what waits under ``key`` as batches of at most ``max_rows`` rows."""
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        items = self._pending.pop(key, [])
        self._pending_rows.pop(key, None)
        chunk: list[T] = []
        rows = 0
        for item in items:
            n = self._rows(item)
            if chunk and rows + n > self.max_rows:
                self._run(key, chunk)
                chunk, rows = [], 0
            chunk.append(item)
            rows += n
        if chunk:
            self._run(key, chunk)

    def flush_all(self) -> None:
        for key in list(self._pending):
            self.flush(key)

    def cancel(self) -> None:
        """Stop every timer (closing); what waits is dropped, its offsets never committed."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
