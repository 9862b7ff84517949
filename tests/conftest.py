"""Shared fixtures: real Redis and Tansu processes for the integration tests.

Nothing starts unless a test asks for one of these fixtures, so tests/unit stays process-free.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import pytest_asyncio

from pipeline.config import Settings, with_values
from pipeline.dev.local import KafkaBroker, RedisServer

RedisFactory = Callable[..., Awaitable[RedisServer]]
BrokerFactory = Callable[..., Awaitable[KafkaBroker]]


@pytest_asyncio.fixture(loop_scope="session", scope="session")
async def redis_server() -> AsyncIterator[RedisServer]:
    """One Redis for the whole session; don't pause or kill it (use redis_factory for that)."""
    async with RedisServer() as server:
        yield server


@pytest_asyncio.fixture(loop_scope="session", scope="session")
async def kafka_broker() -> AsyncIterator[KafkaBroker]:
    """One Tansu broker for the whole session; use fresh topic names in each test."""
    async with KafkaBroker() as broker:
        yield broker


@pytest.fixture
def local_settings(redis_server: RedisServer, kafka_broker: KafkaBroker) -> Settings:
    """Default settings pointing at the session Redis and broker."""
    return with_values(
        Settings(), {"redis.url": redis_server.url, "kafka.bootstrap": kafka_broker.bootstrap}
    )


async def _stop_all(servers: list[RedisServer] | list[KafkaBroker]) -> None:
    try:
        await asyncio.gather(*(s.stop(timeout=2.0) for s in servers), return_exceptions=True)
    finally:
        for server in servers:
            server.kill()  # idempotent; covers a cancelled or failed stop


@pytest_asyncio.fixture
async def redis_factory() -> AsyncIterator[RedisFactory]:
    """``await make(**RedisServer kwargs)`` starts an extra Redis; all stop at teardown."""
    servers: list[RedisServer] = []

    async def make(**kwargs: Any) -> RedisServer:
        server = RedisServer(**kwargs)
        servers.append(server)
        await server.start()
        return server

    try:
        yield make
    finally:
        await _stop_all(servers)


@pytest_asyncio.fixture
async def broker_factory() -> AsyncIterator[BrokerFactory]:
    """``await make(**KafkaBroker kwargs)`` starts an extra broker; all stop at teardown."""
    brokers: list[KafkaBroker] = []

    async def make(**kwargs: Any) -> KafkaBroker:
        broker = KafkaBroker(**kwargs)
        brokers.append(broker)
        await broker.start()
        return broker

    try:
        yield make
    finally:
        await _stop_all(brokers)
