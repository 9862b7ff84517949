"""The bare consume -> produce echo: the floor any Kafka worker sits on.

:func:`echo_loop` forwards each message of ``source`` to ``sink`` unchanged, in a consumer
group, committing what was acknowledged; ``kvpipe bench`` measures the worker against it.
``python -m pipeline.bench.echo`` runs it as a process of its own (settings from ``KVPIPE_*``,
``PREFIX.requests`` -> ``PREFIX.echo``) until SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections import deque
from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition

from pipeline.config import KafkaSettings, settings_from_env
from pipeline.errors import KvpipeError
from pipeline.serving.worker import tune_gc


def echo_topic(kafka: KafkaSettings) -> str:
    """Where the echo of a settings' requests topic goes."""
    return f"{kafka.topic_prefix}.echo"


class _AssignedListener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, assigned: asyncio.Event) -> None:
        self._assigned = assigned

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        return None

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        if list(assigned):
            self._assigned.set()


async def echo_loop(
    kafka: KafkaSettings,
    source: str,
    sink: str,
    stop: asyncio.Event,
    assigned: asyncio.Event,
    commit_interval_s: float = 0.2,
) -> int:
    """The baseline: consume in a group, forward each message as is, commit what was acked."""
    # Client options as in pipeline.io.kafka (acks=all, and the fetch and batch tuning of the
    # settings), so the two sides differ only in what happens between them.
    common: dict[str, Any] = {
        "bootstrap_servers": kafka.bootstrap.split(","),
        "client_id": kafka.client_id,
        "request_timeout_ms": int(kafka.request_timeout_s * 1000),
    }
    consumer = AIOKafkaConsumer(
        **common,
        group_id=kafka.group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=kafka.session_timeout_ms,
        heartbeat_interval_ms=kafka.heartbeat_interval_ms,
        fetch_max_wait_ms=kafka.fetch_max_wait_ms,
        max_partition_fetch_bytes=kafka.partition_fetch_bytes,
        metadata_max_age_ms=5_000,
    )
    producer = AIOKafkaProducer(
        **common,
        acks="all",
        linger_ms=kafka.linger_ms,
        max_batch_size=kafka.producer_batch_bytes,
        max_request_size=kafka.max_message_bytes,
        enable_idempotence=False,
    )
    loop = asyncio.get_running_loop()
    pending: deque[tuple[TopicPartition, int, asyncio.Future[Any]]] = deque()
    commits = 0

    async def commit_acked() -> None:
        nonlocal commits
        offsets: dict[TopicPartition, int] = {}
        while pending and pending[0][2].done():
            tp, position, fut = pending.popleft()
            fut.result()  # a failed send is a failed baseline
            offsets[tp] = position
        if offsets:
            await asyncio.wait_for(consumer.commit(offsets), kafka.request_timeout_s)
            commits += 1

    try:
        await asyncio.wait_for(producer.start(), kafka.request_timeout_s)
        await asyncio.wait_for(consumer.start(), kafka.request_timeout_s)
        consumer.subscribe([source], listener=_AssignedListener(assigned))
        next_commit = loop.time() + commit_interval_s
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=100, max_records=1000)
            for tp, records in batches.items():
                for r in records:
                    fut = await producer.send(
                        sink, value=r.value, key=r.key, headers=list(r.headers or ())
                    )
                    pending.append((tp, r.offset + 1, fut))
            if loop.time() >= next_commit:
                await commit_acked()
                next_commit = loop.time() + commit_interval_s
        await asyncio.wait_for(producer.flush(), kafka.request_timeout_s)
        await commit_acked()
        return commits
    finally:
        for client in (consumer, producer):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.stop(), kafka.request_timeout_s)


async def _serve(kafka: KafkaSettings) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return await echo_loop(kafka, kafka.requests_topic, echo_topic(kafka), stop, asyncio.Event())


def main() -> int:
    """Entry point of the echo process: 0 after a clean stop, 2 when it cannot run."""
    try:
        settings = settings_from_env(os.environ)
        tune_gc()  # as the worker process does, so the two differ only in their work
        asyncio.run(_serve(settings.kafka))
    except KvpipeError as exc:
        print(f"kvpipe echo: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
