"""The consumer-progress watchdog (aiokafka#1154): a consumer that stays behind the broker's
end with nothing fetched for ``stuck_s`` is reported, so the worker can replace it."""

from __future__ import annotations

from typing import Protocol


class Behind(Protocol):
    async def behind(self) -> int | None: ...


class Watchdog:
    """Stuck = behind for ``stuck_s`` with nothing fetched. An idle worker that is caught up
    is not stuck (waiting starts when it falls behind), nor one holding back on purpose
    (``progress()`` is called then too), nor one whose broker cannot be asked."""

    def __init__(self, stuck_s: float, *, now: float) -> None:
        self.stuck_s = stuck_s
        self.every = min(stuck_s / 4, 5.0)
        self._progress = self._next = now
        self._behind_since: float | None = None

    def progress(self, now: float) -> None:
        """Something was fetched (or fetching is held back on purpose)."""
        self._progress = now

    async def check(self, consumer: Behind, now: float) -> tuple[int, float] | None:
        """(messages behind, seconds stuck) when the consumer should be replaced, else None."""
        if not self.stuck_s or now < self._next or now - self._progress < self.every:
            return None
        self._next = now + self.every
        behind = await consumer.behind()
        if not behind:
            self._behind_since = None
        elif self._behind_since is None or self._behind_since < self._progress:
            self._behind_since = now
        elif now - self._behind_since >= self.stuck_s:
            stuck = now - self._behind_since
            self._progress, self._behind_since = now, None
            return behind, stuck
        return None
