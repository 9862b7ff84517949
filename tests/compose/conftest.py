"""Where the compose tests point: ``KVPIPE_KAFKA`` and ``KVPIPE_REDIS`` when both are set (a
running ``docker compose`` stack with its own workers), else the local services with a worker
started here, so CI runs the same scenarios without Docker."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import pytest_asyncio

from consumers.inference import start_serving
from pipeline.config import Settings, settings_from_env, with_values
from pipeline.dev.local import KafkaBroker, RedisServer


@dataclass
class Stack:
    """The target: settings that reach it, and whether it runs its own workers."""

    settings: Settings
    external: bool


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/compose" in str(item.fspath):
            item.add_marker(pytest.mark.compose)


@pytest_asyncio.fixture
async def stack(redis_server: RedisServer, kafka_broker: KafkaBroker) -> AsyncIterator[Stack]:
    """The compose stack named by the environment, or the local services plus a worker.

    (The local services start either way; with an external stack they stay idle.)
    """
    if os.environ.get("KVPIPE_KAFKA") and os.environ.get("KVPIPE_REDIS"):
        yield Stack(settings_from_env(os.environ), external=True)
        return
    redis, broker = redis_server, kafka_broker
    tag = uuid.uuid4().hex[:8]
    settings = with_values(Settings(), {
        "redis.url": redis.url, "kafka.bootstrap": broker.bootstrap,
        "kafka.topic_prefix": f"c{tag}", "kafka.group_id": f"c{tag}",
        "kafka.session_timeout_ms": 2000, "kafka.heartbeat_interval_ms": 300,
    })  # fmt: skip
    stop = asyncio.Event()
    _, task = await start_serving(settings, stop, timeout_s=30)
    try:
        yield Stack(settings, external=False)
    finally:
        stop.set()
        try:
            await asyncio.wait_for(task, 30)
        except BaseException:
            task.cancel()
