"""The watchdog's decision, on a fake consumer and a clock the test moves."""

from __future__ import annotations

from pipeline.serving.watchdog import Watchdog


class Consumer:
    def __init__(self, behind: int | None) -> None:
        self.behind_by = behind
        self.asked = 0

    async def behind(self) -> int | None:
        self.asked += 1
        return self.behind_by


async def test_behind_with_nothing_fetched_for_the_whole_time_is_stuck() -> None:
    dog, consumer = Watchdog(8.0, now=0.0), Consumer(behind=5)
    assert await dog.check(consumer, 2.0) is None  # starts waiting: behind since 2 s
    assert await dog.check(consumer, 6.0) is None
    assert await dog.check(consumer, 10.0) == (5, 8.0)
    assert await dog.check(consumer, 11.0) is None  # reported once, then waits again


async def test_caught_up_held_back_or_unanswerable_is_not_stuck() -> None:
    for behind in (0, None):
        dog, consumer = Watchdog(4.0, now=0.0), Consumer(behind=behind)
        for t in range(1, 30):
            assert await dog.check(consumer, float(t)) is None
    dog, consumer = Watchdog(4.0, now=0.0), Consumer(behind=3)
    for t in range(1, 30):
        dog.progress(float(t))  # fetching (or holding back on purpose) all along
        assert await dog.check(consumer, float(t)) is None
    assert consumer.asked == 0


async def test_off_when_zero() -> None:
    dog, consumer = Watchdog(0.0, now=0.0), Consumer(behind=9)
    assert await dog.check(consumer, 1000.0) is None and consumer.asked == 0
