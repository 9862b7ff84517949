"""An in-memory :class:`~pipeline.io.kv.protocol.KeyValue`: for kvpipe's tests and your own.

:class:`MemoryKV` keeps Redis's semantics (types, expiry, counters, ``set_if_greater``), checks
arguments with the same rules as the Redis backends, counts calls per method, and can be told
to fail or to be slow. The integration tests run the same behaviour checks against it and
against a real Redis, so a test that passes on it means what it says.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from pipeline.errors import KvpipeError
from pipeline.io.kv.protocol import _expire_ms, _key, _number, _ttl_ms, _value, hash_slot
from pipeline.resource import AsyncResource

if TYPE_CHECKING:
    from pipeline.io.kv.protocol import KeyValue

__all__ = ["MemoryKV"]

_Value = bytes | dict[str, bytes]


def _wrongtype() -> KvpipeError:
    """What Redis answers for a command on a key of the other kind (string or hash)."""
    return KvpipeError(
        "memory KV: WRONGTYPE Operation against a key holding the wrong kind of value",
        code="store_error",
    )


def _check_key(key: str) -> None:
    """Refuse a key or hash field that is not ``str``, as the Redis backends do."""
    _key(key)


def _check_value(value: bytes) -> None:
    """Refuse a value that is not ``bytes``, as the Redis backends do."""
    _value(value)


class MemoryKV(AsyncResource):
    """An in-memory :class:`~pipeline.io.kv.protocol.KeyValue` for tests, with test hooks.

    - ``clock``: seconds, monotonic; inject a fake one to expire keys without sleeping.
    - ``calls``: how many times each method was called (``calls["mget"]``).
    - ``fail``: while set, every call (after counting) raises it, e.g. ``StoreUnavailable``.
    - ``latency_s``: every call sleeps this long first (0 still yields once, like a real client).
    - ``cluster``: act as a Redis Cluster for the one rule callers must keep there: the keys of
      :meth:`set_if_greater` must share a hash slot (CROSSSLOT otherwise).
    """

    backend = "memory"

    def __init__(
        self, *, clock: Callable[[], float] = time.monotonic, cluster: bool = False
    ) -> None:
        self.clock = clock
        self.cluster = cluster
        self.calls: collections.Counter[str] = collections.Counter()
        self.fail: BaseException | None = None
        self.latency_s = 0.0
        self.closed = False
        self._data: dict[str, _Value] = {}
        self._expires: dict[str, float] = {}

    # -- test helpers (not counted) ------------------------------------------------------

    def ttl(self, key: str) -> float | None:
        """Seconds left before ``key`` expires, or None (absent or no expiry)."""
        if self._live(key) is None or key not in self._expires:
            return None
        return self._expires[key] - self.clock()

    def keys(self) -> list[str]:
        """Every live key, sorted."""
        return sorted(k for k in list(self._data) if self._live(k) is not None)

    # -- internals ------------------------------------------------------------------------

    async def _call(self, name: str) -> None:
        self.calls[name] += 1
        await asyncio.sleep(self.latency_s)
        if self.closed:
            raise KvpipeError("the memory KV is closed", code="internal")
        if self.fail is not None:
            raise self.fail

    def _live(self, key: str) -> _Value | None:
        deadline = self._expires.get(key)
        if deadline is not None and deadline <= self.clock():
            self._data.pop(key, None)
            self._expires.pop(key, None)
        return self._data.get(key)

    def _string(self, key: str) -> bytes | None:
        value = self._live(key)
        if isinstance(value, dict):
            raise _wrongtype()
        return value

    def _hash(self, key: str) -> dict[str, bytes] | None:
        value = self._live(key)
        if isinstance(value, bytes):
            raise _wrongtype()
        return value

    def _remove(self, key: str) -> bool:
        existed = self._live(key) is not None
        self._data.pop(key, None)
        self._expires.pop(key, None)
        return existed

    # -- the protocol ----------------------------------------------------------------------

    async def get(self, key: str) -> bytes | None:
        _check_key(key)
        await self._call("get")
        return self._string(key)

    async def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        for key in keys:
            _check_key(key)
        await self._call("mget")
        values = [self._live(key) for key in keys]
        return [v if isinstance(v, bytes) else None for v in values]  # MGET: nil for non-strings

    async def set(self, key: str, value: bytes, *, ex: float | None = None) -> None:
        _check_key(key)
        _check_value(value)
        ms = _ttl_ms(ex)
        await self._call("set")
        self._put(key, value, ms)

    async def set_many(self, mapping: Mapping[str, bytes], *, ex: float | None = None) -> None:
        for key, value in mapping.items():
            _check_key(key)
            _check_value(value)
        ms = _ttl_ms(ex)
        await self._call("set_many")
        for key, value in mapping.items():
            self._put(key, value, ms)

    def _put(self, key: str, value: bytes, ms: int | None) -> None:
        self._data[key] = value
        if ms is None:
            self._expires.pop(key, None)
        else:
            self._expires[key] = self.clock() + ms / 1000

    async def incr(self, key: str) -> int:
        _check_key(key)
        await self._call("incr")
        current = self._string(key)
        try:
            number = int(current) if current is not None else 0
        except ValueError:
            raise KvpipeError(
                "memory KV: ERR value is not an integer or out of range", code="store_error"
            ) from None
        self._data[key] = str(number + 1).encode()  # INCR keeps any expiry
        return number + 1

    async def set_if_greater(self, key: str, value: int, *, persist: Sequence[str] = ()) -> bool:
        _check_key(key)
        for other in persist:
            _check_key(other)
        _number(value)
        await self._call("set_if_greater")
        if self.cluster and len({hash_slot(k) for k in (key, *persist)}) > 1:
            raise KvpipeError(
                "CROSSSLOT Keys in request don't hash to the same slot", code="store_error"
            )
        current = self._string(key)  # like the script's GET: WRONGTYPE on a hash
        try:
            if current is not None and int(current) >= value:
                return False
        except ValueError:
            pass  # unreadable counts as lower, as in the script
        self._put(key, str(value).encode(), None)
        for other in persist:
            if self._live(other) is not None:
                self._expires.pop(other, None)
        return True

    async def delete(self, *keys: str) -> int:
        for key in keys:
            _check_key(key)
        await self._call("delete")
        return sum(self._remove(key) for key in keys)

    async def expire(self, key: str, seconds: float) -> bool:
        _check_key(key)
        ms = _expire_ms(seconds)
        await self._call("expire")
        if self._live(key) is None:
            return False
        if ms <= 0:
            self._remove(key)
        else:
            self._expires[key] = self.clock() + ms / 1000
        return True

    async def persist(self, key: str) -> bool:
        _check_key(key)
        await self._call("persist")
        if self._live(key) is None:
            return False
        return self._expires.pop(key, None) is not None

    async def exists(self, key: str) -> bool:
        _check_key(key)
        await self._call("exists")
        return self._live(key) is not None

    async def hget(self, key: str, field: str) -> bytes | None:
        _check_key(key)
        _check_key(field)
        await self._call("hget")
        return (self._hash(key) or {}).get(field)

    async def hmget(self, key: str, fields: Sequence[str]) -> list[bytes | None]:
        _check_key(key)
        for field in fields:
            _check_key(field)
        await self._call("hmget")
        if not fields:
            return []  # like the adapters: no round trip, so no type check either
        table = self._hash(key) or {}
        return [table.get(field) for field in fields]

    async def hset_many(self, key: str, mapping: Mapping[str, bytes]) -> None:
        _check_key(key)
        for field, value in mapping.items():
            _check_key(field)
            _check_value(value)
        await self._call("hset_many")
        if not mapping:
            return
        table = self._hash(key)
        if table is None:
            table = self._data[key] = {}
        table.update(mapping)

    async def hgetall(self, key: str) -> dict[str, bytes]:
        _check_key(key)
        await self._call("hgetall")
        return dict(self._hash(key) or {})

    async def hdel(self, key: str, *fields: str) -> int:
        _check_key(key)
        for field in fields:
            _check_key(field)
        await self._call("hdel")
        if not fields:
            return 0
        table = self._hash(key)
        if table is None:
            return 0
        removed = sum(table.pop(field, None) is not None for field in set(fields))
        if not table:
            self._remove(key)
        return removed

    async def ping(self) -> None:
        await self._call("ping")

    async def aclose(self) -> None:
        self.calls["aclose"] += 1
        self.closed = True

    async def start(self) -> None:
        await self.ping()


if TYPE_CHECKING:
    _CONFORMS: type[KeyValue] = MemoryKV  # mypy checks the whole protocol is implemented
