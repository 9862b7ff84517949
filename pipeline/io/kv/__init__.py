"""The key-value adapter: one small async protocol over Redis, with two client implementations.

Everything above this module talks to Redis through :class:`KeyValue` and only ever sees
:mod:`pipeline.errors` exceptions; this is the one module that imports ``redis`` or
``asyncio_redis``. :func:`open_kv` picks the implementation named by
``RedisSettings.backend``:

- :class:`RedisPyKV` over ``redis.asyncio`` (the default): TLS, ACL users, timeouts.
- :class:`AsyncioRedisKV` over ``asyncio_redis`` 0.16, guarded rather than trusted: every call
  runs under a timeout, only database 0, no TLS and no ACL user (refused at start), and the
  adapter makes its own connections, sends AUTH itself and waits for it, and checks each new
  connection with a PING before the first real command.

Both make one attempt per call (the cache decides about retries) and reconnect by themselves on
the next call after Redis comes back.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, Self, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import asyncio_redis
import redis.asyncio as aioredis
from asyncio_redis.encoders import BytesEncoder
from asyncio_redis.protocol import _NoTransaction as _NO_TRANSACTION
from redis import exceptions as redis_errors
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from pipeline.config import RedisSettings
from pipeline.errors import ConfigError, KvpipeError, StoreOutOfMemory, StoreUnavailable
from pipeline.redact import redact_url, url_secrets
from pipeline.resource import AsyncResource

__all__ = ["AsyncioRedisKV", "KeyValue", "RedisPyKV", "open_kv"]

T = TypeVar("T")

#: redis-py PINGs a pooled connection before use when it has been idle this long.
HEALTH_CHECK_INTERVAL_S = 30.0
#: Longest foreign error text quoted in one of our messages.
_MAX_REASON = 200
#: Error-reply prefixes that mean "the server cannot serve this now": retry later.
_TRANSIENT_REPLIES = ("LOADING", "BUSY", "MASTERDOWN", "READONLY", "TRYAGAIN", "CLUSTERDOWN")
#: Error-reply fragments that mean the credentials were refused.
_AUTH_REPLIES = ("WRONGPASS", "NOAUTH", "invalid password", "invalid username-password")
#: AUTH replies from a server that has no password set (single-argument AUTH only).
_NO_PASSWORD_SET = ("without any password configured", "no password is set")
_OTHER_BACKEND = "set KVPIPE_REDIS_BACKEND=redis-py"
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
        """Name of the client underneath: ``"redis-py"`` or ``"asyncio-redis"``."""
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
        ``persist`` keys; return whether it was stored."""
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


def open_kv(settings: RedisSettings) -> KeyValue:
    """The adapter named by ``settings.backend``, not yet connected (use ``async with``)."""
    if settings.backend == "asyncio-redis":
        return AsyncioRedisKV(settings)
    if settings.backend == "redis-py":
        return RedisPyKV(settings)
    raise ConfigError(
        f"unknown Redis backend {settings.backend!r}; set KVPIPE_REDIS_BACKEND to redis-py "
        "or asyncio-redis"
    )


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
    if isinstance(exc, asyncio_redis.ConnectionLostError):
        text = "connection lost"
    elif isinstance(exc, TimeoutError):
        text = str(exc) or "timed out"
    else:
        text = str(exc) or type(exc).__name__
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
    return KvpipeError(f"the Redis adapter for {url} is closed", code="internal")


# ---------------------------------------------------------------------------------------------
# redis-py


def _from_redis_py(exc: BaseException, url: str, what: str, secrets: Sequence[str]) -> KvpipeError:
    """Translate a redis-py (or socket) exception."""
    if isinstance(exc, redis_errors.ResponseError) and exc.args:
        exc = type(exc)(_without_echo(str(exc.args[0])))  # drop a pipeline's quoted command
    if isinstance(exc, redis_errors.OutOfMemoryError):
        return _out_of_memory(url, what)
    reason = _reason(exc, secrets)
    if isinstance(exc, redis_errors.AuthenticationError):
        return _credentials_refused(url, reason)
    if isinstance(exc, redis_errors.AuthorizationError | redis_errors.NoPermissionError):
        return ConfigError(f"Redis at {url}: the user in the URL may not run {what} ({reason})")
    if isinstance(
        exc,
        redis_errors.ConnectionError
        | redis_errors.TimeoutError
        | redis_errors.ReadOnlyError
        | redis_errors.TryAgainError
        | redis_errors.ClusterDownError
        | OSError
        | TimeoutError,
    ):
        return _unavailable(url, what, reason)
    if isinstance(exc, redis_errors.ResponseError):
        return _from_error_reply(reason, url, what)
    return KvpipeError(f"Redis at {url}: {what} failed: {reason}", code="store_error")


class RedisPyKV(AsyncResource):
    """:class:`KeyValue` over ``redis.asyncio``: a blocking pool of ``pool_size`` connections.

    One attempt per call (redis-py's own retries are switched off); a pooled connection the
    server closed is noticed and reopened when it is next taken from the pool.
    """

    backend = "redis-py"

    def __init__(self, settings: RedisSettings) -> None:
        self._settings = settings
        self._url = redact_url(settings.url)
        self._secrets = url_secrets(settings.url)
        try:
            self._pool = aioredis.BlockingConnectionPool.from_url(
                settings.url,
                max_connections=settings.pool_size,
                timeout=settings.timeout_s,
                socket_timeout=settings.timeout_s,
                socket_connect_timeout=settings.connect_timeout_s,
                health_check_interval=HEALTH_CHECK_INTERVAL_S,
                # One immediate retry on a dropped connection (a restarted Redis closes the
                # pooled ones); never on a timeout, which would double the wait.
                retry=Retry(NoBackoff(), 1, supported_errors=(redis_errors.ConnectionError,)),
                decode_responses=False,
            )
        except (ValueError, TypeError) as exc:
            raise ConfigError(
                f"Redis URL {self._url!r} cannot be used: {_reason(exc, self._secrets)}"
            ) from None
        self._client: aioredis.Redis = aioredis.Redis(connection_pool=self._pool)
        # Backstop over redis-py's own timeouts: pool wait + connect + reply, plus slack.
        self._backstop_s = 2 * settings.timeout_s + settings.connect_timeout_s + 1.0
        self._closer = _Closer(self._close)

    def __repr__(self) -> str:
        return f"RedisPyKV({self._url!r})"

    async def _run(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        """Run one call under the backstop timeout and translate whatever it raises."""
        if self._closer.started:
            raise _closed_error(self._url)
        try:
            async with asyncio.timeout(self._backstop_s):
                return await op()
        except (redis_errors.RedisError, OSError, TimeoutError) as exc:
            raise _from_redis_py(exc, self._url, what, self._secrets) from exc

    async def get(self, key: str) -> bytes | None:
        k = _key(key)

        async def op() -> bytes | None:
            return _opt_bytes(await self._client.get(k))

        return await self._run(_what("GET", key), op)

    async def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        ks = [_key(k) for k in keys]
        if not ks:
            return []

        async def op() -> list[bytes | None]:
            return [_opt_bytes(v) for v in await self._client.mget(ks)]

        return await self._run(_what("MGET", count=len(ks)), op)

    async def set(self, key: str, value: bytes, *, ex: float | None = None) -> None:
        k, v, px = _key(key), _value(value), _ttl_ms(ex)

        async def op() -> None:
            await self._client.set(k, v, px=px)

        await self._run(_what("SET", key), op)

    async def set_many(self, mapping: Mapping[str, bytes], *, ex: float | None = None) -> None:
        items = [(_key(k), _value(v)) for k, v in mapping.items()]
        px = _ttl_ms(ex)
        if not items:
            return

        async def op() -> None:
            async with self._client.pipeline(transaction=False) as pipe:
                for k, v in items:
                    pipe.set(k, v, px=px)
                await pipe.execute()

        await self._run(_what("SET", count=len(items)), op)

    async def incr(self, key: str) -> int:
        k = _key(key)

        async def op() -> int:
            return _int(await self._client.incr(k))

        return await self._run(_what("INCR", key), op)

    async def set_if_greater(self, key: str, value: int, *, persist: Sequence[str] = ()) -> bool:
        ks, v = [_key(key), *(_key(k) for k in persist)], _number(value)

        async def op() -> bool:
            return _int(await self._client.eval(_SET_IF_GREATER, len(ks), *ks, v)) == 1

        return await self._run(_what("EVAL set_if_greater", key), op)

    async def delete(self, *keys: str) -> int:
        ks = [_key(k) for k in keys]
        if not ks:
            return 0

        async def op() -> int:
            return _int(await self._client.delete(*ks))

        return await self._run(_what("DEL", count=len(ks)), op)

    async def expire(self, key: str, seconds: float) -> bool:
        k, ms = _key(key), _expire_ms(seconds)

        async def op() -> bool:
            return bool(await self._client.pexpire(k, ms))

        return await self._run(_what("PEXPIRE", key), op)

    async def persist(self, key: str) -> bool:
        k = _key(key)

        async def op() -> bool:
            return bool(await self._client.persist(k))

        return await self._run(_what("PERSIST", key), op)

    async def exists(self, key: str) -> bool:
        k = _key(key)

        async def op() -> bool:
            return _int(await self._client.exists(k)) > 0

        return await self._run(_what("EXISTS", key), op)

    async def hget(self, key: str, field: str) -> bytes | None:
        k, f = _key(key), _key(field)

        async def op() -> bytes | None:
            return _opt_bytes(await self._client.hget(k, f))

        return await self._run(_what("HGET", key), op)

    async def hmget(self, key: str, fields: Sequence[str]) -> list[bytes | None]:
        k, fs = _key(key), [_key(f) for f in fields]
        if not fs:
            return []

        async def op() -> list[bytes | None]:
            return [_opt_bytes(v) for v in await self._client.hmget(k, fs)]

        return await self._run(_what("HMGET", key), op)

    async def hset_many(self, key: str, mapping: Mapping[str, bytes]) -> None:
        k = _key(key)
        pairs = {_key(f): _value(v) for f, v in mapping.items()}
        if not pairs:
            return

        flat = [part for pair in pairs.items() for part in pair]

        async def op() -> None:
            await self._client.hset(k, items=flat)

        await self._run(_what("HSET", key), op)

    async def hgetall(self, key: str) -> dict[str, bytes]:
        k = _key(key)

        async def op() -> dict[str, bytes]:
            reply = await self._client.hgetall(k)
            return {_field_name(f): _as_bytes(v) for f, v in reply.items()}

        return await self._run(_what("HGETALL", key), op)

    async def hdel(self, key: str, *fields: str) -> int:
        k, fs = _key(key), [_key(f) for f in fields]
        if not fs:
            return 0

        async def op() -> int:
            return _int(await self._client.hdel(k, *fs))

        return await self._run(_what("HDEL", key), op)

    async def ping(self) -> None:
        async def op() -> None:
            await self._client.ping()

        await self._run("PING", op)

    async def aclose(self) -> None:
        await self._closer.close()

    async def _close(self) -> None:
        await self._client.aclose()
        await self._pool.disconnect()

    async def start(self) -> None:
        """Connect: one PING round trip, so a missing Redis fails here, fast."""
        await self.ping()


# ---------------------------------------------------------------------------------------------
# asyncio-redis


@dataclass(frozen=True)
class AsyncioRedisEndpoint:
    """Where an asyncio-redis connection goes: host and port, or a socket path with port 0."""

    host: str
    port: int
    password: str | None


def asyncio_redis_endpoint(settings: RedisSettings) -> AsyncioRedisEndpoint:
    """Parse the URL for asyncio-redis, refusing what it cannot do safely (one-line ConfigError).

    Refused: ``rediss://`` (no TLS), a user name (no ACL AUTH), a database other than 0 (its
    SELECT races with the first commands), and query options.
    """
    url = redact_url(settings.url)
    try:
        parts = urlsplit(settings.url)
        port = parts.port
        query = parse_qs(parts.query, keep_blank_values=True)
    except ValueError as exc:
        raise ConfigError(f"Redis URL {url!r} cannot be parsed: {exc}") from None
    if parts.scheme == "rediss":
        raise ConfigError(
            f"Redis URL {url!r} asks for TLS (rediss://), which the asyncio-redis backend "
            f"cannot do; {_OTHER_BACKEND}"
        )
    if parts.scheme not in ("redis", "unix"):
        raise ConfigError(f"Redis URL {url!r} must start with redis:// or unix://")
    if parts.username:
        raise ConfigError(
            f"Redis URL {url!r} names an ACL user, which the asyncio-redis backend cannot send; "
            f"{_OTHER_BACKEND} (or use redis://:PASSWORD@host for the default user)"
        )
    unknown = sorted(set(query) - {"db"})
    if unknown:
        raise ConfigError(
            f"Redis URL {url!r} has options ({', '.join(unknown)}) the asyncio-redis backend "
            f"does not support; {_OTHER_BACKEND}"
        )
    if "db" in query:
        db_text = query["db"][-1]
    elif parts.scheme == "redis":
        db_text = parts.path.lstrip("/") or "0"
    else:
        db_text = "0"
    if not db_text.isdigit():
        raise ConfigError(f"Redis URL {url!r}: database {db_text!r} is not a number")
    if int(db_text) != 0:
        raise ConfigError(
            f"Redis URL {url!r} selects database {int(db_text)}, but the asyncio-redis backend "
            f"uses database 0 only (separate deployments by key prefix); {_OTHER_BACKEND}"
        )
    password = unquote(parts.password) if parts.password else None
    if parts.scheme == "unix":
        if not parts.path:
            raise ConfigError(f"Redis URL {url!r} has no socket path")
        return AsyncioRedisEndpoint(host=unquote(parts.path), port=0, password=password)
    return AsyncioRedisEndpoint(
        host=parts.hostname or "localhost", port=port or 6379, password=password
    )


class _Slot:
    """One place in the pool: an asyncio-redis connection (or none yet), used by one call."""

    __slots__ = ("conn", "ready")

    def __init__(self) -> None:
        self.conn: Any = None
        self.ready = False


async def _pipelined(calls: Sequence[Awaitable[Any]]) -> list[Any]:
    """Send several commands without waiting in between; raise the first error after all."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


class AsyncioRedisKV(AsyncResource):
    """:class:`KeyValue` over ``asyncio_redis``, which is guarded here, not trusted.

    The library's own AUTH/SELECT are fire-and-forget tasks, its reconnect loop waits forever
    and a cancelled command can leave a connection hung, so this class: keeps ``pool_size``
    connections of its own, made with ``auto_reconnect=False``; sends AUTH itself and waits for
    it, then needs a PING reply before the first real command; runs connecting under
    ``connect_timeout_s`` and every call under ``timeout_s``; and throws a connection away after
    any timeout, cancellation or lost connection, making a new one on the next call.
    """

    backend = "asyncio-redis"

    def __init__(self, settings: RedisSettings) -> None:
        self._settings = settings
        self._url = redact_url(settings.url)
        self._endpoint = asyncio_redis_endpoint(settings)
        self._secrets = url_secrets(settings.url)
        self._idle: asyncio.LifoQueue[_Slot] = asyncio.LifoQueue()
        self._slots = [_Slot() for _ in range(max(1, settings.pool_size))]
        for slot in self._slots:
            self._idle.put_nowait(slot)
        self._readers: set[asyncio.Future[Any]] = set()
        self._closer = _Closer(self._close)

    def __repr__(self) -> str:
        return f"AsyncioRedisKV({self._url!r})"

    # -- connections -----------------------------------------------------------------------

    def _drop(self, slot: _Slot) -> None:
        """Close the slot's connection (state unknown after a timeout or cancel) and forget it."""
        conn, slot.conn, slot.ready = slot.conn, None, False
        if conn is None:
            return
        # The library's reader task ends one loop turn after the transport closes; remember it
        # so aclose can wait for it rather than leave a pending task behind.
        reader = getattr(conn.protocol, "_reader_f", None)
        if isinstance(reader, asyncio.Future) and not reader.done():
            self._readers.add(reader)
            reader.add_done_callback(self._readers.discard)
        conn.close()

    async def _connect(self, slot: _Slot) -> None:
        """Open a connection, AUTH (awaited) if there is a password, and PING it."""
        ep = self._endpoint
        # No password= here: the library would send AUTH from a task nobody awaits.
        slot.conn = await asyncio_redis.Connection.create(
            host=ep.host, port=ep.port, db=0, encoder=BytesEncoder(), auto_reconnect=False
        )
        protocol = slot.conn.protocol
        if ep.password is not None:
            try:
                await protocol.auth(ep.password.encode("utf-8"))
            except asyncio_redis.ErrorReply as exc:
                # A server without a password accepts any (redis-py's AUTH default pw succeeds
                # there too): carry on, and let the PING below decide.
                if not any(text in str(exc) for text in _NO_PASSWORD_SET):
                    raise
        await protocol.ping()
        slot.ready = True

    async def _ready(self, slot: _Slot, what: str) -> Any:
        """The slot's protocol, connected and checked; reconnect if it was lost."""
        if slot.ready and slot.conn is not None and slot.conn.protocol.is_connected:
            return slot.conn.protocol
        self._drop(slot)
        timeout = self._settings.connect_timeout_s
        try:
            async with asyncio.timeout(timeout):
                await self._connect(slot)
        except asyncio_redis.ErrorReply as exc:
            self._drop(slot)
            raise _from_error_reply(_reason(exc, self._secrets), self._url, "connect") from None
        except TimeoutError:
            self._drop(slot)
            raise _unavailable(
                self._url, f"connect (for {what})", f"no answer within {timeout:g} s"
            ) from None
        except (OSError, asyncio_redis.Error) as exc:
            self._drop(slot)
            raise _unavailable(
                self._url, f"connect (for {what})", _reason(exc, self._secrets)
            ) from exc
        except BaseException:
            self._drop(slot)
            raise
        return slot.conn.protocol

    async def _checkout(self, what: str) -> _Slot:
        """A free slot, waiting at most ``timeout_s`` (pool exhaustion is StoreUnavailable)."""
        timeout = self._settings.timeout_s
        try:
            async with asyncio.timeout(timeout):
                return await self._idle.get()
        except TimeoutError:
            raise _unavailable(
                self._url,
                what,
                f"no free connection within {timeout:g} s (pool of {len(self._slots)})",
            ) from None

    async def _run(self, what: str, op: Callable[[Any], Awaitable[T]]) -> T:
        """Run ``op`` on a checked-out, ready connection under the timeout; translate errors."""
        if self._closer.started:
            raise _closed_error(self._url)
        slot = await self._checkout(what)
        try:
            protocol = await self._ready(slot, what)
            timeout = self._settings.timeout_s
            try:
                async with asyncio.timeout(timeout):
                    return await op(protocol)
            except asyncio_redis.ErrorReply as exc:
                # The reply was read, so the connection is still in step: keep it.
                raise _from_error_reply(_reason(exc, self._secrets), self._url, what) from None
            except TimeoutError:
                self._drop(slot)
                raise _unavailable(self._url, what, f"no answer within {timeout:g} s") from None
            except (OSError, asyncio_redis.Error) as exc:
                self._drop(slot)
                raise _unavailable(self._url, what, _reason(exc, self._secrets)) from exc
            except BaseException:
                # Cancelled (or a bug): replies may still be on the way, so this connection's
                # state is unknown. The library would even hang it if an error reply arrived
                # for a cancelled command. Start afresh next time.
                self._drop(slot)
                raise
        finally:
            if self._closer.started:
                self._drop(slot)  # closed meanwhile: do not keep what this call reopened
            self._idle.put_nowait(slot)

    # -- commands --------------------------------------------------------------------------

    async def get(self, key: str) -> bytes | None:
        k = _key(key)

        async def op(p: Any) -> bytes | None:
            return _opt_bytes(await p.get(k))

        return await self._run(_what("GET", key), op)

    async def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        ks = [_key(k) for k in keys]
        if not ks:
            return []

        async def op(p: Any) -> list[bytes | None]:
            return [_opt_bytes(v) for v in await p.mget_aslist(ks)]

        return await self._run(_what("MGET", count=len(ks)), op)

    async def set(self, key: str, value: bytes, *, ex: float | None = None) -> None:
        k, v, px = _key(key), _value(value), _ttl_ms(ex)

        async def op(p: Any) -> None:
            await p.set(k, v, pexpire=px)

        await self._run(_what("SET", key), op)

    async def set_many(self, mapping: Mapping[str, bytes], *, ex: float | None = None) -> None:
        items = [(_key(k), _value(v)) for k, v in mapping.items()]
        px = _ttl_ms(ex)
        if not items:
            return

        async def op(p: Any) -> None:
            # The library has no MSET (and MSET has no expiry): pipeline one SET per key.
            await _pipelined([p.set(k, v, pexpire=px) for k, v in items])

        await self._run(_what("SET", count=len(items)), op)

    async def incr(self, key: str) -> int:
        k = _key(key)

        async def op(p: Any) -> int:
            return _int(await p.incr(k))

        return await self._run(_what("INCR", key), op)

    async def set_if_greater(self, key: str, value: int, *, persist: Sequence[str] = ()) -> bool:
        ks, v = [_key(key), *(_key(k) for k in persist)], _number(value)
        script = _SET_IF_GREATER.encode()

        async def op(p: Any) -> bool:
            # The library's evalsha turns every error reply (OOM, NOSCRIPT) into
            # ScriptKilledError, losing its text: send EVAL through its query primitive.
            reply = await p._query(_NO_TRANSACTION, b"eval", script, b"%d" % len(ks), *ks, v)
            return _int(reply) == 1

        return await self._run(_what("EVAL set_if_greater", key), op)

    async def delete(self, *keys: str) -> int:
        ks = [_key(k) for k in keys]
        if not ks:
            return 0

        async def op(p: Any) -> int:
            return _int(await p.delete(ks))

        return await self._run(_what("DEL", count=len(ks)), op)

    async def expire(self, key: str, seconds: float) -> bool:
        k, ms = _key(key), _expire_ms(seconds)

        async def op(p: Any) -> bool:
            return _int(await p.pexpire(k, ms)) > 0

        return await self._run(_what("PEXPIRE", key), op)

    async def persist(self, key: str) -> bool:
        k = _key(key)

        async def op(p: Any) -> bool:
            return _int(await p.persist(k)) > 0

        return await self._run(_what("PERSIST", key), op)

    async def exists(self, key: str) -> bool:
        k = _key(key)

        async def op(p: Any) -> bool:
            return bool(await p.exists(k))

        return await self._run(_what("EXISTS", key), op)

    async def hget(self, key: str, field: str) -> bytes | None:
        k, f = _key(key), _key(field)

        async def op(p: Any) -> bytes | None:
            return _opt_bytes(await p.hget(k, f))

        return await self._run(_what("HGET", key), op)

    async def hmget(self, key: str, fields: Sequence[str]) -> list[bytes | None]:
        k, fs = _key(key), [_key(f) for f in fields]
        if not fs:
            return []

        async def op(p: Any) -> list[bytes | None]:
            return [_opt_bytes(v) for v in await p.hmget_aslist(k, fs)]

        return await self._run(_what("HMGET", key), op)

    async def hset_many(self, key: str, mapping: Mapping[str, bytes]) -> None:
        k = _key(key)
        pairs = {_key(f): _value(v) for f, v in mapping.items()}
        if not pairs:
            return

        async def op(p: Any) -> None:
            await p.hmset(k, pairs)

        await self._run(_what("HSET", key), op)

    async def hgetall(self, key: str) -> dict[str, bytes]:
        k = _key(key)

        async def op(p: Any) -> dict[str, bytes]:
            reply = await p.hgetall_asdict(k)
            return {_field_name(f): _as_bytes(v) for f, v in reply.items()}

        return await self._run(_what("HGETALL", key), op)

    async def hdel(self, key: str, *fields: str) -> int:
        k, fs = _key(key), [_key(f) for f in fields]
        if not fs:
            return 0

        async def op(p: Any) -> int:
            return _int(await p.hdel(k, fs))

        return await self._run(_what("HDEL", key), op)

    async def ping(self) -> None:
        async def op(p: Any) -> None:
            await p.ping()

        await self._run("PING", op)

    # -- lifecycle -------------------------------------------------------------------------

    async def aclose(self) -> None:
        await self._closer.close()

    async def _close(self) -> None:
        for slot in self._slots:
            self._drop(slot)
        if self._readers:
            await asyncio.wait(list(self._readers), timeout=1.0)

    async def start(self) -> None:
        """Connect: one PING round trip, so a missing Redis fails here, fast."""
        await self.ping()
