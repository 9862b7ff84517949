"""Eviction order of the LRU and LFU policies."""

from __future__ import annotations

import pytest

from pipeline.eviction import LFUPolicy, LRUPolicy, make_policy


def test_lru_evicts_least_recently_used() -> None:
    p = LRUPolicy()
    for k in "abc":
        p.add(k)
    p.touch("a")
    assert p.victim() == "b"
    p.remove("b")
    assert p.victim() == "c"
    assert len(p) == 2


def test_lfu_evicts_least_frequent_then_oldest() -> None:
    p = LFUPolicy()
    for k in "abcd":
        p.add(k)
    for _ in range(3):
        p.touch("a")
    p.touch("b")
    p.touch("c")
    assert p.victim() == "d"
    p.remove("d")
    assert p.victim() == "b"  # b and c tie at 2 uses; b was used first
    p.remove("b")
    p.remove("c")
    assert p.victim() == "a"
    p.remove("a")
    assert p.victim() is None


def test_lfu_new_key_is_the_next_victim_over_frequent_ones() -> None:
    p = LFUPolicy()
    p.add("hot")
    for _ in range(5):
        p.touch("hot")
    p.add("new")
    assert p.victim() == "new"


def test_make_policy_refuses_unknown_names() -> None:
    assert make_policy("lfu").name == "lfu"
    with pytest.raises(ValueError, match="lru or lfu"):
        make_policy("fifo")
