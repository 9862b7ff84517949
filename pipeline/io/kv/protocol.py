"""The key-value protocol every backend implements, with the helpers and error mapping they share.

Everything above :mod:`pipeline.io.kv` talks to Redis through :class:`KeyValue` and only ever
sees :mod:`pipeline.errors` exceptions. This module imports no Redis client: the argument checks,
encodings, reply checks and the classification of server error replies live here, so both
backends (and the in-memory one) behave alike.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Protocol, Self, TypeVar

from pipeline.errors import ConfigError, KvpipeError, StoreOutOfMemory, StoreUnavailable

__all__ = ["KeyValue", "hash_slot"]

T = TypeVar("T")

#: Longest foreign error text quoted in one of our messages.
_MAX_REASON = 200
#: Error-reply prefixes that mean "the server cannot serve this now": retry later.
_TRANSIENT_REPLIES = ("LOADING", "BUSY", "MASTERDOWN", "READONLY", "TRYAGAIN", "CLUSTERDOWN")
#: Error-reply fragments that mean the credentials were refused.
_AUTH_REPLIES = ("WRONGPASS", "NOAUTH", "invalid password", "invalid username-password")
#: set_if_greater in one step: KEYS[1] the counter-like key, KEYS[2..] keys to persist.
_SET_IF_GREATER = """
local stored = tonumber(redis.call('GET', KEYS[1]) or '')
if stored ~= nil and stored >= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
for i = 2, #KEYS do redis.call('PERSIST', KEYS[i]) end
return 1
"""


class KeyValue(Protocol):
    """What kvpipe needs from a key-value store: strings, counters, expiry and hashes.

    Keys and hash fields are ``str`` (UTF-8 on the wire), values are ``bytes``. Every method
    makes at most one attempt and one round trip; failures raise :class:`StoreUnavailable`
    (retryable), :class:`ConfigError` (credentials refused) or :class:`KvpipeError`.
    ``async with`` connects and checks the store with a PING; leaving it closes.
    """

    @property
    def backend(self) -> str:
        """Name of the client underneath: ``"redis-py"``, ``"asyncio-redis"`` or ``"memory"``."""
        ...

    @property
    def cluster(self) -> bool:
        """Whether keys are spread over the hash slots of a Redis Cluster: then the keys of
        one :meth:`set_if_greater` must share a slot (one hash tag, see :func:`hash_slot`)."""
        ...

    async def get(self, key: str) -> bytes | None:
        """The value at ``key``, or None when it is absent."""
        ...

    async def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        """The values at ``keys`` in order (None where absent), in one round trip."""
        ...

    async def set(self, key: str, value: bytes, *, ex: float | None = None) -> None:
        """Store ``value`` at ``key``; with ``ex``, the key expires after ``ex`` seconds."""
        ...

    async def set_many(self, mapping: Mapping[str, bytes], *, ex: float | None = None) -> None:
        """Store every pair in one round trip; not atomic across keys (commit with one set)."""
        ...

    async def incr(self, key: str) -> int:
        """Add one to the integer at ``key`` (absent counts as 0) and return the new value."""
        ...

    async def set_if_greater(self, key: str, value: int, *, persist: Sequence[str] = ()) -> bool:
        """In one step: store ``value`` (decimal) at ``key`` only if it is greater than the
        integer there (absent or unreadable counts as lower), and then remove the expiry of the
        ``persist`` keys; return whether it was stored. On a cluster every key must be in the
        slot of ``key`` (one hash tag), else a ``store_error``."""
        ...

    async def delete(self, *keys: str) -> int:
        """Remove ``keys``; return how many existed."""
        ...

    async def expire(self, key: str, seconds: float) -> bool:
        """Let ``key`` expire after ``seconds`` (<= 0 removes it now); False when absent."""
        ...

    async def persist(self, key: str) -> bool:
        """Remove the expiry of ``key``; False when absent or without one."""
        ...

    async def exists(self, key: str) -> bool:
        """Whether ``key`` exists."""
        ...

    async def hget(self, key: str, field: str) -> bytes | None:
        """One field of the hash at ``key``, or None."""
        ...

    async def hmget(self, key: str, fields: Sequence[str]) -> list[bytes | None]:
        """Fields of the hash at ``key`` in order (None where absent), in one round trip."""
        ...

    async def hset_many(self, key: str, mapping: Mapping[str, bytes]) -> None:
        """Set several fields of the hash at ``key`` in one command."""
        ...

    async def hgetall(self, key: str) -> dict[str, bytes]:
        """Every field of the hash at ``key`` (empty when absent)."""
        ...

    async def hdel(self, key: str, *fields: str) -> int:
        """Remove ``fields`` from the hash at ``key``; return how many existed."""
        ...

    async def ping(self) -> None:
        """One PING round trip: raise unless the store answers."""
        ...

    async def aclose(self) -> None:
        """Release every connection; idempotent and safe to call again after a cancellation."""
        ...

    async def __aenter__(self) -> Self:
        """Connect and PING, so a missing store fails here and fast."""
        ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close."""
        ...


def _crc16(data: bytes) -> int:
    """CRC-16/XMODEM, the checksum Redis Cluster hashes keys with."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def hash_slot(key: str) -> int:
    """The Redis Cluster slot (0-16383) of ``key``: only the part inside the first non-empty
    ``{...}`` counts when there is one, so keys with one hash tag share a slot."""
    raw = _key(key)
    start = raw.find(b"{")
    if start >= 0:
        end = raw.find(b"}", start + 1)
        if end > start + 1:
            raw = raw[start + 1 : end]
    return _crc16(raw) % 16384


# ---------------------------------------------------------------------------------------------
# Shared helpers: argument checks, encodings, error translation, closing.


def _key(key: str) -> bytes:
    """A key or hash field as wire bytes; anything but ``str`` is a caller bug."""
    if not isinstance(key, str):
        raise TypeError(f"Redis keys and hash fields must be str, not {type(key).__name__}")
    return key.encode("utf-8", "surrogateescape")


def _field_name(raw: object) -> str:
    """A hash field name read back from Redis (lossless even for non-UTF-8 bytes)."""
    return _as_bytes(raw).decode("utf-8", "surrogateescape")


def _value(value: bytes) -> bytes:
    """A value to store; anything but ``bytes`` is a caller bug."""
    if not isinstance(value, bytes):
        raise TypeError(f"Redis values must be bytes, not {type(value).__name__}")
    return value


def _number(value: int) -> bytes:
    """An integer argument as decimal wire bytes; anything but ``int`` is a caller bug."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"expected an int, not {type(value).__name__}")
    return b"%d" % value


def _ttl_ms(ex: float | None) -> int | None:
    """``ex`` seconds as whole milliseconds (rounded up, at least 1); None means no expiry."""
    if ex is None:
        return None
    if not (isinstance(ex, int | float) and math.isfinite(ex) and ex > 0):
        raise ValueError(f"ex must be a positive number of seconds, not {ex!r}")
    return max(1, math.ceil(ex * 1000))


def _expire_ms(seconds: float) -> int:
    """``seconds`` for PEXPIRE: rounded up to milliseconds; zero or less removes the key."""
    if not (isinstance(seconds, int | float) and math.isfinite(seconds)):
        raise ValueError(f"seconds must be a finite number, not {seconds!r}")
    return math.ceil(seconds * 1000)


def _as_bytes(raw: object) -> bytes:
    """A reply that must be bytes (guards against a client handing back something else)."""
    if isinstance(raw, bytes):
        return raw
    raise KvpipeError(f"unexpected Redis reply of type {type(raw).__name__}", code="store_error")


def _opt_bytes(raw: object) -> bytes | None:
    """A reply that must be bytes or None."""
    return None if raw is None else _as_bytes(raw)


def _int(raw: object) -> int:
    """A reply that must be an integer."""
    if isinstance(raw, int):
        return raw
    raise KvpipeError(f"unexpected Redis reply of type {type(raw).__name__}", code="store_error")


def _what(command: str, key: str | None = None, count: int | None = None) -> str:
    """What failed, for messages: ``GET kvpipe:m:current`` or ``MGET of 12 keys``."""
    if key is not None:
        shown = key if len(key) <= 80 else key[:77] + "..."
        return f"{command} {shown}"
    if count is not None:
        return f"{command} of {count} keys"
    return command


def _reason(exc: BaseException, secrets: Sequence[str]) -> str:
    """A foreign exception as one short line, with ``secrets`` masked."""
    if isinstance(exc, TimeoutError):
        text = str(exc) or "timed out"
    else:
        text = str(exc) or type(exc).__name__
    return _one_line(text, secrets)


def _one_line(text: str, secrets: Sequence[str]) -> str:
    """``text`` on one line, at most ``_MAX_REASON`` characters, with ``secrets`` masked."""
    text = " ".join(text.split())
    for secret in secrets:
        text = text.replace(secret, "***")
    if len(text) > _MAX_REASON:
        text = text[: _MAX_REASON - 3] + "..."
    return text


def _credentials_refused(url: str, reason: str) -> ConfigError:
    """The error for a refused password or user: fix configuration, retrying will not help."""
    return ConfigError(
        f"Redis at {url} refused the credentials in the URL ({reason}); "
        "fix the user/password in KVPIPE_REDIS"
    )


def _unavailable(url: str, what: str, reason: str) -> StoreUnavailable:
    """The error for an unreachable, slow or busy server: retryable."""
    return StoreUnavailable(f"Redis at {url} unavailable: {what} failed: {reason}")


def _out_of_memory(url: str, what: str) -> StoreOutOfMemory:
    """The error for a write refused at ``maxmemory``: no retry loop, the operator must act."""
    return StoreOutOfMemory(
        f"Redis at {url} is out of memory (used memory > maxmemory): {what} was refused; "
        "raise maxmemory or free keys (delete or expire old versions), then try again"
    )


def _without_echo(text: str) -> str:
    """An error reply without the command redis-py's pipelines quote (keys and raw values)."""
    _, marker, reply = text.rpartition(" of pipeline caused error: ")
    if not marker:
        return text
    reply = reply.strip()
    if reply.startswith("(") and reply.endswith(")"):  # the repr of the exception's args
        with contextlib.suppress(ValueError, SyntaxError, TypeError, MemoryError):
            args = ast.literal_eval(reply)
            if isinstance(args, tuple) and args:
                reply = str(args[0])
    return reply


def _from_error_reply(text: str, url: str, what: str) -> KvpipeError:
    """Classify a server error reply (``-PREFIX message``) into our exception tree."""
    text = reply = _without_echo(text)  # never quote the command: it may hold tensor bytes
    first = reply.split(" ", 1)[0]
    if any(fragment in reply for fragment in _AUTH_REPLIES):
        return _credentials_refused(url, text)
    if first == "NOPERM":
        return ConfigError(f"Redis at {url}: the user in the URL may not run {what} ({text})")
    if first == "OOM":
        return _out_of_memory(url, what)
    if first in _TRANSIENT_REPLIES or "max number of clients" in reply:
        return _unavailable(url, what, text)
    return KvpipeError(f"Redis at {url}: {what} failed: {text}", code="store_error")


class _Closer:
    """Runs a close routine once, in a task of its own, so a cancelled ``aclose`` still closes."""

    def __init__(self, routine: Callable[[], Awaitable[None]]) -> None:
        self._routine = routine
        self._task: asyncio.Future[None] | None = None

    @property
    def started(self) -> bool:
        return self._task is not None

    async def close(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._quietly())
        await asyncio.shield(self._task)

    async def _quietly(self) -> None:
        with contextlib.suppress(Exception):
            await self._routine()


def _closed_error(url: str) -> KvpipeError:
    """The error for a call after ``aclose``: retrying cannot help."""
    return KvpipeError(f"the Redis adapter for {url} is closed", code="internal")
