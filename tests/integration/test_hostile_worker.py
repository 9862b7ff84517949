"""Hostile requests against a worker on the real local Redis and broker (issue 10).

A poison message among a thousand, reply-to topics a request may not name, results topics
deleted while serving, and request fields large enough to exhaust memory.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import sys
from collections import Counter
from typing import Any

import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from pipeline.client import ResultStream
from pipeline.io.wire import H_DLQ_REASON, H_REPLY_TO, Result
from tests.integration.conftest import collect
from tests.integration.test_worker import publish, read_all

pytestmark = pytest.mark.integration

POISON = b'{"id": "bad\\ud800", "model": "m", "inputs": [[0.5]]}'  # valid JSON, not UTF-8-able


async def _committed_vs_end(settings: Any, sent: int) -> dict[int, tuple[int | None, int]]:
    """Per request partition: the group's committed offset and the partition's end, read as
    one past the last message (Tansu's ListOffsets answers other figures)."""
    k = settings.kafka
    ends: dict[int, int] = dict.fromkeys(range(k.partitions), 0)
    for m in await read_all(settings, k.requests_topic, want=sent):
        ends[m.partition.partition] = max(ends[m.partition.partition], m.offset + 1)
    consumer = AIOKafkaConsumer(bootstrap_servers=k.bootstrap, group_id=k.group_id)
    await consumer.start()
    try:
        tps = [TopicPartition(k.requests_topic, p) for p in range(k.partitions)]
        return {tp.partition: (await consumer.committed(tp), ends[tp.partition]) for tp in tps}
    finally:
        await consumer.stop()


async def _wave(
    settings: Any, client: Any, stream: Any, model: Any, params: Any, tag: str
) -> tuple[dict[str, list[Result]], int]:
    """1,000 messages over every partition, one of them the poison; returns the answers."""
    x = np.random.default_rng(len(tag)).standard_normal((999, model.input_dim))
    for i in range(1000):
        if i == 500:
            await client.submit_raw(POISON, key=f"{tag}-poison".encode())
            continue
        j = i if i < 500 else i - 1
        await client.submit("m", x[j : j + 1], id=f"{tag}{j}", wait=False)
    await client.flush()
    got = await collect(stream, {f"{tag}{j}" for j in range(999)})
    expected = model.forward(params, x.astype(np.float32))
    ok = 0
    for j in range(999):
        res = got[f"{tag}{j}"][0]
        assert res.ok, res.error_message
        np.testing.assert_allclose(res.outputs[0], expected[j], rtol=1e-4, atol=1e-5)
        ok += 1
    return got, ok


async def test_one_poison_message_among_a_thousand(
    make_settings: Any, start_worker: Any, make_client: Any
) -> None:
    settings = make_settings(worker__max_wait_ms=5.0)
    model, params, _ = await publish(settings, "m")
    client = await make_client(settings)
    k = settings.kafka
    async with ResultStream(k, k.results_topic, from_beginning=True) as stream:
        running = await start_worker(settings)
        first, ok = await _wave(settings, client, stream, model, params, "a")
        assert ok == 999
        await running.stop()
        offsets = await _committed_vs_end(settings, 1000)
        assert all(c == end for c, end in offsets.values()), offsets
        assert sum(end for _, end in offsets.values()) == 1000
        assert len([p for p, (_, end) in offsets.items() if end]) == k.partitions

        # the same after a restart: nothing fetched again, the next wave alike
        await start_worker(settings)
        second, ok = await _wave(settings, client, stream, model, params, "b")
        assert ok == 999
        await asyncio.sleep(0.5)
        late = await stream.next_batch(0.5)
    assert not [r for r in late if r.id.startswith("a")], "the first wave was answered again"
    assert all(len(v) == 1 for v in {**first, **second}.values())
    dlq = await read_all(settings, k.dlq_topic, want=2)
    assert [m.value for m in dlq] == [POISON, POISON]
    reasons = [dict(m.headers)[H_DLQ_REASON].decode() for m in dlq]
    assert all(r.startswith("missing_id: request id is not valid Unicode") for r in reasons)
    offsets = await _committed_vs_end(settings, 2000)
    assert all(c == end for c, end in offsets.values()), offsets
    assert sum(end for _, end in offsets.values()) == 2000


async def _topics(settings: Any) -> set[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka.bootstrap)
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


async def test_reply_to_only_into_allowed_existing_topics(
    make_settings: Any, start_worker: Any, make_client: Any
) -> None:
    settings = make_settings()
    await publish(settings, "m")
    client = await make_client(settings)
    k = settings.kafka
    absent = f"{k.topic_prefix}.replies.nobody"
    cases = {
        "updates": k.updates_topic,
        "requests": k.requests_topic,
        "dlq": k.dlq_topic,
        "training": k.training_topic,
        "foreign": "someone.elses.topic",
        "absent": absent,
    }
    async with ResultStream(k, k.results_topic, from_beginning=True) as stream:
        await start_worker(settings)
        for rid, topic in cases.items():
            body = json.dumps({"id": rid, "model": "m", "inputs": [[0.1] * 32]}).encode()
            await client.submit_raw(body, key=rid.encode(), headers=[(H_REPLY_TO, topic.encode())])
        await client.flush()
        got = await collect(stream, set(cases))
    assert {rid: got[rid][0].error_code for rid in cases} == dict.fromkeys(cases, "bad_reply_to")
    topics = await _topics(settings)
    assert absent not in topics and "someone.elses.topic" not in topics
    assert await read_all(settings, k.updates_topic, want=1, timeout=2.0) == []


async def test_results_topic_deleted_while_serving_is_created_again(
    make_settings: Any, start_worker: Any, make_client: Any
) -> None:
    settings = make_settings(worker__topic_check_s=0.5)
    await publish(settings, "m")
    client = await make_client(settings)
    k = settings.kafka
    running = await start_worker(settings)
    reply = await client.infer("m", np.zeros((1, 32)), timeout=30)
    assert reply.ok
    admin = AIOKafkaAdminClient(bootstrap_servers=k.bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([k.results_topic])
    finally:
        await admin.close()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while running.worker.stats.topics_recreated == 0 and loop.time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.1)  # the worker's own periodic check, nothing to wait on
    assert running.worker.stats.topics_recreated == 1
    assert k.results_topic in await _topics(settings)
    async with ResultStream(k, k.results_topic, from_beginning=True) as stream:
        for i in range(50):
            await client.submit("m", np.zeros((1, 32)), id=f"after{i}", wait=False)
        await client.flush()
        got = await collect(stream, {f"after{i}" for i in range(50)}, timeout=30)
    assert len(got) == 50 and all(v[0].ok for v in got.values())
    stats = await running.stop()
    assert stats.ok >= 51


def _rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def test_huge_unknown_model_names_cost_bounded_memory(
    make_settings: Any, start_worker: Any, make_client: Any, capsys: Any
) -> None:
    settings = make_settings(worker__metrics_port=0)
    await publish(settings, "m")
    client = await make_client(settings)
    k = settings.kafka
    n, size = 200, 1_000_000
    async with ResultStream(k, k.results_topic, from_beginning=True) as stream:
        running = await start_worker(settings)
        assert (await client.infer("m", np.zeros((1, 32)), timeout=30)).ok
        gc.collect()
        before = _rss_bytes()
        capsys.readouterr()
        for i in range(n):
            name = f"{i:07d}" + "x" * (size - 7)  # each a distinct, unknown, 1 MB name
            body = json.dumps({"id": f"big{i}", "model": name, "inputs": [[0.0] * 32]})
            await client.submit_raw(body.encode(), key=b"big")
        await client.flush()
        got = await collect(stream, {f"big{i}" for i in range(n)}, timeout=60)
        gc.collect()
        grown = _rss_bytes() - before
        logged = capsys.readouterr()
        worker = running.worker
        assert len(got) == n
        codes = Counter(v[0].error_code for v in got.values())
        assert codes == {"bad_request": n}
        assert max(len(v[0].model) for v in got.values()) <= 64
        assert max(len(v[0].error_message or "") for v in got.values()) < 300
        assert len(logged.out) + len(logged.err) < n * 2_000, "log lines carry the names"
        assert len(worker.registry.cache._failures) <= 1
        exposition = worker.metrics.exposition() if worker.metrics is not None else b""
        labels = {
            line.split(b'model="')[1].split(b'"')[0]
            for line in exposition.splitlines()
            if line.startswith(b"kvpipe_results_total{")
        }
        assert labels <= {b"m", b"other"}
    log_chars = len(logged.out) + len(logged.err)
    print(f"rss growth {grown / 2**20:.1f} MiB, log {log_chars} chars for {n} 1 MB model names")
    assert grown < 300 * 2**20  # the old code grew 1,750 MiB here; this run, under 100


_PRODUCE_BAD_BATCH = """
import asyncio, json, os, sys
from aiokafka import AIOKafkaProducer  # pure-Python records: AIOKAFKA_NO_EXTENSIONS is set

class Raw(str):
    def encode(self, *a, **k):
        return b"\\xff\\xfe-not-utf8"  # what a librdkafka producer may send as a header name

async def main(bootstrap, topic):
    p = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=200)
    await p.start()
    body = lambda i: json.dumps({"id": f"batch{i}", "model": "m", "inputs": [[0.0] * 32]}).encode()
    futs = [
        await p.send(topic, body(0), partition=0),
        await p.send(topic, body(1), partition=0, headers=[(Raw("x"), b"v")]),
        await p.send(topic, body(2), partition=0),
    ]
    await asyncio.gather(*futs)
    await p.stop()

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


async def test_a_record_batch_the_client_cannot_parse_is_dead_lettered_not_stuck(
    make_settings: Any, start_worker: Any, make_client: Any
) -> None:
    """aiokafka fails every fetch of a batch holding a header name that is not UTF-8; the
    worker steps past it offset by offset, dead-letters each, and serves on."""
    settings = make_settings()
    await publish(settings, "m")
    client = await make_client(settings)
    k = settings.kafka
    env = {**os.environ, "AIOKAFKA_NO_EXTENSIONS": "1"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _PRODUCE_BAD_BATCH, k.bootstrap, k.requests_topic, env=env
    )
    assert await asyncio.wait_for(proc.wait(), 60) == 0
    async with ResultStream(k, k.results_topic, from_beginning=True) as stream:
        running = await start_worker(settings)
        for i in range(20):
            await client.submit("m", np.zeros((1, 32)), id=f"after{i}", wait=False)
        await client.flush()
        got = await collect(stream, {f"after{i}" for i in range(20)}, timeout=30)
        assert len(got) == 20 and all(v[0].ok for v in got.values())
        dead = await read_all(settings, k.dlq_topic, want=3, timeout=20)
        await running.stop()
    sources = sorted(dict(m.headers)["kvpipe-dlq-source"].decode() for m in dead)
    assert sources == [f"{k.requests_topic}[0]@{i}" for i in range(3)]
    reasons = {dict(m.headers)[H_DLQ_REASON].decode().split(":")[0] for m in dead}
    assert reasons == {"corrupt_record"}
    offsets = await _committed_vs_end(settings, 23)
    assert all(c == end for c, end in offsets.values()), offsets
