"""Eviction order of the LRU, LFU and W-TinyLFU policies, and W-TinyLFU's frequency sketch."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Hashable

import numpy as np
import pytest

from pipeline.cache.cache import ParamCache
from pipeline.cache.eviction import (
    FrequencySketch,
    LFUPolicy,
    LRUPolicy,
    Policy,
    WTinyLFUPolicy,
    make_policy,
)


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
    with pytest.raises(ValueError, match="lru, lfu or wtinylfu"):
        make_policy("fifo")


def test_make_policy_wtinylfu_with_and_without_a_capacity_hint() -> None:
    hinted = make_policy("wtinylfu", 1000)
    assert isinstance(hinted, WTinyLFUPolicy) and hinted.name == "wtinylfu"
    assert hinted.sketch.width == 16384 and hinted.sketch.sample_size == 10_000
    bare = make_policy("wtinylfu")
    assert isinstance(bare, WTinyLFUPolicy) and bare.capacity is None
    assert make_policy("lru", 5).name == "lru"  # the hint is ignored where it means nothing
    with pytest.raises(ValueError):
        WTinyLFUPolicy(0)
    with pytest.raises(ValueError):
        WTinyLFUPolicy(10, window_ratio=1.0)


# --- the frequency sketch -------------------------------------------------------------------


def test_sketch_counts_and_caps_at_15() -> None:
    sketch = FrequencySketch(1000)  # sample of 10,000: no aging in this test
    assert sketch.depth == 4 and sketch.width == 16384
    for i in range(7):
        sketch.increment(("a", i))
    for _ in range(9):
        sketch.increment("b")
    assert [sketch.frequency(("a", i)) for i in range(7)] == [1] * 7
    assert sketch.frequency("b") == 9
    assert sketch.frequency("never") == 0
    for _ in range(20):
        sketch.increment("b")
    assert sketch.frequency("b") == 15
    assert sketch.additions == 7 + 9 + 6  # increments of fully capped counters are not counted


def test_sketch_aging_halves_every_counter_each_sample() -> None:
    sketch = FrequencySketch(2, sample_factor=10)  # ages every 20 counted increments
    assert sketch.sample_size == 20
    for _ in range(11):
        sketch.increment("x")
    for _ in range(8):
        sketch.increment("y")
    assert (sketch.frequency("x"), sketch.frequency("y"), sketch.additions) == (11, 8, 19)
    sketch.increment("y")  # the 20th: everything halves
    assert (sketch.frequency("x"), sketch.frequency("y"), sketch.additions) == (5, 4, 10)
    sketch.age()
    assert (sketch.frequency("x"), sketch.frequency("y"), sketch.additions) == (2, 2, 5)


def test_sketch_growth_keeps_every_estimate() -> None:
    sketch = FrequencySketch(20)  # a sample of 200 counted increments: no aging here
    keys = [(i, "k") for i in range(40)]
    for i, key in enumerate(keys):
        for _ in range(i % 7):
            sketch.increment(key)
    before = [sketch.frequency(k) for k in keys]
    width = sketch.width
    sketch.ensure_capacity(5)  # smaller: nothing happens
    assert sketch.width == width and sketch.capacity == 20
    sketch.ensure_capacity(1000)
    assert sketch.width == 16384 > width and sketch.sample_size == 10_000
    after = [sketch.frequency(k) for k in keys]
    assert all(a >= b for a, b in zip(after, before, strict=True))
    assert after == [i % 7 for i in range(40)]  # few keys, wide rows: the counts are exact


def test_sketch_seed_changes_the_columns() -> None:
    a, b = FrequencySketch(4, seed=1), FrequencySketch(4, seed=2)
    a.increment("k")
    b.increment("k")
    assert np.flatnonzero(a._view).tolist() != np.flatnonzero(b._view).tolist()


# --- W-TinyLFU --------------------------------------------------------------------------------


def fill(policy: Policy, present: set[Hashable], key: Hashable, capacity: int) -> bool:
    """One access the way the cache makes it: hit -> touch; miss -> evict when full, add."""
    if key in present:
        policy.touch(key)
        return True
    if len(present) >= capacity:
        out = policy.victim()
        assert out is not None
        policy.remove(out)
        present.remove(out)
    policy.add(key)
    present.add(key)
    return False


def test_one_hit_wonder_scan_does_not_evict_a_frequent_key() -> None:
    for policy in (WTinyLFUPolicy(100), WTinyLFUPolicy()):
        present: set[Hashable] = set()
        for i in range(60):
            fill(policy, present, "hot", 100)
            fill(policy, present, ("warm", i % 50), 100)
        for i in range(5000):  # a scan of keys seen once, 50x the cache
            fill(policy, present, ("scan", i), 100)
            assert "hot" in present, i
        assert len(policy) == 100
    lru: Policy = LRUPolicy()
    present = set()
    fill(lru, present, "hot", 100)
    for i in range(100):
        fill(lru, present, ("scan", i), 100)
    assert "hot" not in present


def test_admission_compares_window_candidate_with_probation_victim() -> None:
    p = WTinyLFUPolicy(10, window_ratio=0.1)  # window 1, protected share int(0.8 * 9) = 7
    for k in range(10):
        p.add(k)
    assert p.region_sizes() == (1, 9, 0) and p.region_of(9) == "window"
    assert p.victim() == 9  # candidate 9 and probation's LRU 0 were both seen once: tie -> 9
    assert p.victim() == 9  # asking again changes nothing
    p.touch(9)
    assert p.victim() == 0  # 9 is now more frequent than probation's LRU
    p.touch(0)
    assert p.region_of(0) == "protected"
    assert p.victim() == 1
    p.touch(1)
    p.touch(1)
    assert p.victim() == 2 and p.region_of(1) == "protected"
    p.remove(2)
    p.add("new")  # 9 overflows the window into probation's MRU end
    assert p.region_of("new") == "window" and p.region_of(9) == "probation"
    assert p.region_sizes() == (1, 7, 2)


def test_protected_overflow_is_demoted_to_probation() -> None:
    p = WTinyLFUPolicy(10, window_ratio=0.1)
    for k in range(10):
        p.add(k)
    for k in range(9):  # promote all 9 probation keys; protected holds at most 7
        p.touch(k)
    assert p.region_sizes() == (1, 2, 7)
    assert p.region_of(0) == "probation" and p.region_of(1) == "probation"
    assert p.region_of(8) == "protected"
    p.remove(5)
    p.remove(6)
    p.remove(7)  # probation still has 0 and 1; victim() takes from it first
    assert p.victim() in {0, 9}


def test_victim_falls_back_when_regions_are_empty() -> None:
    p = WTinyLFUPolicy(3, window_ratio=0.1)  # window 1, protected share int(0.8 * 2) = 1
    assert p.victim() is None
    p.add("a")
    assert p.victim() == "a"  # only the window holds anything
    p.add("b")
    p.add("c")
    p.touch("a")  # probation -> protected
    p.remove("b")
    assert p.region_sizes() == (1, 0, 1)
    assert p.victim() == "c"  # probation empty: candidate c (1) against protected's a (2)
    for _ in range(3):
        p.touch("c")
    assert p.victim() == "a"
    p.remove("c")  # the window is now below its share: the main gives the victim
    assert p.victim() == "a"


def test_wtinylfu_protocol_invariants_under_random_operations() -> None:
    rng = random.Random(5)
    for capacity in (None, 1, 3, 40):
        p = WTinyLFUPolicy(capacity, window_ratio=0.1)
        present: set[Hashable] = set()
        for _ in range(3000):
            op = rng.random()
            key = min(int(rng.paretovariate(0.8)), 120)
            if op < 0.5:
                fill(p, present, key, capacity or 25)
            elif op < 0.6:
                p.remove(key)  # absent keys are a no-op
                present.discard(key)
            elif op < 0.7:
                p.touch(key)  # touching an absent key is a no-op
            else:
                out = p.victim()
                assert (out is None) == (not present)
                assert out is None or out in present
            assert len(p) == len(present) == sum(p.region_sizes())
            assert all(p.region_of(k) is not None for k in present)
        drained = set()
        while (out := p.victim()) is not None:  # every key added and not removed goes
            assert out not in drained
            drained.add(out)
            p.remove(out)
        assert drained == present and len(p) == 0
        p.remove("absent")
        p.touch("absent")
        assert len(p) == 0 and p.victim() is None


def test_adding_a_present_key_counts_as_a_touch() -> None:
    p = WTinyLFUPolicy(10, window_ratio=0.1)
    for k in "abcde":
        p.add(k)
    p.add("a")
    assert len(p) == 5 and p.region_of("a") == "protected"
    assert p.sketch.frequency("a") == 2


async def test_param_cache_with_wtinylfu_keeps_the_byte_budget() -> None:
    cache: ParamCache[bytes] = ParamCache(
        capacity_bytes=5000, ttl_s=60.0, policy="wtinylfu", size_of=len
    )
    assert cache.policy == "wtinylfu"
    rng = random.Random(3)
    sizes: dict[Hashable, int] = {}
    for _ in range(4000):
        key = (min(int(rng.paretovariate(0.7)), 500),)
        size = sizes.setdefault(key, rng.randrange(20, 400))
        if rng.random() < 0.03:
            cache.invalidate(key)
            continue

        async def load(size: int = size) -> bytes:
            return bytes(size)

        value, _ = await cache.get(key, load)
        assert len(value) == size
        stats = cache.stats
        assert stats.bytes <= 5000
        assert stats.bytes == sum(map(sizes.__getitem__, cache.keys()))
        assert len(cache._policy) == len(cache)
    assert cache.stats.evictions > 300
    assert (1,) in cache  # by far the most frequent key
    big = (-1,)
    await cache.get(big, lambda: asyncio.sleep(0, bytes(4000)))  # evicts many for one
    assert big in cache and cache.stats.bytes <= 5000
