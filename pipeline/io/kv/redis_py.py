"""The :class:`~pipeline.io.kv.protocol.KeyValue` backend over ``redis.asyncio`` (the default).

TLS, ACL users and timeouts come from redis-py; this module is the only one that imports
``redis``, and every redis-py or socket error is translated here into :mod:`pipeline.errors`.
One attempt per call (the cache decides about retries); a connection the server closed is
reopened on the next call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from pipeline.config import RedisSettings
from pipeline.errors import ConfigError, KvpipeError
from pipeline.io.kv.protocol import (
    _SET_IF_GREATER,
    T,
    _as_bytes,
    _closed_error,
    _Closer,
    _credentials_refused,
    _expire_ms,
    _field_name,
    _from_error_reply,
    _int,
    _key,
    _number,
    _opt_bytes,
    _out_of_memory,
    _reason,
    _ttl_ms,
    _unavailable,
    _value,
    _what,
    _without_echo,
)
from pipeline.redact import redact_url, url_secrets
from pipeline.resource import AsyncResource

__all__ = ["RedisPyKV"]

#: redis-py PINGs a pooled connection before use when it has been idle this long.
HEALTH_CHECK_INTERVAL_S = 30.0


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
        | redis_errors.RedisClusterUnreachableError
        | redis_errors.SlotNotCoveredError
        | redis_errors.ClusterError  # a redirect loop while slots move
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
        self._client = self._make_client(settings)
        # Backstop over redis-py's own timeouts: pool wait + connect + reply, plus slack.
        self._backstop_s = self._backstop(settings)
        self._closer = _Closer(self._close)

    def _backstop(self, settings: RedisSettings) -> float:
        return 2 * settings.timeout_s + settings.connect_timeout_s + 1.0

    def _make_client(self, settings: RedisSettings) -> Any:
        """The redis-py client these calls go through (a cluster adapter makes its own)."""
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
        return aioredis.Redis(connection_pool=self._pool)

    def __repr__(self) -> str:
        return f"RedisPyKV({self._url!r})"

    async def _run(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        """Run one call under the backstop timeout and translate whatever it raises."""
        if self._closer.started:
            raise _closed_error(self._url)
        try:
            async with asyncio.timeout(self._backstop_s):
                return await op()
        except (
            redis_errors.RedisError,
            redis_errors.RedisClusterException,
            OSError,
            TimeoutError,
        ) as exc:
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

    @property
    def cluster(self) -> bool:
        """A single Redis: every key in one place."""
        return False

    async def start(self) -> None:
        """Connect: one PING round trip, so a missing Redis fails here, fast."""
        await self.ping()
