"""The key-value adapter without a Redis server: URL rules, redaction, argument checks, the fake."""

from __future__ import annotations

import asyncio
import inspect
import socket

import asyncio_redis
import pytest
import redis.asyncio as aioredis
from redis import exceptions as redis_errors

from pipeline.config import RedisSettings
from pipeline.errors import ConfigError, KvpipeError, StoreOutOfMemory, StoreUnavailable
from pipeline.io.kv import KeyValue, open_kv
from pipeline.io.kv.asyncio_redis import AsyncioRedisKV, asyncio_redis_endpoint
from pipeline.io.kv.asyncio_redis import _reason as aio_reason
from pipeline.io.kv.memory import MemoryKV
from pipeline.io.kv.protocol import _from_error_reply, _reason
from pipeline.io.kv.redis_py import RedisPyKV, _from_redis_py
from pipeline.redact import redact_url, url_secrets

SECRET = "s3cret-Pa55"
OTHER_BACKEND = "KVPIPE_REDIS_BACKEND=redis-py"

#: Every member of the KeyValue protocol, checked against the class itself below.
PROTOCOL_METHODS = (
    "get",
    "mget",
    "set",
    "set_many",
    "incr",
    "set_if_greater",
    "delete",
    "expire",
    "persist",
    "exists",
    "hget",
    "hmget",
    "hset_many",
    "hgetall",
    "hdel",
    "ping",
    "aclose",
    "__aenter__",
    "__aexit__",
)


def free_port() -> int:
    """A local TCP port nobody listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def settings(url: str, backend: str = "asyncio-redis") -> RedisSettings:
    return RedisSettings(url=url, backend=backend, timeout_s=1.0, connect_timeout_s=1.0)  # type: ignore[arg-type]


# -- asyncio-redis URL rules -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (f"rediss://:{SECRET}@redis.example:6380/0", "TLS"),
        (f"redis://alice:{SECRET}@redis.example:6379/0", "ACL user"),
        ("redis://alice@redis.example:6379/0", "ACL user"),
        (f"redis://:{SECRET}@redis.example:6379/1", "database 1"),
        ("redis://redis.example:6379/15", "database 15"),
        ("redis://redis.example:6379?db=2", "database 2"),
        ("unix:///run/redis.sock?db=3", "database 3"),
        (f"redis://:{SECRET}@redis.example:6379/0?ssl_cert_reqs=none", "options"),
    ],
)
def test_asyncio_redis_refuses_what_it_cannot_do(url: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        AsyncioRedisKV(settings(url))
    message = str(caught.value)
    assert expected in message
    assert OTHER_BACKEND in message
    assert "\n" not in message
    assert SECRET not in message
    assert "alice@" not in message  # a lone user part may be a misplaced password


@pytest.mark.parametrize(
    "url",
    [
        "http://redis.example:6379/0",
        "redis://redis.example:6379/zero",
        "redis://redis.example:notaport/0",
    ],
)
def test_asyncio_redis_refuses_malformed_urls(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        open_kv(settings(url))
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("url", "host", "port", "password"),
    [
        ("redis://redis.example:6390", "redis.example", 6390, None),
        ("redis://redis.example:6390/", "redis.example", 6390, None),
        ("redis://redis.example/0", "redis.example", 6379, None),
        ("redis://redis.example:6390?db=0", "redis.example", 6390, None),
        ("redis://:p%40ss%3Aword@[::1]:6390/0", "::1", 6390, "p@ss:word"),
        ("unix:///run/redis/redis.sock", "/run/redis/redis.sock", 0, None),
        (f"unix://:{SECRET}@/run/redis.sock?db=0", "/run/redis.sock", 0, SECRET),
    ],
)
def test_asyncio_redis_accepts_database_zero(
    url: str, host: str, port: int, password: str | None
) -> None:
    endpoint = asyncio_redis_endpoint(settings(url))
    assert (endpoint.host, endpoint.port, endpoint.password) == (host, port, password)


def test_open_kv_picks_the_backend_without_connecting() -> None:
    url = f"redis://:{SECRET}@127.0.0.1:{free_port()}/0"
    chosen = open_kv(settings(url, "redis-py"))
    assert isinstance(chosen, RedisPyKV)
    assert chosen.backend == "redis-py"
    chosen = open_kv(settings(url, "asyncio-redis"))
    assert isinstance(chosen, AsyncioRedisKV)
    assert chosen.backend == "asyncio-redis"
    assert SECRET not in repr(chosen)


def test_redis_py_refuses_a_malformed_url_with_config_error() -> None:
    with pytest.raises(ConfigError) as caught:
        RedisPyKV(settings(f"http://:{SECRET}@redis.example:6379/0", "redis-py"))
    assert SECRET not in str(caught.value)
    assert "\n" not in str(caught.value)


# -- redaction and translation -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (f"redis://:{SECRET}@h:1/0", "redis://:***@h:1/0"),
        (f"redis://bob:{SECRET}@h:1/0", "redis://bob:***@h:1/0"),
        (f"redis://{SECRET}@h:1/0", "redis://***@h:1/0"),
        ("redis://h:1/0", "redis://h:1/0"),
    ],
)
def test_redact_url_hides_passwords(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_foreign_error_text_is_one_short_line_without_secrets() -> None:
    secrets = url_secrets("redis://:p%40ss-word@h:1/0")
    assert set(secrets) == {"p%40ss-word", "p@ss-word"}
    text = _reason(OSError("refused\nfor p@ss-word and p%40ss-word " + "x" * 500), secrets)
    assert "p@ss" not in text
    assert "p%40ss" not in text
    assert "\n" not in text
    assert len(text) <= 200
    assert url_secrets("redis://lonely@h:1/0") == ("lonely",)
    assert url_secrets("redis://h:1/0") == ()


def test_asyncio_redis_names_a_lost_connection_and_masks_secrets() -> None:
    assert aio_reason(asyncio_redis.ConnectionLostError(None), ()) == "connection lost"
    assert aio_reason(OSError(f"AUTH {SECRET} refused"), (SECRET,)) == "AUTH *** refused"
    assert aio_reason(TimeoutError(), ()) == "timed out"


@pytest.mark.parametrize("backend", ["redis-py", "asyncio-redis"])
async def test_unreachable_store_error_names_redacted_url_only(backend: str) -> None:
    url = f"redis://:{SECRET}@127.0.0.1:{free_port()}/0"
    kv = open_kv(settings(url, backend))
    with pytest.raises(StoreUnavailable) as caught:
        await kv.get("some:key")
    await kv.aclose()
    message = str(caught.value)
    assert caught.value.retryable
    assert SECRET not in message
    assert f"redis://:***@127.0.0.1:{url.rsplit(':', 1)[1]}" in message
    assert "GET some:key" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("reply", "kind", "retryable"),
    [
        ("WRONGPASS invalid username-password pair or user is disabled.", ConfigError, False),
        ("NOAUTH Authentication required.", ConfigError, False),
        ("ERR invalid password", ConfigError, False),
        ("NOPERM this user has no permissions to run the 'get' command", ConfigError, False),
        ("LOADING Redis is loading the dataset in memory", StoreUnavailable, True),
        ("BUSY Redis is busy running a script.", StoreUnavailable, True),
        ("OOM command not allowed when used memory > 'maxmemory'.", StoreOutOfMemory, False),
        ("READONLY You can't write against a read only replica.", StoreUnavailable, True),
        ("ERR max number of clients reached", StoreUnavailable, True),
        ("WRONGTYPE Operation against a key holding the wrong kind of value", KvpipeError, False),
        ("ERR value is not an integer or out of range", KvpipeError, False),
    ],
)
def test_error_replies_are_classified(reply: str, kind: type[KvpipeError], retryable: bool) -> None:
    error = _from_error_reply(reply, "redis://:***@h:1/0", "GET k")
    assert type(error) is kind
    assert error.retryable is retryable
    assert "\n" not in str(error)
    if kind is KvpipeError:
        assert error.code == "store_error"


@pytest.mark.parametrize(
    ("reply", "kind"),
    [
        ("OOM command not allowed when used memory > 'maxmemory'.", StoreOutOfMemory),
        ("WRONGTYPE Operation against a key holding the wrong kind of value", KvpipeError),
        ("READONLY You can't write against a read only replica.", StoreUnavailable),
    ],
)
def test_pipeline_errors_never_quote_the_command(reply: str, kind: type[KvpipeError]) -> None:
    """redis-py's pipelines quote the failed command, values included (raw tensor bytes)."""
    tensor = b"\x93NUMPY\x01\x00v\x00{'descr': '<f4'" + bytes(range(256))
    classes = {"OOM": redis_errors.OutOfMemoryError, "READONLY": redis_errors.ReadOnlyError}
    exc = classes.get(reply.split()[0], redis_errors.ResponseError)(reply)  # as parsed
    pipe = aioredis.Redis().pipeline()  # never connects: only its error annotation is used
    pipe.annotate_exception(exc, 1, ("SET", b"kvpipe:m:v1:t:w0", tensor, "PX", 1))
    assert "NUMPY" in str(exc)  # the echo this test is about
    error = _from_redis_py(exc, "redis://h:1/0", "SET of 5 keys", ())
    assert type(error) is kind
    assert "NUMPY" not in str(error) and "descr" not in str(error) and "w0" not in str(error)
    assert reply.split()[0] in str(error) or kind is StoreOutOfMemory
    if kind is StoreOutOfMemory:
        assert "out of memory" in str(error) and "maxmemory" in str(error)
        assert error.code == "store_out_of_memory" and not error.retryable


# -- arguments are checked before any I/O (so no server is needed) ----------------------------


def all_kinds() -> list[KeyValue]:
    url = f"redis://127.0.0.1:{free_port()}/0"
    return [MemoryKV(), open_kv(settings(url, "redis-py")), open_kv(settings(url))]


@pytest.mark.parametrize("bad_ex", [0, -1.5, float("nan"), float("inf")])
async def test_every_kind_refuses_a_bad_expiry(bad_ex: float) -> None:
    for kv in all_kinds():
        with pytest.raises(ValueError, match="ex must be"):
            await kv.set("k", b"v", ex=bad_ex)
        with pytest.raises(ValueError, match="ex must be"):
            await kv.set_many({"k": b"v"}, ex=bad_ex)
        await kv.aclose()


async def test_every_kind_refuses_wrong_types() -> None:
    for kv in all_kinds():
        with pytest.raises(TypeError):
            await kv.set("k", "text")  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            await kv.get(b"k")  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            await kv.hset_many("h", {"f": 1})  # type: ignore[dict-item]
        with pytest.raises(ValueError):
            await kv.expire("k", float("nan"))
        await kv.aclose()


async def test_empty_requests_need_no_round_trip() -> None:
    for kv in all_kinds()[1:]:  # adapters pointing at a port nobody listens on
        assert await kv.mget([]) == []
        assert await kv.hmget("h", []) == []
        assert await kv.delete() == 0
        assert await kv.hdel("h") == 0
        await kv.set_many({})
        await kv.hset_many("h", {})
        await kv.aclose()


# -- closing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["redis-py", "asyncio-redis"])
async def test_aclose_is_idempotent_and_survives_cancellation(backend: str) -> None:
    kv = open_kv(settings(f"redis://127.0.0.1:{free_port()}/0", backend))
    closing = asyncio.ensure_future(kv.aclose())
    await asyncio.sleep(0)
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    await kv.aclose()
    await kv.aclose()
    with pytest.raises(KvpipeError, match="closed") as caught:
        await kv.get("k")
    assert not isinstance(caught.value, StoreUnavailable)  # retrying cannot help


# -- the protocol and the fake agree -----------------------------------------------------------


def test_protocol_lists_the_methods_checked_here() -> None:
    declared = {
        name
        for name, member in vars(KeyValue).items()
        if (inspect.isfunction(member) and (not name.startswith("_") or name in PROTOCOL_METHODS))
    }
    assert declared == set(PROTOCOL_METHODS)
    assert isinstance(vars(KeyValue)["backend"], property)


@pytest.mark.parametrize("implementation", [MemoryKV, RedisPyKV, AsyncioRedisKV])
def test_implementations_match_the_protocol_signatures(
    implementation: type[MemoryKV | RedisPyKV | AsyncioRedisKV],
) -> None:
    for name in PROTOCOL_METHODS:
        expected = inspect.signature(getattr(KeyValue, name))
        actual = inspect.signature(getattr(implementation, name))
        assert inspect.iscoroutinefunction(getattr(implementation, name)), name
        assert [(p.name, p.kind, p.default) for p in actual.parameters.values()] == [
            (p.name, p.kind, p.default) for p in expected.parameters.values()
        ], name
    assert isinstance(implementation.backend, str)


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_memory_kv_does_everything_the_protocol_says() -> None:
    clock = FakeClock()
    kv: KeyValue = MemoryKV(clock=clock)
    async with kv:
        await kv.set("a", b"\x00\xff", ex=1.5)
        assert await kv.get("a") == b"\x00\xff"
        assert await kv.mget(["a", "missing"]) == [b"\x00\xff", None]
        await kv.set_many({"b": b"1", "c": b"2"})
        assert await kv.incr("n") == 1
        assert await kv.incr("n") == 2
        assert await kv.exists("b")
        assert await kv.delete("b", "missing") == 1
        assert not await kv.exists("b")
        assert await kv.expire("c", 10)
        assert not await kv.expire("missing", 10)
        await kv.hset_many("h", {"x": b"1", "y": b"2"})
        assert await kv.hget("h", "x") == b"1"
        assert await kv.hget("h", "zz") is None
        assert await kv.hmget("h", ["y", "zz"]) == [b"2", None]
        assert await kv.hgetall("h") == {"x": b"1", "y": b"2"}
        assert await kv.hdel("h", "x", "zz") == 1
        assert await kv.hgetall("missing") == {}
        await kv.ping()

        clock.now += 1.6
        assert await kv.get("a") is None
        assert await kv.get("c") == b"2"
        clock.now += 10
        assert not await kv.exists("c")
        assert await kv.expire("h", 0)  # zero or less removes the key now
        assert not await kv.exists("h")


async def test_memory_kv_mirrors_redis_semantics() -> None:
    clock = FakeClock()
    kv = MemoryKV(clock=clock)
    await kv.set("s", b"v", ex=5)
    await kv.set("s", b"w")  # SET without ex clears the expiry
    assert kv.ttl("s") is None
    await kv.set("n", b"41", ex=5)
    assert await kv.incr("n") == 42  # INCR keeps it
    assert kv.ttl("n") == pytest.approx(5)
    await kv.hset_many("h", {"f": b"1"})
    for call in (kv.get("h"), kv.hget("s", "f"), kv.hgetall("s"), kv.incr("h")):
        with pytest.raises(KvpipeError) as caught:
            await call
        assert caught.value.code == "store_error"
    assert await kv.mget(["h", "s"]) == [None, b"w"]  # MGET: nil for a hash
    assert await kv.hdel("h", "f", "f") == 1
    assert not await kv.exists("h")  # a hash without fields is gone
    assert kv.keys() == ["n", "s"]


async def test_memory_kv_counts_fails_and_closes() -> None:
    kv = MemoryKV()
    await kv.get("a")
    await kv.get("b")
    await kv.mget(["a", "b"])
    assert kv.calls["get"] == 2
    assert kv.calls["mget"] == 1
    kv.fail = StoreUnavailable("Redis at redis://h:1/0 unavailable: test")
    with pytest.raises(StoreUnavailable):
        await kv.hgetall("h")
    assert kv.calls["hgetall"] == 1
    kv.fail = None
    await kv.aclose()
    await kv.aclose()
    with pytest.raises(KvpipeError, match="closed"):
        await kv.ping()
