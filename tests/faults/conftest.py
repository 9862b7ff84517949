"""Fault tests: each starts its own Redis and broker, so a fault never leaks into another
test; workers run as real processes so they can be killed."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_asyncio

from pipeline.config import Settings, settings_to_env, with_values
from pipeline.kafka import ensure_topics
from pipeline.kv import open_kv
from pipeline.local import KafkaBroker, RedisServer
from pipeline.models import preset
from pipeline.store import ParamStore
from tests.conftest import BrokerFactory, RedisFactory


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/faults" in str(item.fspath):
            item.add_marker(pytest.mark.faults)


@dataclass
class Fleet:
    """Worker processes of one group; every one started is killed at teardown."""

    settings: Settings
    redis: RedisServer
    broker: KafkaBroker
    extra_env: dict[str, str] = field(default_factory=dict)
    procs: dict[str, asyncio.subprocess.Process] = field(default_factory=dict)

    async def publish_mlp(self, name: str, seed: int) -> tuple[Any, dict[str, Any]]:
        """Publish the mlp preset seeded with ``seed``; returns the model and its params."""
        model = preset("mlp")
        params = model.init(seed)
        async with open_kv(self.settings.redis) as kv:
            store = ParamStore(kv, prefix=self.settings.redis.key_prefix)
            await store.publish(name, model.arch, params)
        return model, params

    async def start(self, worker_id: str) -> asyncio.subprocess.Process:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("KVPIPE_")},
            **settings_to_env(self.settings),
            "KVPIPE_WORKER_ID": worker_id,
            "KVPIPE_LOG_FORMAT": "json",
            **self.extra_env,
        }
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "consumers.inference",
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        self.procs[worker_id] = proc
        return proc

    def kill(self, worker_id: str) -> None:
        self.procs[worker_id].send_signal(signal.SIGKILL)

    async def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()


@pytest_asyncio.fixture
async def fault_stack(
    redis_factory: RedisFactory, broker_factory: BrokerFactory
) -> AsyncIterator[Callable[..., Awaitable[Fleet]]]:
    """``await fault_stack(**env)``: fresh Redis + broker, topics made, a Fleet to start."""
    fleets: list[Fleet] = []

    async def make(**extra_env: str) -> Fleet:
        redis = await redis_factory()
        broker = await broker_factory()
        tag = uuid.uuid4().hex[:8]
        settings = with_values(Settings(), {
            "redis.url": redis.url, "kafka.bootstrap": broker.bootstrap,
            "kafka.topic_prefix": f"f{tag}", "kafka.group_id": f"f{tag}",
            "kafka.session_timeout_ms": 2000, "kafka.heartbeat_interval_ms": 300,
        })  # fmt: skip
        k = settings.kafka
        await ensure_topics(k, [k.requests_topic, k.results_topic, k.dlq_topic, k.updates_topic])
        fleet = Fleet(settings, redis, broker, dict(extra_env))
        fleets.append(fleet)
        return fleet

    try:
        yield make
    finally:
        for fleet in fleets:
            await fleet.stop_all()
