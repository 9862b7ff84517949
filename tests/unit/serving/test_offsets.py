"""In-order commits whatever order messages finish in."""

from __future__ import annotations

import pytest

from pipeline.serving.commits import OffsetTracker


def test_position_advances_only_over_a_finished_prefix() -> None:
    t = OffsetTracker()
    for o in (10, 11, 12, 13):
        t.add("p0", o)
    t.finish("p0", 12)
    assert t.committable() == {}
    t.finish("p0", 10)
    assert t.committable() == {"p0": 11}
    t.finish("p0", 11)
    assert t.committable() == {"p0": 13}
    t.committed({"p0": 13})
    assert t.committable() == {}
    assert t.in_flight == 1
    t.finish("p0", 13)
    assert t.committable() == {"p0": 14} and t.in_flight == 0


def test_partitions_are_independent_and_forget_drops_pending() -> None:
    t = OffsetTracker()
    t.add("a", 0)
    t.add("a", 1)
    t.add("b", 5)
    t.finish("b", 5)
    assert t.committable() == {"b": 6}
    assert t.committable(["a"]) == {}
    assert t.forget(["a"]) == 2
    assert t.in_flight == 0
    t.finish("a", 0)  # late finish of a revoked partition is ignored
    assert "a" not in t.committable()


def test_offsets_must_increase() -> None:
    t = OffsetTracker()
    t.add("p", 3)
    with pytest.raises(ValueError):
        t.add("p", 3)


async def test_wait_idle() -> None:
    t = OffsetTracker()
    t.add("p", 0)
    assert not await t.wait_idle(["p"], 0.01)
    t.finish("p", 0)
    assert await t.wait_idle(None, 0.01)
