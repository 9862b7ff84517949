"""The key-value adapter: one small async protocol over Redis, with two client backends.

Everything above this package talks to Redis through :class:`KeyValue` and only ever sees
:mod:`pipeline.errors` exceptions. :func:`open_kv` imports the backend named by
``RedisSettings.backend`` when it is called, so importing this package loads no Redis client:

- :mod:`pipeline.io.kv.redis_py` over ``redis.asyncio`` (the default): TLS, ACL users, timeouts.
- :mod:`pipeline.io.kv.redis_cluster` over ``redis.asyncio.cluster`` for a
  ``redis+cluster://`` URL (redis-py only).
- :mod:`pipeline.io.kv.asyncio_redis` over ``asyncio_redis`` 0.16, guarded rather than trusted.
- :mod:`pipeline.io.kv.memory`: in memory with Redis's semantics, for tests (yours too).

Both Redis backends make one attempt per call (the cache decides about retries) and reconnect
by themselves on the next call after Redis comes back.
"""

from __future__ import annotations

from pipeline.config import RedisSettings
from pipeline.errors import ConfigError
from pipeline.io.kv.protocol import KeyValue

__all__ = ["KeyValue", "open_kv"]


def open_kv(settings: RedisSettings) -> KeyValue:
    """The adapter named by ``settings.backend``, not yet connected (use ``async with``)."""
    cluster = settings.url.partition("://")[0].lower().endswith("+cluster")
    if cluster and settings.backend == "redis-py":  # asyncio-redis refuses it with one line
        from pipeline.io.kv.redis_cluster import RedisClusterKV

        return RedisClusterKV(settings)
    if settings.backend == "asyncio-redis":
        from pipeline.io.kv.asyncio_redis import AsyncioRedisKV

        return AsyncioRedisKV(settings)
    if settings.backend == "redis-py":
        from pipeline.io.kv.redis_py import RedisPyKV

        return RedisPyKV(settings)
    raise ConfigError(
        f"unknown Redis backend {settings.backend!r}; set KVPIPE_REDIS_BACKEND to redis-py "
        "or asyncio-redis"
    )
