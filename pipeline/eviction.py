"""Eviction policies: which cached key goes first when the byte budget is full.

A policy only orders keys; the cache owns values and bytes. All operations are O(1).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Protocol


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


def make_policy(name: str) -> Policy:
    """The policy called ``name`` (``lru`` or ``lfu``)."""
    if name == "lru":
        return LRUPolicy()
    if name == "lfu":
        return LFUPolicy()
    raise ValueError(f"unknown eviction policy {name!r}; use lru or lfu")
