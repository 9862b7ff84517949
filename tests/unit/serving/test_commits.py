"""The commit policy over the offset book, with a fake consumer."""

from __future__ import annotations

import pytest

from pipeline.errors import BrokerUnavailable
from pipeline.io.kafka import CommitRejected, Partition
from pipeline.serving.commits import Commits
from pipeline.serving.stats import WorkerStats

P0, P1 = Partition("t", 0), Partition("t", 1)


class FakeConsumer:
    def __init__(self) -> None:
        self.commits: list[dict[Partition, int]] = []
        self.fail: Exception | None = None

    async def commit(self, offsets: dict[Partition, int]) -> None:
        if self.fail is not None:
            raise self.fail
        self.commits.append(dict(offsets))


async def test_commits_in_order_up_to_the_first_unanswered_message() -> None:
    commits, consumer = Commits(WorkerStats(), interval_s=0.1), FakeConsumer()
    for offset in (10, 11, 12):
        commits.book.add(P0, offset)
    commits.book.finish(P0, 12)  # out of order: nothing committable yet
    await commits.commit(consumer)
    assert consumer.commits == []
    commits.book.finish(P0, 10)
    await commits.commit(consumer)
    commits.book.finish(P0, 11)
    await commits.commit(consumer)
    await commits.commit(consumer)  # nothing moved: no commit sent
    assert consumer.commits == [{P0: 11}, {P0: 13}]
    assert commits.stats.commits == 2 and commits.book.in_flight == 0


@pytest.mark.parametrize("error", [CommitRejected("revoked"), BrokerUnavailable("gone")])
async def test_a_refused_commit_is_counted_and_tried_again(error: Exception) -> None:
    commits, consumer = Commits(WorkerStats(), interval_s=0.1), FakeConsumer()
    commits.book.add(P0, 0)
    commits.book.finish(P0, 0)
    consumer.fail = error
    await commits.commit(consumer)
    assert commits.stats.commit_failures == 1 and consumer.commits == []
    consumer.fail = None
    await commits.commit(consumer)
    assert consumer.commits == [{P0: 1}]


async def test_revoke_commits_finished_work_and_forgets_the_rest() -> None:
    commits, consumer = Commits(WorkerStats(), interval_s=0.1), FakeConsumer()
    for p in (P0, P1):
        commits.book.add(p, 0)
        commits.book.add(p, 1)
    commits.book.finish(P0, 0)
    commits.book.finish(P1, 0)
    commits.book.finish(P1, 1)
    idle, dropped = await commits.revoke(consumer, [P0], timeout_s=0.05)
    assert (idle, dropped) == (False, 1)  # P0@1 never answered: left for the next owner
    assert consumer.commits == [{P0: 1}]
    assert commits.book.in_flight == 0 + 0  # P1 finished, P0 forgotten
    await commits.commit(consumer)
    assert consumer.commits[-1] == {P1: 2}
