"""The :class:`~pipeline.io.kv.protocol.KeyValue` backend over ``asyncio_redis`` 0.16, guarded.

The only module that imports ``asyncio_redis``; :func:`pipeline.io.kv.open_kv` imports it only
when ``KVPIPE_REDIS_BACKEND=asyncio-redis`` is chosen. Every call runs under a timeout; only
database 0, no TLS and no ACL user (refused at start); the adapter makes its own connections,
sends AUTH itself and waits for it, and checks each new connection with a PING before the first
real command. Its errors are translated here into :mod:`pipeline.errors`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import asyncio_redis
from asyncio_redis.encoders import BytesEncoder
from asyncio_redis.protocol import _NoTransaction as _NO_TRANSACTION

from pipeline.config import RedisSettings
from pipeline.errors import ConfigError
from pipeline.io.kv.protocol import (
    _SET_IF_GREATER,
    T,
    _as_bytes,
    _closed_error,
    _Closer,
    _expire_ms,
    _field_name,
    _from_error_reply,
    _int,
    _key,
    _number,
    _one_line,
    _opt_bytes,
    _ttl_ms,
    _unavailable,
    _value,
    _what,
)
from pipeline.io.kv.protocol import _reason as _plain_reason
from pipeline.redact import redact_url, url_secrets
from pipeline.resource import AsyncResource

__all__ = ["AsyncioRedisEndpoint", "AsyncioRedisKV", "asyncio_redis_endpoint"]

#: AUTH replies from a server that has no password set (single-argument AUTH only).
_NO_PASSWORD_SET = ("without any password configured", "no password is set")
#: What to do instead when this backend cannot serve a URL.
_OTHER_BACKEND = "set KVPIPE_REDIS_BACKEND=redis-py"


def _reason(exc: BaseException, secrets: Sequence[str]) -> str:
    """A foreign exception as one short line, with ``secrets`` masked; a lost connection says so."""
    if isinstance(exc, asyncio_redis.ConnectionLostError):
        return _one_line("connection lost", secrets)
    return _plain_reason(exc, secrets)


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
    if settings.url.partition("://")[0].lower().endswith("+cluster"):
        raise ConfigError(
            f"Redis URL {url!r} names a Redis Cluster, which the asyncio-redis backend "
            f"cannot talk to; {_OTHER_BACKEND}"
        )
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
    cluster = False  # a cluster URL is refused when the endpoint is parsed

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
