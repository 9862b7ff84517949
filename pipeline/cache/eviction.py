"""Eviction policies: which cached key goes first when the byte budget is full.

A policy only orders keys; the cache owns values and bytes. All operations are O(1)
(amortized; W-TinyLFU's sketch operations are O(rows) and its periodic aging is O(width)
once every ``10 x capacity`` counted accesses).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Protocol

import numpy as np


class Policy(Protocol):
    """Orders the keys of a cache for eviction."""

    name: str

    def add(self, key: Hashable) -> None:
        """A key was inserted."""

    def touch(self, key: Hashable) -> None:
        """A present key was read."""

    def remove(self, key: Hashable) -> None:
        """A key left the cache (evicted, expired or invalidated)."""

    def victim(self) -> Hashable | None:
        """The key to evict next, or None when empty."""

    def __len__(self) -> int: ...


class LRUPolicy:
    """Least recently used goes first."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[Hashable, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._order)

    def add(self, key: Hashable) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def touch(self, key: Hashable) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key: Hashable) -> None:
        self._order.pop(key, None)

    def victim(self) -> Hashable | None:
        return next(iter(self._order), None)


class LFUPolicy:
    """Least frequently used goes first; ties go to the least recently used.

    Counts live only while a key is cached (no ghost history), in frequency buckets so
    every operation is O(1).
    """

    name = "lfu"

    def __init__(self) -> None:
        self._freq: dict[Hashable, int] = {}
        self._buckets: dict[int, OrderedDict[Hashable, None]] = {}
        self._min = 0

    def __len__(self) -> int:
        return len(self._freq)

    def add(self, key: Hashable) -> None:
        if key in self._freq:
            self.touch(key)
            return
        self._freq[key] = 1
        self._buckets.setdefault(1, OrderedDict())[key] = None
        self._min = 1

    def touch(self, key: Hashable) -> None:
        freq = self._freq.get(key)
        if freq is None:
            return
        bucket = self._buckets[freq]
        del bucket[key]
        if not bucket:
            del self._buckets[freq]
            if self._min == freq:
                self._min = freq + 1
        self._freq[key] = freq + 1
        self._buckets.setdefault(freq + 1, OrderedDict())[key] = None

    def remove(self, key: Hashable) -> None:
        freq = self._freq.pop(key, None)
        if freq is None:
            return
        bucket = self._buckets[freq]
        del bucket[key]
        if not bucket:
            del self._buckets[freq]  # a stale _min is found again by victim(), when needed

    def victim(self) -> Hashable | None:
        if not self._freq:
            return None
        bucket = self._buckets.get(self._min)
        if bucket is None:
            self._min = min(self._buckets)
            bucket = self._buckets[self._min]
        return next(iter(bucket))


_M64 = (1 << 64) - 1
# Odd 64-bit multipliers, one per sketch row (multiplicative hashing; the top bits index the row).
_ROW0, _ROW1, _ROW2, _ROW3 = (
    0x9E3779B97F4A7C15,
    0xC2B2AE3D27D4EB4F,
    0x165667B19E3779F9,
    0xD6E8FEB86659FD93,
)


def _mix64(x: int) -> int:
    """SplitMix64's finalizer: a bijection of 64-bit ints with good avalanche."""
    x &= _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


class FrequencySketch:
    """TinyLFU's approximate access-frequency histogram: a count-min sketch that forgets.

    ``depth`` = 4 rows of ``width`` 4-bit counters (one byte each here; capped at 15). A key
    maps to one counter per row: ``hash(key)``, offset by a per-instance ``seed`` and mixed,
    times a per-row odd multiplier, whose top ``log2(width)`` bits are the column. An increment
    bumps the key's 4 counters (those below the cap); the estimate is their minimum, which never
    undercounts (between agings). Every ``sample_size`` = ``sample_factor x capacity`` counted
    increments all counters are halved ("reset" in the paper), so the sketch follows recent
    popularity and stale heavy hitters fade.

    ``width`` is the next power of two >= ``width_factor x capacity`` (at least 64), so the
    table takes about 64 bytes per entry of capacity by default. :meth:`ensure_capacity` grows
    it: the new columns of a row split old ones (the top-bit index gains low bits), so each old
    counter is copied into its children and no estimate drops.
    """

    depth = 4
    max_count = 15

    def __init__(
        self, capacity: int, *, width_factor: int = 16, sample_factor: int = 10, seed: int = 0
    ) -> None:
        if width_factor < 1 or sample_factor < 1:
            raise ValueError("width_factor and sample_factor must be >= 1")
        self._width_factor = width_factor
        self._sample_factor = sample_factor
        self._seed = _mix64(seed)
        self._capacity = 0
        self._width = 0
        self._shift = 64
        self._table = bytearray()
        self._view = np.frombuffer(self._table, dtype=np.uint8)
        self._sample_size = 1
        self.additions = 0
        """Counted increments since the last aging (an increment counts unless all 4 capped)."""
        self.ensure_capacity(max(1, capacity))

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def width(self) -> int:
        return self._width

    @property
    def sample_size(self) -> int:
        return self._sample_size

    def ensure_capacity(self, capacity: int) -> None:
        """Size for ``capacity`` entries if that is more than now; counts are kept."""
        if capacity <= self._capacity:
            return
        self._capacity = capacity
        self._sample_size = self._sample_factor * capacity
        width = max(64, 1 << (self._width_factor * capacity - 1).bit_length())
        if width <= self._width:
            return
        if self._width:
            rows = self._view.reshape(self.depth, self._width)
            grown = np.repeat(rows, width // self._width, axis=1)
        else:
            grown = np.zeros((self.depth, width), dtype=np.uint8)
        self._table = bytearray(grown.tobytes())
        self._view = np.frombuffer(self._table, dtype=np.uint8)
        self._width = width
        self._shift = 64 - (width.bit_length() - 1)

    def increment(self, key: Hashable) -> None:
        """Count one access to ``key``; age the sketch when the sample is complete."""
        x = (hash(key) + self._seed) & _M64  # SplitMix64's finalizer, inlined: hot path
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
        h = x ^ (x >> 31)
        t, s, w = self._table, self._shift, self._width
        added = False
        i = ((h * _ROW0) & _M64) >> s
        if t[i] < 15:
            t[i] += 1
            added = True
        i = (((h * _ROW1) & _M64) >> s) + w
        if t[i] < 15:
            t[i] += 1
            added = True
        i = (((h * _ROW2) & _M64) >> s) + 2 * w
        if t[i] < 15:
            t[i] += 1
            added = True
        i = (((h * _ROW3) & _M64) >> s) + 3 * w
        if t[i] < 15:
            t[i] += 1
            added = True
        if added:
            self.additions += 1
            if self.additions >= self._sample_size:
                self.age()

    def frequency(self, key: Hashable) -> int:
        """Estimated recent accesses of ``key`` (0..15): the minimum of its counters."""
        x = (hash(key) + self._seed) & _M64  # SplitMix64's finalizer, inlined: hot path
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
        h = x ^ (x >> 31)
        t, s, w = self._table, self._shift, self._width
        return min(
            t[((h * _ROW0) & _M64) >> s],
            t[(((h * _ROW1) & _M64) >> s) + w],
            t[(((h * _ROW2) & _M64) >> s) + 2 * w],
            t[(((h * _ROW3) & _M64) >> s) + 3 * w],
        )

    def age(self) -> None:
        """Halve every counter (and the addition count): the paper's reset."""
        self._view >>= 1
        self.additions //= 2


_WINDOW, _PROBATION, _PROTECTED = 0, 1, 2


class WTinyLFUPolicy:
    """Window TinyLFU (Einziger, Friedman, Manes; the policy of Caffeine).

    Regions, each an LRU order: a small admission *window* (``window_ratio`` of the entries,
    at least 1) in front of a segmented-LRU *main* region, split into *probation* and
    *protected* (``protected_ratio`` = 80% of the main). A :class:`FrequencySketch` counts every
    access: :meth:`add` (a miss being filled) and :meth:`touch` (a hit).

    New keys enter the window's MRU end; when the window is over its share its LRU entry moves
    to probation's MRU end. A hit in probation promotes the key to protected, whose overflow is
    demoted back to probation's MRU end. Hits in the window or protected refresh the key's
    place.

    Admission, in the cache's evict-then-add order: the cache asks for :meth:`victim` *before*
    adding the new key. When the window is at its share, the add that follows will push the
    window's LRU entry (the *candidate*) into the main, so ``victim()`` makes TinyLFU's
    admission decision right away: candidate against the main's victim (probation's LRU entry,
    or protected's when probation is empty), by sketch frequency. The less frequent one is the
    victim; a tie keeps the main's entry (the candidate goes). If the window is below its share
    (after removals, or when the regions were resized), the main is over its share and gives
    the victim; if the main is empty, the window does. ``victim()`` changes nothing, so asking
    twice gives the same key, and a cache evicting several entries for one large value simply
    repeats the decision with the next pair. Without the optional hash-flooding defence of
    Caffeine (random admission of warm candidates): keys here are the process's own.

    Sizing. ``capacity`` (an entry count) only sizes the sketch up front: ``width`` >= 16 x
    capacity counters per row, aging every 10 x capacity counted accesses. The region shares
    are always computed from the *current* number of entries ``n``: window ``max(1,
    round(window_ratio x n))``, protected ``int(protected_ratio x (n - window))``, probation the
    rest. In a count-bounded cache (:func:`pipeline.bench.simulation.simulate`) ``n`` equals the
    capacity whenever the cache is full, which is the only time eviction matters, so this is
    exactly Caffeine's static split. A byte-budgeted cache (:class:`~.cache.ParamCache`)
    cannot give an entry count, because values differ in size: there ``n`` is however many
    entries fit right now, so the split follows the budget as values grow or shrink, and the
    sketch, built for ``capacity`` (or a small default when None), grows with the high-water
    mark of ``n`` (:meth:`FrequencySketch.ensure_capacity`, which keeps the counts). Unequal
    sizes are fine: the cache keeps asking for victims until the new value's bytes fit.
    """

    name = "wtinylfu"

    def __init__(
        self,
        capacity: int | None = None,
        window_ratio: float = 0.01,
        *,
        protected_ratio: float = 0.8,
        seed: int = 0,
    ) -> None:
        if capacity is not None and capacity < 1:
            raise ValueError("capacity must be >= 1")
        if not 0.0 <= window_ratio < 1.0:
            raise ValueError("window_ratio must be in [0, 1)")
        if not 0.0 <= protected_ratio <= 1.0:
            raise ValueError("protected_ratio must be in [0, 1]")
        self.capacity = capacity
        self.window_ratio = window_ratio
        self.protected_ratio = protected_ratio
        self.sketch = FrequencySketch(capacity or 64, seed=seed)
        self._window: OrderedDict[Hashable, None] = OrderedDict()
        self._probation: OrderedDict[Hashable, None] = OrderedDict()
        self._protected: OrderedDict[Hashable, None] = OrderedDict()
        self._where: dict[Hashable, int] = {}
        self._high = 0  # most entries ever held: the sketch is sized for at least this many
        self._share_n, self._share = 0, 1  # the window share for the last size asked about

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._where

    def _window_share(self, n: int) -> int:
        if n != self._share_n:
            self._share_n, self._share = n, max(1, round(self.window_ratio * n))
        return self._share

    def region_sizes(self) -> tuple[int, int, int]:
        """Entries now in the window, probation and protected."""
        return len(self._window), len(self._probation), len(self._protected)

    def region_of(self, key: Hashable) -> str | None:
        """``window``, ``probation``, ``protected``, or None when absent."""
        where = self._where.get(key)
        return None if where is None else ("window", "probation", "protected")[where]

    def add(self, key: Hashable) -> None:
        if key in self._where:
            self.touch(key)
            return
        self.sketch.increment(key)
        where, window = self._where, self._window
        window[key] = None
        where[key] = _WINDOW
        n = len(where)
        if n > self._high:
            self._high = n
            if n > self.sketch.capacity:
                self.sketch.ensure_capacity(n)
        share = self._window_share(n)
        while len(window) > share:
            old, _ = window.popitem(last=False)
            self._probation[old] = None
            where[old] = _PROBATION

    def touch(self, key: Hashable) -> None:
        where = self._where.get(key)
        if where is None:
            return
        self.sketch.increment(key)
        if where == _WINDOW:
            self._window.move_to_end(key)
        elif where == _PROTECTED:
            self._protected.move_to_end(key)
        else:
            del self._probation[key]
            protected = self._protected
            protected[key] = None
            self._where[key] = _PROTECTED
            n = len(self._where)
            share = int(self.protected_ratio * (n - self._window_share(n)))
            while len(protected) > share:
                old, _ = protected.popitem(last=False)
                self._probation[old] = None
                self._where[old] = _PROBATION

    def remove(self, key: Hashable) -> None:
        where = self._where.pop(key, None)
        if where is None:
            return
        if where == _WINDOW:
            del self._window[key]
        elif where == _PROBATION:
            del self._probation[key]
        else:
            del self._protected[key]

    def victim(self) -> Hashable | None:
        n = len(self._where)
        if not n:
            return None
        window = self._window
        main = self._probation if self._probation else self._protected
        if not main:
            return next(iter(window))
        out = next(iter(main))
        if window and len(window) >= self._window_share(n):
            candidate = next(iter(window))
            freq = self.sketch.frequency
            if freq(candidate) <= freq(out):
                return candidate
        return out


def make_policy(name: str, capacity_hint: int | None = None) -> Policy:
    """The policy called ``name`` (``lru``, ``lfu`` or ``wtinylfu``).

    ``capacity_hint`` is the number of entries the cache holds when full, if it knows (only
    W-TinyLFU uses it, to size its sketch; without it the sketch grows with the cache).
    """
    if name == "lru":
        return LRUPolicy()
    if name == "lfu":
        return LFUPolicy()
    if name == "wtinylfu":
        return WTinyLFUPolicy(capacity_hint)
    raise ValueError(f"unknown eviction policy {name!r}; use lru, lfu or wtinylfu")
