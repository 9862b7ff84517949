"""The open-loop schedule, the sender that keeps it (or records that it could not), percentiles."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.bench.loadgen import percentile, percentiles, run_open_loop, schedule


class FakeTime:
    """A clock that moves only when slept on or when a send costs time."""

    def __init__(self, send_cost: float = 0.0) -> None:
        self.now = 100.0
        self.send_cost = send_cost
        self.sleeps: list[float] = []
        self.sent: list[tuple[int, float]] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    async def send(self, i: int) -> None:
        self.sent.append((i, self.now))
        self.now += self.send_cost


def test_schedule_is_evenly_spaced_at_the_rate() -> None:
    offsets = schedule(1000.0, 2.0)
    assert offsets.size == 2000
    assert offsets[0] == 0.0
    assert np.allclose(np.diff(offsets), 1e-3)
    assert schedule(3.0, 0.1).size == 1  # always at least one message
    with pytest.raises(ValueError):
        schedule(0.0, 1.0)


def test_nearest_rank_percentiles_are_measured_values() -> None:
    samples = list(range(1, 101))  # 1..100
    assert percentile(samples, 50) == 50
    assert percentile(samples, 99) == 99
    assert percentile(samples, 100) == 100
    assert percentile([7.0], 99) == 7.0
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0  # order does not matter
    assert percentiles([]) == {"p50": None, "p95": None, "p99": None}
    got = percentiles(np.arange(1000, dtype=np.float64))
    assert got == {"p50": 499.0, "p95": 949.0, "p99": 989.0}
    with pytest.raises(ValueError):
        percentile(samples, 0)


async def test_a_sender_that_keeps_up_sends_each_message_when_due() -> None:
    t = FakeTime()
    offsets = schedule(100.0, 1.0)
    log = await run_open_loop(100.0, offsets, t.send, clock=t.clock, sleep=t.sleep)
    assert [i for i, _ in t.sent] == list(range(100))
    assert np.allclose(log.sent_at, log.start + offsets)
    assert log.lag.max() == pytest.approx(0.0, abs=1e-9)
    assert log.on_schedule
    assert log.offered_rate == pytest.approx(100.0)


async def test_a_sender_that_falls_behind_sends_everything_late_and_says_so() -> None:
    t = FakeTime(send_cost=0.02)  # each send takes 20 ms: at most 50/s against 100/s asked
    offsets = schedule(100.0, 1.0)
    log = await run_open_loop(100.0, offsets, t.send, clock=t.clock, sleep=t.sleep)
    assert [i for i, _ in t.sent] == list(range(100))  # none dropped, in order
    assert not log.on_schedule
    assert log.offered_rate == pytest.approx(50.0, rel=0.05)
    assert log.lag[-1] == pytest.approx(0.99, rel=0.05)  # the schedule was not shifted
    assert all(s >= 0 for s in t.sleeps)


async def test_the_schedule_never_waits_for_answers() -> None:
    t = FakeTime()
    offsets = schedule(1000.0, 0.5)
    log = await run_open_loop(1000.0, offsets, t.send, clock=t.clock, sleep=t.sleep)
    # the total time is the schedule's, whatever happens to the answers
    assert t.now - log.start == pytest.approx(offsets[-1], abs=1e-9)
