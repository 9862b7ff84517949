"""The key-value adapter against a real redis-server, for both client backends.

Behaviour tests also run against :class:`MemoryKV`, so the shipped in-memory backend is held to
what Redis really does. Connection tests cover a missing, frozen, restarted and
password-protected Redis.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import pytest
import pytest_asyncio

from pipeline.config import RedisBackend, RedisSettings
from pipeline.dev.local import RedisServer, free_port
from pipeline.errors import ConfigError, KvpipeError, StoreUnavailable
from pipeline.io.kv import KeyValue, open_kv
from pipeline.io.kv.memory import MemoryKV

pytestmark = pytest.mark.integration

T = TypeVar("T")
RedisFactory = Callable[..., Awaitable[RedisServer]]

BACKENDS: list[RedisBackend] = ["redis-py", "asyncio-redis"]
ALL_BYTES = bytes(range(256))
TIMEOUT_S = 1.0


def settings(url: str, backend: RedisBackend, **changes: Any) -> RedisSettings:
    values: dict[str, Any] = {"timeout_s": TIMEOUT_S, "connect_timeout_s": TIMEOUT_S}
    values.update(changes)
    return RedisSettings(url=url, backend=backend, **values)


def with_db(url: str, db: int) -> str:
    return url.rsplit("/", 1)[0] + f"/{db}"


async def eventually(call: Callable[[], Awaitable[T]]) -> T:
    """The next-but-one rule: after an outage the first call may fail, the second must not."""
    try:
        return await call()
    except StoreUnavailable:
        return await call()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> RedisBackend:
    value: RedisBackend = request.param
    return value


@pytest.fixture(params=["memory", *BACKENDS, "redis-cluster"])
def kv_target(request: pytest.FixtureRequest, redis_server: RedisServer) -> tuple[str, str]:
    """(backend, URL): the in-memory fake, either backend on the session Redis, or redis-py on
    the session's Redis Cluster."""
    if request.param == "redis-cluster":
        return "redis-py", request.getfixturevalue("redis_cluster").url
    return request.param, redis_server.url


@pytest_asyncio.fixture
async def kv(kv_target: tuple[str, str]) -> AsyncIterator[KeyValue]:
    """An entered adapter on the session Redis (or the in-memory fake, held to the same tests)."""
    backend, url = kv_target
    store: KeyValue = (
        MemoryKV() if backend == "memory" else open_kv(settings(url, backend))  # type: ignore[arg-type]
    )
    async with store:
        yield store


@pytest.fixture
def key() -> Callable[[str], str]:
    """Unique key names, so tests sharing the session Redis never meet; one hash tag, so a
    test's keys share a slot on the cluster too (set_if_greater needs that there)."""
    prefix = f"kvtest:{{{uuid.uuid4().hex[:12]}}}:"
    return lambda name: prefix + name


# -- behaviour, per method ---------------------------------------------------------------------


async def test_strings(kv: KeyValue, key: Callable[[str], str]) -> None:
    a, b, c = key("a"), key("b"), key("c")
    assert await kv.get(a) is None
    await kv.set(a, b"one")
    await kv.set(a, b"two")
    assert await kv.get(a) == b"two"
    await kv.set_many({b: b"B", c: b""})
    assert await kv.mget([c, key("missing"), a, b]) == [b"", None, b"two", b"B"]
    assert await kv.exists(c)
    assert not await kv.exists(key("missing"))
    assert await kv.delete(a, a, key("missing")) == 1
    assert await kv.delete(b, c) == 2
    assert await kv.mget([a, b, c]) == [None, None, None]


async def test_expiry(kv: KeyValue, key: Callable[[str], str]) -> None:
    short, many, later, kept, gone = (key(n) for n in ("short", "many", "later", "kept", "gone"))
    await kv.set(short, b"x", ex=0.3)
    await kv.set_many({many: b"y"}, ex=0.3)
    await kv.set(later, b"z")
    assert await kv.expire(later, 0.3)
    await kv.set(kept, b"k", ex=0.3)
    await kv.set(kept, b"k2")  # SET without ex drops the expiry
    assert not await kv.expire(key("missing"), 5)
    await kv.set(gone, b"g")
    assert await kv.expire(gone, 0)  # zero or less removes the key now
    assert not await kv.exists(gone)
    assert await kv.mget([short, many, later]) == [b"x", b"y", b"z"]
    await asyncio.sleep(0.6)
    assert await kv.mget([short, many, later, kept]) == [None, None, None, b"k2"]
    await kv.delete(kept)


async def test_incr(kv: KeyValue, key: Callable[[str], str]) -> None:
    n, m, text = key("n"), key("m"), key("text")
    assert await kv.incr(n) == 1
    assert await kv.incr(n) == 2
    assert await kv.get(n) == b"2"
    await kv.set(m, b"41")
    assert await kv.incr(m) == 42
    await kv.set(text, b"not a number")
    with pytest.raises(KvpipeError) as caught:
        await kv.incr(text)
    assert caught.value.code == "store_error"
    assert not caught.value.retryable
    await kv.delete(n, m, text)


async def test_set_if_greater(kv: KeyValue, key: Callable[[str], str]) -> None:
    ptr, moved, refused, h = key("ptr"), key("moved"), key("refused"), key("h")
    assert await kv.set_if_greater(ptr, 5)  # absent counts as lower
    assert await kv.get(ptr) == b"5"
    assert not await kv.set_if_greater(ptr, 5)
    assert not await kv.set_if_greater(ptr, 4)
    assert await kv.get(ptr) == b"5"
    await kv.set_many({moved: b"m", refused: b"r"}, ex=0.3)
    assert not await kv.set_if_greater(ptr, 3, persist=[refused])  # refused: nothing persisted
    assert await kv.set_if_greater(ptr, 12, persist=[moved, key("absent")])
    assert await kv.get(ptr) == b"12"  # compared as numbers, not as strings
    await asyncio.sleep(0.5)
    assert await kv.mget([moved, refused]) == [b"m", None]
    await kv.set(ptr, b"garbage")
    assert await kv.set_if_greater(ptr, 1)  # unreadable counts as lower
    await kv.hset_many(h, {"f": b"v"})
    with pytest.raises(KvpipeError) as caught:
        await kv.set_if_greater(h, 1)
    assert caught.value.code == "store_error"
    await kv.delete(ptr, moved, h)


async def test_hashes(kv: KeyValue, key: Callable[[str], str]) -> None:
    h = key("h")
    assert await kv.hgetall(h) == {}
    assert await kv.hget(h, "x") is None
    await kv.hset_many(h, {"x": b"1", "y": b"2", "ünï": b"3"})
    await kv.hset_many(h, {"y": b"22"})
    assert await kv.hget(h, "y") == b"22"
    assert await kv.hmget(h, ["ünï", "missing", "x"]) == [b"3", None, b"1"]
    assert await kv.hgetall(h) == {"x": b"1", "y": b"22", "ünï": b"3"}
    assert await kv.hdel(h, "x", "missing") == 1
    assert await kv.hdel(h, "y", "ünï") == 2
    assert not await kv.exists(h)  # the last field took the hash with it
    assert await kv.hdel(h, "x") == 0


async def test_wrong_type_is_a_plain_error_and_the_adapter_goes_on(
    kv: KeyValue, key: Callable[[str], str]
) -> None:
    s, h = key("s"), key("h")
    await kv.set(s, b"v")
    await kv.hset_many(h, {"f": b"1"})
    for call in (lambda: kv.get(h), lambda: kv.hget(s, "f"), lambda: kv.hgetall(s)):
        with pytest.raises(KvpipeError) as caught:
            await call()
        assert type(caught.value) is KvpipeError
        assert caught.value.code == "store_error"
    assert await kv.mget([h, s]) == [None, b"v"]  # MGET answers nil for a hash
    await kv.ping()
    await kv.delete(s, h)


async def test_binary_values_round_trip_exactly(kv: KeyValue, key: Callable[[str], str]) -> None:
    big = os.urandom(1 << 20)
    a, b, h = key("all-bytes"), key("ключ:模型"), key("h")
    await kv.set(a, ALL_BYTES)
    await kv.set_many({b: ALL_BYTES[::-1], key("big"): big})
    await kv.hset_many(h, {"all": ALL_BYTES, "big": big, "empty": b""})
    assert await kv.get(a) == ALL_BYTES
    assert await kv.mget([b, key("big")]) == [ALL_BYTES[::-1], big]
    assert await kv.hget(h, "all") == ALL_BYTES
    assert await kv.hmget(h, ["empty", "big"]) == [b"", big]
    assert await kv.hgetall(h) == {"all": ALL_BYTES, "big": big, "empty": b""}
    await kv.delete(a, b, key("big"), h)


async def test_many_concurrent_calls_share_a_small_pool(
    redis_server: RedisServer, backend: RedisBackend, key: Callable[[str], str]
) -> None:
    async with open_kv(settings(redis_server.url, backend, pool_size=2)) as kv:
        await asyncio.gather(*(kv.set(key(str(i)), str(i).encode()) for i in range(100)))
        values = await asyncio.gather(*(kv.get(key(str(i))) for i in range(100)))
        assert values == [str(i).encode() for i in range(100)]
        assert await kv.delete(*(key(str(i)) for i in range(100))) == 100


# -- connections: missing, frozen, restarted ---------------------------------------------------


async def test_missing_redis_fails_fast(backend: RedisBackend) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        async with open_kv(settings(url, backend, timeout_s=2.0, connect_timeout_s=2.0)):
            pass
    kv = open_kv(settings(url, backend, timeout_s=2.0, connect_timeout_s=2.0))
    with pytest.raises(StoreUnavailable) as caught:
        await kv.get("k")  # without async with: the call connects, and fails the same way
    await kv.aclose()
    assert time.monotonic() - started < 3.0
    assert url in str(caught.value)


async def test_frozen_redis_times_out_then_recovers(
    redis_factory: RedisFactory, backend: RedisBackend
) -> None:
    server = await redis_factory()
    async with open_kv(settings(server.url, backend)) as kv:
        await kv.set("k", b"v")
        server.pause()
        try:
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await kv.get("k")
            assert time.monotonic() - started < 2 * TIMEOUT_S + 1.5
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):  # a new adapter cannot connect either
                async with open_kv(settings(server.url, backend)):
                    pass
            assert time.monotonic() - started < 2 * TIMEOUT_S + 1.5
        finally:
            server.resume()
        assert await eventually(lambda: kv.get("k")) == b"v"


async def test_reconnects_by_itself_after_a_restart(
    redis_factory: RedisFactory, backend: RedisBackend
) -> None:
    server = await redis_factory()
    async with open_kv(settings(server.url, backend)) as kv:
        await kv.set("before", b"1")
        await server.restart()  # no persistence: the data is gone, the port is the same
        assert await eventually(lambda: kv.get("before")) is None
        await kv.set("after", b"2")
        assert await kv.get("after") == b"2"


async def test_a_crash_fails_calls_and_a_new_start_serves_them(
    redis_factory: RedisFactory, backend: RedisBackend
) -> None:
    server = await redis_factory()
    async with open_kv(settings(server.url, backend)) as kv:
        await kv.ping()
        server.kill()
        started = time.monotonic()
        for _ in range(3):
            with pytest.raises(StoreUnavailable):
                await kv.set("k", b"v")
        assert time.monotonic() - started < 3.0
        await server.start()
        await eventually(lambda: kv.set("k", b"v"))
        assert await kv.get("k") == b"v"


async def test_a_cancelled_call_leaves_the_adapter_usable(
    redis_server: RedisServer, backend: RedisBackend, key: Callable[[str], str]
) -> None:
    # asyncio-redis 0.16 hangs a connection for good when an error reply arrives for a
    # cancelled command; the adapter must throw such a connection away.
    h = key("h")
    async with open_kv(settings(redis_server.url, backend, pool_size=1)) as kv:
        await kv.hset_many(h, {"f": b"1"})
        for turns in range(4):
            call = asyncio.ensure_future(kv.get(h))  # WRONGTYPE, if it gets to run
            for _ in range(turns):
                await asyncio.sleep(0)
            call.cancel()
            with pytest.raises((asyncio.CancelledError, KvpipeError)):
                await call
            await asyncio.sleep(0.05)  # let a late reply arrive
            assert await kv.hget(h, "f") == b"1"
        await kv.delete(h)


async def test_aclose_after_use_is_idempotent(
    redis_server: RedisServer, backend: RedisBackend
) -> None:
    kv = open_kv(settings(redis_server.url, backend))
    await kv.__aenter__()
    await asyncio.gather(*(kv.ping() for _ in range(5)))
    closing = asyncio.ensure_future(kv.aclose())
    await asyncio.sleep(0)
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    await kv.aclose()
    await kv.aclose()
    with pytest.raises(KvpipeError, match="closed"):
        await kv.ping()


# -- credentials -------------------------------------------------------------------------------

PASSWORD = "p@ss w:rd/1"  # needs percent-encoding in a URL


async def test_password_in_the_url_works_and_a_wrong_one_is_a_config_error(
    redis_factory: RedisFactory, backend: RedisBackend
) -> None:
    server = await redis_factory(password=PASSWORD)
    async with open_kv(settings(server.url, backend)) as kv:
        await kv.set("k", b"v")
        assert await kv.get("k") == b"v"
    wrong = server.url.replace(server.url.split("@")[0], "redis://:not-the-password")
    bare = f"redis://{server.host}:{server.port}/0"
    for url in (wrong, bare):
        with pytest.raises(ConfigError) as caught:
            async with open_kv(settings(url, backend)):
                pass
        message = str(caught.value)
        assert "credentials" in message
        assert "not-the-password" not in message
        assert "\n" not in message


async def test_acl_users_need_redis_py(redis_factory: RedisFactory) -> None:
    server = await redis_factory(acl_users={"alice": "wonder land"})
    async with open_kv(settings(server.user_url("alice"), "redis-py")) as kv:
        await kv.set("k", b"v")
        assert await kv.get("k") == b"v"
    with pytest.raises(ConfigError, match="KVPIPE_REDIS_BACKEND=redis-py") as caught:
        open_kv(settings(server.user_url("alice"), "asyncio-redis"))
    assert "wonder" not in str(caught.value)


async def _fifty_writes_land_in_db0(
    kv: KeyValue, server: RedisServer, round_: str, *, concurrent: bool
) -> None:
    names = [f"race:{round_}:{i}" for i in range(50)]
    if concurrent:
        await asyncio.gather(*(kv.set(n, n.encode()) for n in names))
    else:
        for n in names:
            await kv.set(n, n.encode())
    assert await kv.mget(names) == [n.encode() for n in names]
    async with open_kv(settings(server.url, "redis-py")) as db0:
        assert await db0.mget(names) == [n.encode() for n in names]
    async with open_kv(settings(with_db(server.url, 1), "redis-py")) as db1:
        assert await db1.mget(names) == [None] * 50


@pytest.mark.parametrize("concurrent", [False, True], ids=["sequential", "concurrent"])
async def test_asyncio_redis_with_a_password_writes_land_in_db0(
    redis_factory: RedisFactory, concurrent: bool
) -> None:
    # DESIGN.md: asyncio-redis sends AUTH/SELECT from unawaited tasks, so early commands can
    # run unauthenticated or in the wrong database; the adapter must AUTH and PING first.
    server = await redis_factory(password=PASSWORD)
    kv = open_kv(settings(server.url, "asyncio-redis", pool_size=8))
    try:
        await _fifty_writes_land_in_db0(kv, server, "fresh", concurrent=concurrent)  # no enter
        await server.restart()
        await eventually(kv.ping)
        await _fifty_writes_land_in_db0(kv, server, "restarted", concurrent=concurrent)
    finally:
        await kv.aclose()
    async with open_kv(settings(server.url, "asyncio-redis")) as kv:
        await _fifty_writes_land_in_db0(kv, server, "entered", concurrent=concurrent)
