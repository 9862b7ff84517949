"""Factories for integration tests: isolated settings, running workers, a results reader."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_asyncio

from consumers.inference import start_serving
from pipeline.client import InferenceClient, ResultStream
from pipeline.config import Settings, with_values
from pipeline.dev.cluster import LocalRedisCluster
from pipeline.dev.local import KafkaBroker, RedisServer
from pipeline.io.kafka import ensure_topics
from pipeline.io.wire import Result
from pipeline.serving.worker import Worker

FAST_GROUP = {"kafka.session_timeout_ms": 2000, "kafka.heartbeat_interval_ms": 300}
#: ``@ON_BOTH_REDIS`` runs a test whose settings come from ``make_settings`` (or which asks for
#: ``redis_url``) on the session's single Redis and on the session's 3-primary Redis Cluster.
ON_BOTH_REDIS = pytest.mark.parametrize("redis_url", ["single", "cluster"], indirect=True)


@pytest_asyncio.fixture(loop_scope="session", scope="session")
async def redis_cluster() -> AsyncIterator[LocalRedisCluster]:
    """One 3-primary Redis Cluster for the session, started on first use; stopped at the end
    (also when a test failed). Don't kill its nodes: the fault tests start their own."""
    async with LocalRedisCluster(3) as cluster:
        yield cluster


@pytest.fixture
def redis_url(request: pytest.FixtureRequest, redis_server: RedisServer) -> str:
    """The session Redis's URL, or the session cluster's when parametrized with "cluster"."""
    kind = getattr(request, "param", "single")
    if kind == "cluster":
        cluster: LocalRedisCluster = request.getfixturevalue("redis_cluster")
        return cluster.url
    assert kind == "single", kind
    return redis_server.url


@pytest.fixture
def make_settings(redis_url: str, kafka_broker: KafkaBroker) -> Callable[..., Settings]:
    """Settings on the session services with topic and key prefixes no other test uses."""

    def make(**values: Any) -> Settings:
        tag = uuid.uuid4().hex[:10]
        base = {
            "redis.url": redis_url,
            "kafka.bootstrap": kafka_broker.bootstrap,
            "kafka.topic_prefix": f"t{tag}",
            "kafka.group_id": f"g{tag}",
            "redis.key_prefix": f"k{tag}",
            **FAST_GROUP,
        }
        base.update({k.replace("__", "."): v for k, v in values.items()})
        return with_values(Settings(), base)

    return make


@dataclass
class RunningWorker:
    """A worker served in this event loop; ``stop()`` drains it and returns its stats."""

    worker: Worker
    task: asyncio.Task[Any]
    stop_event: asyncio.Event

    async def stop(self, timeout: float = 30.0) -> Any:
        self.stop_event.set()
        return await asyncio.wait_for(self.task, timeout)


@pytest_asyncio.fixture
async def start_worker() -> AsyncIterator[Callable[[Settings], Awaitable[RunningWorker]]]:
    """``await start_worker(settings)`` runs a worker until its partitions are assigned."""
    running: list[RunningWorker] = []

    async def start(settings: Settings) -> RunningWorker:
        stop = asyncio.Event()
        worker, task = await start_serving(settings, stop, timeout_s=30)
        rw = RunningWorker(worker, task, stop)
        running.append(rw)
        return rw

    try:
        yield start
    finally:
        for rw in running:
            rw.stop_event.set()
        for rw in running:
            try:
                await asyncio.wait_for(rw.task, 30)
            except BaseException:
                rw.task.cancel()


@dataclass
class Collected:
    results: dict[str, list[Result]] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return len(self.results)


async def collect(
    stream: ResultStream, ids: set[str], timeout: float = 60.0
) -> dict[str, list[Result]]:
    """Read results until every id in ``ids`` has one (or ``timeout``); keeps duplicates."""
    got: dict[str, list[Result]] = {}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not ids <= got.keys() and loop.time() < deadline:
        for r in await stream.next_batch(0.2):
            got.setdefault(r.id, []).append(r)
    return got


@pytest_asyncio.fixture
async def make_client() -> AsyncIterator[Callable[[Settings], Awaitable[InferenceClient]]]:
    """``await make_client(settings)``: a started client (topics created first); closed after."""
    clients: list[InferenceClient] = []

    async def make(settings: Settings) -> InferenceClient:
        k = settings.kafka
        await ensure_topics(k, [k.requests_topic, k.results_topic, k.dlq_topic, k.updates_topic])
        client = InferenceClient(k)
        await client.__aenter__()
        clients.append(client)
        return client

    try:
        yield make
    finally:
        for c in clients:
            await c.aclose()
