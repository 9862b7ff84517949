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
from unittest import mock

import pytest
import pytest_asyncio

import consumers.inference
from consumers.inference import start_serving
from pipeline.config import Settings, settings_from_env, settings_to_env, with_values
from pipeline.dev.local import KafkaBroker, RedisServer
from pipeline.io.kafka import ensure_topics
from pipeline.io.kv import open_kv
from pipeline.params.models import preset
from pipeline.params.registry import ModelRegistry
from pipeline.params.store import ParamStore
from pipeline.serving.worker import Worker
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
    here: list[tuple[asyncio.Event, asyncio.Task[Any]]] = field(default_factory=list)

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

    async def serve_here(
        self,
        worker_id: str,
        *,
        registry: type[ModelRegistry] | None = None,
        values: dict[str, Any] | None = None,
    ) -> Worker:
        """A worker in this event loop (to read its counters or swap its model), ready."""
        settings = with_values(
            settings_from_env(self.extra_env, self.settings),
            {"worker.worker_id": worker_id, **(values or {})},
        )
        stop = asyncio.Event()
        # The worker's registry class swapped for this start only (it is built before ready).
        with mock.patch.object(consumers.inference, "ModelRegistry", registry or ModelRegistry):
            worker, task = await start_serving(settings, stop, timeout_s=30)
        self.here.append((stop, task))
        return worker

    def kill(self, worker_id: str) -> None:
        self.procs[worker_id].send_signal(signal.SIGKILL)

    async def stop_all(self) -> None:
        for stop, _ in self.here:
            stop.set()
        for _, task in self.here:
            try:
                await asyncio.wait_for(task, 30)
            except BaseException:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
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
