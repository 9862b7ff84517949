"""The in-process async parameter cache: byte budget, eviction, TTL, single-flight.

Eviction is by policy (:mod:`pipeline.cache.eviction`): LRU, LFU or W-TinyLFU. A failed load
is not kept, but its key backs off before its loader runs again (``failure_backoff_s``).
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any, Generic, TypeVar

from pipeline.cache.eviction import make_policy
from pipeline.cache.singleflight import SingleFlight
from pipeline.errors import KvpipeError
from pipeline.resource import AsyncResource

V = TypeVar("V")

Clock = Callable[[], float]

#: Python's own cost of one cache entry (array object, key object, entry, policy links),
#: counted in the byte budget beside the data; measured about 560 bytes on CPython 3.11.
ENTRY_OVERHEAD_BYTES = 560


class Source(StrEnum):
    """Where a value came from: the cache, a fresh load, or an expired entry kept as fallback."""

    HIT = "hit"
    LOADED = "loaded"
    STALE = "stale"


@dataclass
class CacheStats:
    """Counters since the cache was created; ``bytes`` and ``entries`` are current values."""

    hits: int = 0
    misses: int = 0
    loads: int = 0
    load_errors: int = 0
    load_seconds: float = 0.0
    evictions: int = 0
    expirations: int = 0
    invalidations: int = 0
    stale_served: int = 0
    backed_off: int = 0
    refreshes: int = 0
    oversize: int = 0
    bytes: int = 0
    entries: int = 0
    capacity_bytes: int = 0

    @property
    def hit_rate(self) -> float:
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["hit_rate"] = self.hit_rate
        return out


@dataclass
class _Failure:
    until: float
    delay: float
    error: KvpipeError


@dataclass
class _Entry:
    value: Any
    nbytes: int
    expires_at: float
    refresh_at: float


def default_size_of(value: object) -> int:
    """Bytes a value holds: ``nbytes`` for arrays (and objects that say so), else sys.getsizeof."""
    nbytes = getattr(value, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    return sys.getsizeof(value)


class ParamCache(AsyncResource, Generic[V]):
    """Async cache of parameters keyed by any hashable value (the callers' typed keys).

    Concurrent misses for one key share one load (single-flight); failed loads are not
    cached. Every entry expires ``ttl_s`` after it was written (minus up to ``jitter`` of it,
    so a fleet does not reload in one instant); an entry read in the last ``refresh_ahead``
    of its life is reloaded in the background while it keeps serving; an expired entry is kept
    until evicted and is served, marked stale, when its reload fails because Redis could not be
    asked (``serve_stale`` errors); never when Redis answered that the data is gone.
    ``entry_overhead_bytes`` is added to every entry's size so the budget counts Python's own
    per-entry cost, which dominates for small embedding rows.

    A failed load is not kept as a value, but for a short, doubling back-off
    (``failure_backoff_s``: first and longest delay) the key answers with that failure (or its
    stale value) without asking Redis again, so an outage or a flood of requests for a missing
    model cannot turn into a retry storm. A success ends the back-off.
    """

    def __init__(
        self,
        *,
        capacity_bytes: int,
        ttl_s: float,
        policy: str = "lru",
        jitter: float = 0.0,
        refresh_ahead: float = 0.0,
        entry_overhead_bytes: int = 0,
        failure_backoff_s: tuple[float, float] = (0.05, 2.0),
        clock: Clock = time.monotonic,
        size_of: Callable[[Any], int] = default_size_of,
        rng: random.Random | None = None,
    ) -> None:
        if capacity_bytes <= 0:
            raise ValueError("capacity_bytes must be positive")
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        if not 0.0 <= jitter < 1.0:
            raise ValueError("jitter must be in [0, 1)")
        if not 0.0 <= refresh_ahead < 1.0:
            raise ValueError("refresh_ahead must be in [0, 1)")
        self.capacity_bytes = capacity_bytes
        self.ttl_s = ttl_s
        self.jitter = jitter
        self.refresh_ahead = refresh_ahead
        self.entry_overhead_bytes = entry_overhead_bytes
        self.failure_backoff_s = failure_backoff_s
        self._failures: dict[Hashable, _Failure] = {}
        self._clock = clock
        self._size_of = size_of
        self._rng = rng or random.Random()
        self._entries: dict[Hashable, _Entry] = {}
        self._policy = make_policy(policy)
        self._flights: SingleFlight[Hashable, V] = SingleFlight()
        self._dirty: set[Hashable] = set()
        self._stats = CacheStats(capacity_bytes=capacity_bytes)
        self._closed = False

    @property
    def policy(self) -> str:
        return self._policy.name

    @property
    def stats(self) -> CacheStats:
        """A snapshot of the counters."""
        snap = CacheStats(**asdict(self._stats))
        snap.entries = len(self._entries)
        return snap

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        entry = self._entries.get(key)
        return entry is not None and self._clock() < entry.expires_at

    def keys(self) -> Iterator[Hashable]:
        return iter(list(self._entries))

    async def aclose(self) -> None:
        """Cancel running loads and drop every entry; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._flights.aclose()
        finally:
            self._entries.clear()
            self._stats.bytes = 0

    def peek(self, key: Hashable) -> V | None:
        """The fresh cached value, without counting a lookup or loading."""
        entry = self._entries.get(key)
        if entry is None or self._clock() >= entry.expires_at:
            return None
        value: V = entry.value
        return value

    async def get(
        self, key: Hashable, load: Callable[[], Awaitable[V]], *, ttl_s: float | None = None
    ) -> tuple[V, Source]:
        """Return the value for ``key`` and where it came from, loading it on a miss."""
        entry = self._entries.get(key)
        now = self._clock()
        if entry is not None and now < entry.expires_at:
            self._stats.hits += 1
            self._policy.touch(key)
            if now >= entry.refresh_at and not self._flights.in_flight(key):
                self._refresh(key, load, ttl_s)
            value: V = entry.value
            return value, Source.HIT
        self._stats.misses += 1
        if not self._flights.in_flight(key):
            self._dirty.discard(key)  # a new load starts after any earlier invalidation
        try:
            failure = self._failures.get(key)
            if failure is not None and now < failure.until:
                self._stats.backed_off += 1
                raise failure.error
            value, _ = await self._flights.do(key, lambda: self._load(key, load, ttl_s))
        except KvpipeError as exc:
            stale = self._entries.get(key)
            if exc.serve_stale and stale is not None:
                self._stats.stale_served += 1
                self._policy.touch(key)
                stale_value: V = stale.value
                return stale_value, Source.STALE
            raise
        return value, Source.LOADED

    def _refresh(
        self, key: Hashable, load: Callable[[], Awaitable[V]], ttl_s: float | None
    ) -> None:
        """Reload a hot entry in the background before it expires; it keeps serving meanwhile."""
        if self._closed:
            return
        self._stats.refreshes += 1
        self._dirty.discard(key)
        fut = self._flights.start_many(
            [key], lambda keys: self._load_one(key, load, ttl_s), lambda k: KeyError(k)
        )[key]
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())

    async def _load_one(
        self, key: Hashable, load: Callable[[], Awaitable[V]], ttl_s: float | None
    ) -> dict[Hashable, V]:
        return {key: await self._load(key, load, ttl_s)}

    async def get_many(
        self,
        keys: Iterable[Hashable],
        load_many: Callable[[list[Hashable]], Awaitable[Mapping[Hashable, V]]],
        *,
        missing: Callable[[Hashable], BaseException],
        ttl_s: float | None = None,
    ) -> tuple[dict[Hashable, V], Source]:
        """Values for many keys: hits from memory, every miss in one bulk load (single-flight
        per key, so keys another caller is already loading are joined, not loaded twice)."""
        out: dict[Hashable, V] = {}
        misses: list[Hashable] = []
        now = self._clock()
        for key in dict.fromkeys(keys):
            entry = self._entries.get(key)
            if entry is not None and now < entry.expires_at:
                self._stats.hits += 1
                self._policy.touch(key)
                out[key] = entry.value
            else:
                self._stats.misses += 1
                misses.append(key)
        if not misses:
            return out, Source.HIT
        for key in misses:
            if not self._flights.in_flight(key):
                self._dirty.discard(key)
        futures = self._flights.start_many(
            misses, lambda ks: self._load_many(ks, load_many, ttl_s), missing
        )
        outcomes = await asyncio.gather(
            *(asyncio.shield(f) for f in futures.values()), return_exceptions=True
        )
        source = Source.LOADED
        for key, outcome in zip(futures, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                stale = self._entries.get(key)
                if isinstance(outcome, KvpipeError) and outcome.serve_stale and stale is not None:
                    self._stats.stale_served += 1
                    out[key] = stale.value
                    source = Source.STALE
                    continue
                raise outcome
            out[key] = outcome
        return out, source

    async def _load_many(
        self,
        keys: list[Hashable],
        load_many: Callable[[list[Hashable]], Awaitable[Mapping[Hashable, V]]],
        ttl_s: float | None,
    ) -> Mapping[Hashable, V]:
        started = time.perf_counter()
        try:
            values = await load_many(keys)
        except BaseException:
            self._stats.load_errors += 1
            raise
        finally:
            self._stats.load_seconds += time.perf_counter() - started
        self._stats.loads += len(values)
        if not self._closed:
            for key, value in values.items():
                if key in self._dirty:
                    self._dirty.discard(key)
                else:
                    self.put(key, value, ttl_s=ttl_s)
        return values

    async def _load(
        self, key: Hashable, load: Callable[[], Awaitable[V]], ttl_s: float | None
    ) -> V:
        started = time.perf_counter()
        try:
            value = await load()
        except KvpipeError as exc:
            self._stats.load_errors += 1
            self._failed(key, exc)
            raise
        except BaseException:
            self._stats.load_errors += 1
            raise
        finally:
            self._stats.load_seconds += time.perf_counter() - started
        self._stats.loads += 1
        self._failures.pop(key, None)
        if key in self._dirty:
            self._dirty.discard(key)  # invalidated while loading: serve, do not keep
        elif not self._closed:
            self.put(key, value, ttl_s=ttl_s)
        return value

    def _failed(self, key: Hashable, error: KvpipeError) -> None:
        first, longest = self.failure_backoff_s
        if first <= 0:
            return
        previous = self._failures.get(key)
        delay = first if previous is None else min(longest, previous.delay * 2)
        self._failures[key] = _Failure(self._clock() + delay, delay, error)
        if len(self._failures) > 10_000:  # forget the oldest; a flood of distinct bad keys
            self._failures.pop(next(iter(self._failures)))

    def put(self, key: Hashable, value: V, *, ttl_s: float | None = None) -> bool:
        """Insert or replace ``key``; evict to stay within budget. False if it cannot fit."""
        nbytes = self._size_of(value) + self.entry_overhead_bytes
        self._drop(key)
        if nbytes > self.capacity_bytes:
            self._stats.oversize += 1
            return False
        while self._stats.bytes + nbytes > self.capacity_bytes:
            victim = self._policy.victim()
            if victim is None:  # pragma: no cover - bytes and policy disagree
                break
            self._drop(victim)
            self._stats.evictions += 1
        ttl = self.ttl_s if ttl_s is None else ttl_s
        if self.jitter:
            ttl *= 1.0 - self.jitter * self._rng.random()
        now = self._clock()
        refresh_at = now + ttl * (1.0 - self.refresh_ahead) if self.refresh_ahead else now + ttl
        self._entries[key] = _Entry(value, nbytes, now + ttl, refresh_at)
        self._policy.add(key)
        self._stats.bytes += nbytes
        return True

    def _drop(self, key: Hashable) -> bool:
        entry = self._entries.pop(key, None)
        if entry is None:
            return False
        self._policy.remove(key)
        self._stats.bytes -= entry.nbytes
        return True

    def invalidate(self, key: Hashable) -> bool:
        """Forget ``key`` now; a load already running for it will not be kept."""
        self._failures.pop(key, None)
        if self._flights.in_flight(key):
            self._dirty.add(key)
        dropped = self._drop(key)
        if dropped:
            self._stats.invalidations += 1
        return dropped

    def invalidate_where(self, predicate: Callable[[Hashable], bool]) -> int:
        """Forget every key for which ``predicate`` is true; returns how many were dropped."""
        keys = [k for k in self._entries if predicate(k)]
        return sum(self.invalidate(k) for k in keys)

    def expire_now(self, key: Hashable) -> bool:
        """Mark ``key`` expired but keep it as a stale fallback (used when Redis says it moved)."""
        entry = self._entries.get(key)
        if entry is None:
            return False
        entry.expires_at = entry.refresh_at = self._clock()
        self._stats.expirations += 1
        return True
