"""Open-loop load: a send schedule fixed in advance, and the percentiles of what came back.

The sender never waits for answers. Each message has a due time (``start + offsets[i]``); when
the sender wakes it sends every message already due, then sleeps until the next one. When it
cannot keep up, the messages go out late, never fewer or slower on purpose: the lag of every
message is recorded, and :attr:`SendLog.on_schedule` says whether the offered rate was reached.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

Floats = npt.NDArray[np.float64]
Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

# The offered rate counts as reached when the messages went out at >= this share of it.
ON_SCHEDULE_SHARE = 0.95
# Messages sent back to back before the sender yields to the event loop (the reader runs there).
SEND_CHUNK = 256


def schedule(rate: float, duration_s: float) -> Floats:
    """Due offsets (s) of ``round(rate * duration_s)`` messages (at least 1), ``1/rate`` apart."""
    if rate <= 0 or duration_s <= 0:
        raise ValueError("rate and duration must be positive")
    n = max(1, round(rate * duration_s))
    return np.arange(n, dtype=np.float64) / rate


def percentile(samples: Sequence[float] | Floats, q: float) -> float | None:
    """The nearest-rank ``q``-th percentile (0 < q <= 100): a value that was measured."""
    if not 0 < q <= 100:
        raise ValueError("q must be in (0, 100]")
    values = np.sort(np.asarray(samples, dtype=np.float64))
    if values.size == 0:
        return None
    rank = math.ceil(q / 100 * values.size)
    return float(values[max(rank, 1) - 1])


def percentiles(
    samples: Sequence[float] | Floats, qs: Iterable[float] = (50, 95, 99)
) -> dict[str, float | None]:
    """``{"p50": ..., "p95": ..., "p99": ...}`` by nearest rank (None when there is no sample)."""
    return {f"p{q:g}": percentile(samples, q) for q in qs}


@dataclass
class SendLog:
    """When each message was due and when it actually went out (one monotonic clock)."""

    rate: float
    start: float
    offsets: Floats
    sent_at: Floats

    @property
    def count(self) -> int:
        """Messages sent."""
        return int(self.offsets.size)

    @property
    def lag(self) -> Floats:
        """Seconds each message went out after it was due (>= 0)."""
        return np.maximum(self.sent_at - (self.start + self.offsets), 0.0)

    @property
    def span_s(self) -> float:
        """Seconds from the first due time to the last send, plus one interval."""
        return float(self.sent_at[-1] - self.start) + 1.0 / self.rate

    @property
    def offered_rate(self) -> float:
        """Messages per second actually offered (the schedule's rate when it was kept)."""
        return self.count / max(self.span_s, self.count / self.rate)

    @property
    def on_schedule(self) -> bool:
        """Whether the messages went out at (nearly) the rate asked for."""
        return self.offered_rate >= ON_SCHEDULE_SHARE * self.rate


async def run_open_loop(
    rate: float,
    offsets: Floats,
    send: Callable[[int], Awaitable[None]],
    *,
    clock: Clock = time.perf_counter,
    sleep: Sleep = asyncio.sleep,
    start: float | None = None,
) -> SendLog:
    """Send message ``i`` at ``start + offsets[i]`` (``start``: now), never waiting for answers.

    ``send(i)`` should only hand the message over (an enqueue). Late messages are sent at once,
    in order; the schedule is not shifted, so falling behind shows as lag and a lower
    :attr:`SendLog.offered_rate`.
    """
    n = int(offsets.size)
    sent_at = np.zeros(n, dtype=np.float64)
    t0 = clock() if start is None else start
    i = 0
    while i < n:
        now = clock()
        due = t0 + float(offsets[i])
        if due > now:
            await sleep(due - now)
            continue
        burst = 0
        while i < n and t0 + float(offsets[i]) <= now and burst < SEND_CHUNK:
            sent_at[i] = clock()
            await send(i)
            i += 1
            burst += 1
        if burst == SEND_CHUNK:
            await sleep(0)  # let the reader (same loop) take its turn
    return SendLog(rate, t0, offsets, sent_at)
