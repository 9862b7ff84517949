"""The micro-batcher by hand: no event loop timers, no I/O."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipeline.serving.batcher import Batcher


class Timers:
    """A fake ``call_later``: timers fire when the test says so."""

    def __init__(self) -> None:
        self.pending: list[tuple[float, Callable[[], None], Timer]] = []

    def __call__(self, delay: float, callback: Callable[[], None]) -> Timer:
        timer = Timer()
        self.pending.append((delay, callback, timer))
        return timer

    def fire_all(self) -> None:
        due, self.pending = self.pending, []
        for _, callback, timer in due:
            if not timer.cancelled:
                callback()


class Timer:
    cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


def make(
    max_rows: int = 4, max_wait_s: float = 0.01
) -> tuple[Batcher[Any, int], list[Any], Timers]:
    runs: list[tuple[Any, list[int]]] = []
    timers = Timers()
    batcher: Batcher[Any, int] = Batcher(
        lambda key, items: runs.append((key, items)),
        rows=lambda n: n,
        max_rows=max_rows,
        max_wait_s=max_wait_s,
        call_later=timers,
    )
    return batcher, runs, timers


def test_waits_for_its_time_then_runs_what_it_holds() -> None:
    batcher, runs, timers = make()
    assert batcher.add(("m", None), [1]) is True  # a timer started: the caller prefetches
    assert batcher.add(("m", None), [1]) is False  # same batch, same timer
    assert runs == [] and batcher.waiting == 2
    timers.fire_all()
    assert runs == [(("m", None), [1, 1])] and batcher.waiting == 0


def test_runs_at_once_when_full_and_splits_by_rows() -> None:
    batcher, runs, timers = make(max_rows=4)
    batcher.add(("m", 1), [2, 1])
    batcher.add(("m", 1), [3])  # 6 rows >= 4: runs now, as batches of at most 4 rows
    assert runs == [(("m", 1), [2, 1]), (("m", 1), [3])]
    timers.fire_all()  # the cancelled timer does nothing
    assert len(runs) == 2


def test_keys_batch_apart_and_a_request_larger_than_a_batch_runs_alone() -> None:
    batcher, runs, _ = make(max_rows=4)
    batcher.add(("a", None), [1])
    batcher.add(("b", 2), [9])
    batcher.flush_all()
    assert sorted(runs) == [(("a", None), [1]), (("b", 2), [9])]


def test_no_waiting_when_max_wait_is_zero_or_told_to_run_now() -> None:
    batcher, runs, timers = make(max_wait_s=0)
    batcher.add("k", [1])
    assert runs == [("k", [1])] and timers.pending == []
    batcher, runs, timers = make()
    batcher.add("k", [1], now=True)  # draining: nothing waits
    assert runs == [("k", [1])] and timers.pending == []


def test_cancel_stops_every_timer() -> None:
    batcher, runs, timers = make()
    batcher.add("a", [1])
    batcher.add("b", [1])
    batcher.cancel()
    timers.fire_all()
    assert runs == []
