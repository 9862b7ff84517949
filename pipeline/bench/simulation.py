"""Offline cache hit-rate simulation: the shipped eviction policies against Belady's optimum.

Every entry has size 1 and capacity counts entries. :func:`simulate` drives the very policy
classes :class:`~pipeline.cache.cache.ParamCache` uses (via
:func:`~pipeline.cache.eviction.make_policy`, given the capacity as its hint) the way the
cache does: a hit touches, a miss evicts ``victim()`` when full, removes it, then adds.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

import numpy as np
import numpy.typing as npt

from pipeline.cache.eviction import make_policy

POLICIES = ("lru", "lfu", "wtinylfu")
"""The shipped policies, in table order."""

Trace = npt.NDArray[np.int64]
TraceLike = npt.NDArray[np.integer[Any]] | Sequence[int]


@dataclass(frozen=True, slots=True)
class SimResult:
    """Hits and misses of one policy on one trace."""

    hits: int
    misses: int

    @property
    def accesses(self) -> int:
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float:
        return self.hits / self.accesses if self.accesses else 0.0


class TableRow(TypedDict):
    """One trace and capacity: hit rate per policy (and ``opt``), and each policy's share of it."""

    trace: str
    capacity: int
    accesses: int
    distinct_keys: int
    hit_rate: dict[str, float]
    ratio_to_opt: dict[str, float | None]


def _as_list(trace: TraceLike) -> list[int]:
    if isinstance(trace, np.ndarray):
        out: list[int] = trace.tolist()
        return out
    return [int(k) for k in trace]


def zipf_trace(n_keys: int, n_accesses: int, s: float, seed: int) -> Trace:
    """``n_accesses`` keys in ``0..n_keys-1`` with P(rank k) ∝ 1/k^s (finite support, any s >= 0);
    ranks map to key ids through a seeded random permutation."""
    if n_keys < 1 or n_accesses < 0 or s < 0:
        raise ValueError("need n_keys >= 1, n_accesses >= 0 and s >= 0")
    rng = np.random.default_rng(seed)
    keys = rng.permutation(n_keys).astype(np.int64)  # keys[rank - 1] is the key of that rank
    weights = np.arange(1, n_keys + 1, dtype=np.float64) ** -s
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    ranks = np.searchsorted(cdf, rng.random(n_accesses), side="right")
    np.minimum(ranks, n_keys - 1, out=ranks)  # guards against cdf[-1] rounding below 1
    out: Trace = keys[ranks]
    return out


def article_trace(n_keys: int = 1000, n_accesses: int = 10**6, seed: int = 0) -> Trace:
    """The article's example: 1,000 parameters accessed 1000, 500, 333, ... times (∝ 1/rank)."""
    return zipf_trace(n_keys, n_accesses, 1.0, seed)


def scan_trace(
    n_keys: int,
    n_accesses: int,
    loop_len: int,
    scan_share: float,
    s: float,
    seed: int,
    *,
    burst: int | None = None,
) -> Trace:
    """A Zipf(s) stream over keys ``0..n_keys-1`` with ``scan_share`` of the accesses from a
    cyclic loop over keys ``n_keys..n_keys+loop_len-1``, in bursts of ``burst`` (default a pass)."""
    if loop_len < 1 or not 0.0 <= scan_share <= 1.0:
        raise ValueError("need loop_len >= 1 and 0 <= scan_share <= 1")
    burst = loop_len if burst is None else burst
    if burst < 1:
        raise ValueError("need burst >= 1")
    n_loop = round(scan_share * n_accesses)
    n_zipf = n_accesses - n_loop
    zipf = zipf_trace(n_keys, n_zipf, s, seed)
    rng = np.random.default_rng([seed, 1])
    # One token per Zipf access and one per burst, shuffled, then expanded to per-access flags.
    n_bursts = -(-n_loop // burst)
    lengths = np.full(n_bursts, burst, dtype=np.int64)
    if n_bursts:
        lengths[-1] = n_loop - burst * (n_bursts - 1)
    is_loop = np.concatenate([np.zeros(n_zipf, dtype=bool), np.ones(n_bursts, dtype=bool)])
    tokens = np.concatenate([np.ones(n_zipf, dtype=np.int64), lengths])
    order = rng.permutation(is_loop.size)
    mask = np.repeat(is_loop[order], tokens[order])
    out = np.empty(n_accesses, dtype=np.int64)
    out[~mask] = zipf
    out[mask] = n_keys + np.arange(n_loop, dtype=np.int64) % loop_len
    return out


def simulate(policy_name: str, trace: TraceLike, capacity: int) -> SimResult:
    """Replay ``trace`` through the real ``make_policy(policy_name, capacity)`` with room for
    ``capacity`` entries: a hit touches; a miss evicts the victim when full, then adds (demand
    paging)."""
    if capacity < 1:
        raise ValueError("capacity must be >= 1")
    policy = make_policy(policy_name, capacity)
    add, touch, remove, victim = policy.add, policy.touch, policy.remove, policy.victim
    cached: set[Hashable] = set()
    contains, admit, drop = cached.__contains__, cached.add, cached.remove
    keys = _as_list(trace)
    misses = 0
    for key in keys:
        if contains(key):
            touch(key)
            continue
        misses += 1
        if len(cached) >= capacity:
            out = victim()
            remove(out)
            drop(out)
        add(key)
        admit(key)
    return SimResult(hits=len(keys) - misses, misses=misses)


def next_use(trace: TraceLike) -> npt.NDArray[np.int64]:
    """For each position, the index of the next access to the same key (``len(trace)`` if none)."""
    arr = np.asarray(trace, dtype=np.int64)
    n = arr.size
    nxt = np.full(n, n, dtype=np.int64)
    if n:
        order = np.argsort(arr, kind="stable")  # positions grouped by key, in time order
        same = arr[order[1:]] == arr[order[:-1]]
        nxt[order[:-1][same]] = order[1:][same]
    return nxt


def belady(trace: TraceLike, capacity: int) -> SimResult:
    """Belady's MIN (demand paging): on a miss when full, evict the key used farthest ahead.

    A max-heap on next use with lazy deletion, compacted when stale entries pile up.
    """
    if capacity < 1:
        raise ValueError("capacity must be >= 1")
    keys = _as_list(trace)
    nexts: list[int] = next_use(keys).tolist()
    cached: dict[int, int] = {}  # key -> index of its next use
    heap: list[tuple[int, int]] = []  # (-next use, key); stale when cached[key] differs
    push, pop = heapq.heappush, heapq.heappop
    limit = 4 * capacity + 64
    misses = 0
    for key, nxt in zip(keys, nexts, strict=True):
        if key not in cached:
            misses += 1
            if len(cached) >= capacity:
                while True:
                    neg, old = pop(heap)
                    if cached.get(old) == -neg:
                        del cached[old]
                        break
        cached[key] = nxt
        push(heap, (-nxt, key))
        if len(heap) > limit:
            heap = [(-v, k) for k, v in cached.items()]
            heapq.heapify(heap)
    return SimResult(hits=len(keys) - misses, misses=misses)


def hit_rate_table(
    traces: Mapping[str, tuple[TraceLike, int]], policies: Iterable[str] = POLICIES
) -> list[TableRow]:
    """One row per named ``(trace, capacity)``: each policy's hit rate, Belady's, and the ratios."""
    names = list(policies)
    rows: list[TableRow] = []
    for label, (trace, capacity) in traces.items():
        arr = np.asarray(trace, dtype=np.int64)
        opt = belady(arr, capacity).hit_rate
        rates = {name: simulate(name, arr, capacity).hit_rate for name in names}
        rows.append(
            TableRow(
                trace=label,
                capacity=capacity,
                accesses=int(arr.size),
                distinct_keys=int(np.unique(arr).size),
                hit_rate={**rates, "opt": opt},
                ratio_to_opt={name: (r / opt if opt > 0 else None) for name, r in rates.items()},
            )
        )
    return rows


def run_cache_bench(
    seed: int = 0,
    accesses: int = 10**6,
    keys: int = 10**5,
    policies: Iterable[str] = POLICIES,
) -> dict[str, Any]:
    """The standard set: the article's example, Zipf s=0.8/1.0/1.2 at 1% capacity, and a scan mix.

    Returns JSON-able ``rows``, the ``traces`` parameters used and the elapsed ``seconds``.
    """
    started = time.perf_counter()
    names = list(policies)
    capacity = max(1, keys // 100)
    loop_len, scan_share, scan_s = 2 * capacity, 0.3, 1.0
    params: dict[str, dict[str, Any]] = {
        "article: 1/rank over 1000": dict(
            kind="zipf", keys=1000, accesses=accesses, s=1.0, capacity=100, seed=seed
        ),
    }
    for i, s in enumerate((0.8, 1.0, 1.2), start=1):
        params[f"zipf s={s}"] = dict(
            kind="zipf", keys=keys, accesses=accesses, s=s, capacity=capacity, seed=seed + i
        )
    params[f"scan: zipf 1.0 + {scan_share:.0%} loop of {loop_len}"] = dict(
        kind="scan",
        keys=keys,
        accesses=accesses,
        s=scan_s,
        loop_len=loop_len,
        scan_share=scan_share,
        burst=loop_len,
        capacity=capacity,
        seed=seed + 4,
    )
    traces: dict[str, tuple[TraceLike, int]] = {}
    for label, p in params.items():
        if p["kind"] == "zipf":
            trace = zipf_trace(p["keys"], p["accesses"], p["s"], p["seed"])
        else:
            trace = scan_trace(
                p["keys"],
                p["accesses"],
                p["loop_len"],
                p["scan_share"],
                p["s"],
                p["seed"],
                burst=p["burst"],
            )
        traces[label] = (trace, p["capacity"])
    rows = hit_rate_table(traces, names)
    return {
        "policies": names,
        "traces": params,
        "rows": rows,
        "seconds": round(time.perf_counter() - started, 3),
    }


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _ratio(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.3f}"


def format_table(rows: Sequence[TableRow]) -> str:
    """An aligned plain-text table: trace, capacity, each policy, OPT, each policy / OPT."""
    names: list[str] = []
    for row in rows:
        names.extend(n for n in row["ratio_to_opt"] if n not in names)
    header = ["trace", "capacity", *(n.upper() for n in names), "OPT"]
    header += [f"{n.upper()}/OPT" for n in names]
    body = [
        [
            row["trace"],
            str(row["capacity"]),
            *(_pct(row["hit_rate"][n]) if n in row["hit_rate"] else "-" for n in names),
            _pct(row["hit_rate"]["opt"]),
            *(_ratio(row["ratio_to_opt"].get(n)) for n in names),
        ]
        for row in rows
    ]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest]).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in body)])


def bench_cache(accesses: int | None = None) -> dict[str, Any]:
    """The ``cache`` suite: the shipped policies beside Belady's optimum, printed (no services)."""
    accesses = accesses or 10**6
    print(
        f"cache   simulation: {accesses} accesses per trace, seed 0 "
        "(LRU, LFU, W-TinyLFU, Belady's MIN)",
        flush=True,
    )
    out = run_cache_bench(seed=0, accesses=accesses)
    print(format_table(out["rows"]), flush=True)
    print(f"cache   {out['seconds']:.1f} s", flush=True)
    return out


class CacheResult:
    """The cache simulation as a suite result (it has no answers to get wrong)."""

    passed = True

    def __init__(self, out: dict[str, Any]) -> None:
        self.out = out

    def as_dict(self) -> dict[str, Any]:
        """The simulation's figures as written to ``cache.json``."""
        return self.out
