"""Offline hit-rate simulation: traces, the real policies, and Belady's optimum."""

from __future__ import annotations

import json
import random
from functools import cache

import numpy as np
import pytest

from pipeline.bench.simulation import (
    POLICIES,
    SimResult,
    article_trace,
    belady,
    format_table,
    hit_rate_table,
    next_use,
    run_cache_bench,
    scan_trace,
    simulate,
    zipf_trace,
)
from pipeline.cache.eviction import LFUPolicy, LRUPolicy, Policy, WTinyLFUPolicy

# Belady's textbook reference string: 3 frames give 9 faults under OPT and 12 under LRU.
CLASSIC = [7, 0, 1, 2, 0, 3, 0, 4, 2, 3, 0, 3, 2, 1, 2, 0, 1, 7, 0, 1]


def brute_force_opt(trace: list[int], capacity: int) -> int:
    """Most hits any demand-paging eviction sequence reaches (exhaustive search)."""

    @cache
    def best(i: int, cached: frozenset[int]) -> int:
        if i == len(trace):
            return 0
        key = trace[i]
        if key in cached:
            return 1 + best(i + 1, cached)
        if len(cached) < capacity:
            return best(i + 1, cached | {key})
        return max(best(i + 1, (cached - {old}) | {key}) for old in cached)

    return best(0, frozenset())


def reference_hits(trace: list[int], capacity: int, kind: str) -> int:
    """Plain-list LRU / LFU (count since admission, ties to least recent) / MIN."""
    cached: dict[int, list[int]] = {}  # key -> [uses since admission, last access]
    hits = 0
    for i, key in enumerate(trace):
        if key in cached:
            hits += 1
            cached[key][0] += 1
            cached[key][1] = i
            continue
        if len(cached) >= capacity:
            if kind == "lru":
                old = min(cached, key=lambda k: cached[k][1])
            elif kind == "lfu":
                old = min(cached, key=lambda k: (cached[k][0], cached[k][1]))
            else:
                rest = trace[i + 1 :]
                ahead = {k: rest.index(k) if k in rest else len(trace) for k in cached}
                old = max(ahead, key=ahead.__getitem__)
            del cached[old]
        cached[key] = [1, i]
    return hits


def test_classic_reference_string() -> None:
    assert belady(CLASSIC, 3) == SimResult(hits=11, misses=9)
    assert simulate("lru", CLASSIC, 3) == SimResult(hits=8, misses=12)
    assert simulate("lfu", CLASSIC, 3).hits == reference_hits(CLASSIC, 3, "lfu")
    assert brute_force_opt(CLASSIC, 3) == 11


def test_hand_checked_small_sequences() -> None:
    seq = [1, 1, 2, 3, 1]  # capacity 2: LFU keeps the twice-used 1, LRU drops it for 3
    assert simulate("lru", seq, 2).hits == 1
    assert simulate("lfu", seq, 2).hits == 2
    assert belady(seq, 2).hits == 2
    loop = [1, 2, 3, 4] * 5  # a loop one longer than the cache: LRU never hits
    assert simulate("lru", loop, 3).hits == 0
    # OPT: 3 cold misses, then one miss per 3 accesses (4, 3, 2, 1, 4, 3) -> 9 misses
    assert belady(loop, 3).hits == brute_force_opt(loop, 3) == 11
    assert simulate("lru", loop, 4).hits == belady(loop, 4).hits == 16
    assert belady([], 2) == SimResult(0, 0)
    assert SimResult(0, 0).hit_rate == 0.0


def test_belady_matches_exhaustive_search_on_tiny_traces() -> None:
    rng = random.Random(7)
    for _ in range(150):
        capacity = rng.choice([2, 3])
        trace = [rng.randrange(capacity + 3) for _ in range(rng.randrange(4, 13))]
        opt = brute_force_opt(trace, capacity)
        assert belady(trace, capacity).hits == opt, (trace, capacity)
        for name in POLICIES:
            assert simulate(name, trace, capacity).hits <= opt


def test_policies_and_belady_match_plain_references_on_longer_traces() -> None:
    rng = random.Random(11)
    for capacity in (1, 2, 5, 9):
        trace = [min(int(rng.paretovariate(0.9)), 40) for _ in range(1500)]
        for kind in ("lru", "lfu"):
            assert simulate(kind, trace, capacity).hits == reference_hits(trace, capacity, kind)
        # long enough to exercise the heap compaction
        assert belady(trace, capacity).hits == reference_hits(trace, capacity, "opt")


def test_simulate_drives_the_real_policy_classes() -> None:
    trace = zipf_trace(300, 5000, 1.0, seed=3).tolist()
    makers = (("lru", LRUPolicy), ("lfu", LFUPolicy), ("wtinylfu", lambda: WTinyLFUPolicy(30)))
    for name, make in makers:
        policy: Policy = make()
        present: set[int] = set()
        hits = 0
        for key in trace:
            if key in present:
                hits += 1
                policy.touch(key)
                continue
            if len(policy) >= 30:
                victim = policy.victim()
                policy.remove(victim)
                present.discard(victim)
            policy.add(key)
            present.add(key)
        assert simulate(name, np.asarray(trace), 30) == SimResult(hits, len(trace) - hits)
    with pytest.raises(ValueError):
        simulate("nope", trace, 30)
    with pytest.raises(ValueError):
        simulate("lru", trace, 0)


def test_belady_bounds_every_policy_on_zipf_traces() -> None:
    for seed, s in ((0, 0.8), (1, 1.0), (2, 1.2)):
        trace = zipf_trace(2000, 20_000, s, seed)
        for capacity in (10, 100):
            opt = belady(trace, capacity).hits
            for name in POLICIES:
                assert simulate(name, trace, capacity).hits <= opt


def test_wtinylfu_beats_lru_on_zipf_and_resists_scans() -> None:
    for seed in (0, 1):
        trace = zipf_trace(5000, 40_000, 1.0, seed)
        opt = belady(trace, 50).hits
        lru = simulate("lru", trace, 50).hits
        wtinylfu = simulate("wtinylfu", trace, 50).hits
        assert lru < wtinylfu <= opt
        assert wtinylfu >= 0.8 * opt  # about 0.85; LRU reaches about 0.63
    scan = scan_trace(5000, 40_000, 100, 0.3, 1.0, seed=2)
    lru_rate = simulate("lru", scan, 50).hit_rate
    assert simulate("wtinylfu", scan, 50).hit_rate >= lru_rate - 0.02


def test_next_use() -> None:
    assert next_use([5, 6, 5, 5, 7, 6]).tolist() == [2, 5, 3, 6, 6, 6]
    assert next_use([]).tolist() == []


def test_zipf_trace_follows_power_law_over_permuted_keys() -> None:
    n, m = 100, 200_000
    trace = zipf_trace(n, m, 1.0, seed=1)
    assert trace.dtype == np.int64 and trace.shape == (m,)
    assert trace.min() >= 0 and trace.max() < n
    counts = np.bincount(trace, minlength=n)
    ranked = np.sort(counts)[::-1]
    harmonic = sum(1 / k for k in range(1, n + 1))
    assert ranked[0] / m == pytest.approx(1 / harmonic, abs=0.005)  # about 19.3%
    assert ranked[0] / ranked[1] == pytest.approx(2.0, rel=0.05)
    assert ranked[0] / ranked[9] == pytest.approx(10.0, rel=0.1)
    assert np.argsort(-counts)[:10].tolist() != list(range(10))  # rank is not the key id
    steep = np.sort(np.bincount(zipf_trace(n, m, 0.8, seed=1), minlength=n))[::-1]
    assert steep[0] / steep[1] == pytest.approx(2**0.8, rel=0.05)
    flat = np.bincount(zipf_trace(10, 50_000, 0.0, seed=1), minlength=10)
    assert flat.min() > 4500  # s = 0 is uniform


def test_traces_are_seeded() -> None:
    assert np.array_equal(zipf_trace(50, 1000, 1.0, 4), zipf_trace(50, 1000, 1.0, 4))
    assert not np.array_equal(zipf_trace(50, 1000, 1.0, 4), zipf_trace(50, 1000, 1.0, 5))
    assert np.array_equal(article_trace(n_accesses=1000, seed=2), zipf_trace(1000, 1000, 1.0, 2))
    a = scan_trace(100, 5000, 30, 0.3, 1.0, 9)
    assert np.array_equal(a, scan_trace(100, 5000, 30, 0.3, 1.0, 9))
    assert not np.array_equal(a, scan_trace(100, 5000, 30, 0.3, 1.0, 8))


def test_article_trace_defaults() -> None:
    trace = article_trace(n_accesses=10_000)
    assert trace.size == 10_000 and trace.max() < 1000


def test_scan_trace_share_loop_and_bursts() -> None:
    n_keys, n, loop_len, share = 500, 20_000, 60, 0.3
    trace = scan_trace(n_keys, n, loop_len, share, 1.0, seed=5)
    is_loop = trace >= n_keys
    assert is_loop.sum() == 6000
    assert trace.max() < n_keys + loop_len
    assert (trace[is_loop] - n_keys).tolist() == [i % loop_len for i in range(6000)]
    assert np.array_equal(trace[~is_loop], zipf_trace(n_keys, n - 6000, 1.0, 5))
    # loop accesses come in whole passes (adjacent passes may run together)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], is_loop.astype(np.int8), [0]])))
    runs = edges[1::2] - edges[::2]
    assert all(r % loop_len == 0 for r in runs)
    single = scan_trace(n_keys, n, loop_len, share, 1.0, seed=5, burst=1)
    assert (single >= n_keys).sum() == 6000
    # passes longer than the cache flush LRU; OPT keeps part of the loop
    assert simulate("lru", trace, 50).hits < belady(trace, 50).hits


def test_hit_rate_table_and_format() -> None:
    traces = {"z": (zipf_trace(200, 3000, 1.0, 0), 20), "loop": (np.array([1, 2, 3] * 10), 2)}
    rows = hit_rate_table(traces)
    assert [r["trace"] for r in rows] == ["z", "loop"]
    z = rows[0]
    assert z["capacity"] == 20 and z["accesses"] == 3000
    assert set(z["hit_rate"]) == {"lru", "lfu", "wtinylfu", "opt"}
    assert z["hit_rate"]["opt"] == belady(traces["z"][0], 20).hit_rate
    assert z["ratio_to_opt"]["lru"] == pytest.approx(z["hit_rate"]["lru"] / z["hit_rate"]["opt"])
    text = format_table(rows)
    lines = text.splitlines()
    assert lines[0].split() == [
        *("trace", "capacity", "LRU", "LFU", "WTINYLFU", "OPT"),
        *("LRU/OPT", "LFU/OPT", "WTINYLFU/OPT"),
    ]
    assert len(lines) == 4 and len({len(line) for line in lines}) == 1
    only_lru = hit_rate_table(traces, policies=["lru"])
    assert set(only_lru[0]["ratio_to_opt"]) == {"lru"}
    assert "LFU" not in format_table(only_lru)
    zero = hit_rate_table({"cold": (np.arange(10), 3)})
    assert zero[0]["ratio_to_opt"]["lru"] is None and "-" in format_table(zero)


def test_run_cache_bench_small_is_json_able() -> None:
    out = run_cache_bench(seed=1, accesses=5000, keys=1000)
    json.dumps(out)
    assert len(out["rows"]) == 5
    assert out["rows"][0]["capacity"] == 100 and out["rows"][1]["capacity"] == 10
    for row in out["rows"]:
        assert out["policies"] == ["lru", "lfu", "wtinylfu"]
        assert row["hit_rate"]["opt"] >= max(row["hit_rate"][name] for name in POLICIES)
    assert "OPT" in format_table(out["rows"])
