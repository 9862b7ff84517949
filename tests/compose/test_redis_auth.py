"""The compose stack's Redis, run here from the compose file's own command line: a client
without its password is refused, and the worker's URL gets in."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import pytest
import pytest_asyncio

from pipeline.config import RedisSettings
from pipeline.dev.local import HOST, find_redis_server, free_port
from pipeline.errors import ConfigError
from pipeline.io.kv import open_kv
from tests.unit.test_compose import command_args, env_of, services


@pytest_asyncio.fixture
async def compose_redis() -> AsyncIterator[int]:
    """``redis-server`` with the compose service's arguments, on a free loopback port."""
    args = command_args(services()["redis"])
    assert args[0] == "redis-server"
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="kvpipe-compose-redis-") as workdir:
        proc = await asyncio.create_subprocess_exec(
            find_redis_server(),
            *args[1:],
            "--port", str(port), "--bind", HOST, "--dir", workdir, "--daemonize", "no",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        try:
            for _ in range(100):
                with contextlib.suppress(OSError):
                    _, writer = await asyncio.open_connection(HOST, port)
                    writer.close()
                    break
                await asyncio.sleep(0.05)
            yield port
        finally:
            proc.kill()
            await proc.wait()


def worker_url(port: int) -> str:
    """The worker service's KVPIPE_REDIS, pointed at the local port instead of ``redis``."""
    url = urlsplit(env_of("worker")["KVPIPE_REDIS"])
    return urlunsplit(url._replace(netloc=f":{url.password}@{HOST}:{port}"))


async def test_compose_redis_refuses_a_client_without_its_password(compose_redis: int) -> None:
    reader, writer = await asyncio.open_connection(HOST, compose_redis)
    writer.write(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n")
    await writer.drain()
    assert (await reader.readline()).startswith(b"-NOAUTH")
    writer.close()
    for backend in ("redis-py", "asyncio-redis"):
        bare = RedisSettings(url=f"redis://{HOST}:{compose_redis}/0", backend=backend)
        with pytest.raises(ConfigError, match="credentials"):
            async with open_kv(bare):
                pass
        async with open_kv(RedisSettings(url=worker_url(compose_redis), backend=backend)) as kv:
            await kv.set("k", b"v")
            assert await kv.get("k") == b"v"
