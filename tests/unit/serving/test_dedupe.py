"""Answered once, optionally: ids recorded after acknowledgement, redeliveries skipped and
committed, and a Redis that fails or stalls only costs the promise, never an answer."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import numpy as np
import structlog

from pipeline.config import Settings, with_values
from pipeline.errors import StoreUnavailable
from pipeline.io.kafka import Message, Partition
from pipeline.io.kv.memory import MemoryKV
from pipeline.io.wire import decode_result
from pipeline.params.models import preset
from pipeline.params.store import ParamStore
from pipeline.serving.dedupe import Dedupe, fingerprint
from pipeline.serving.worker import Worker
from tests.unit.kafka_fakes import FakeBroker, fake_worker

MODEL = preset("mlp")
PARAMS = MODEL.init(0)


def E(*ids: str) -> list[tuple[str, bytes]]:
    """(id, fingerprint) pairs, each id with a message of its own."""
    return [(rid, b"msg-" + rid.encode()) for rid in ids]


def _dedupe(kv: MemoryKV, **kw: Any) -> Dedupe:
    return Dedupe(kv, key_prefix="t", topic="kvpipe.requests", group="g", ttl_s=60.0, **kw)


async def test_a_batch_is_recorded_in_one_command_and_remembered_one_to_two_ttls() -> None:
    now = [600.0]  # bucket 10 of 60 s
    kv = MemoryKV(clock=lambda: now[0])
    d = _dedupe(kv, clock=lambda: now[0])
    await d.record(E("a", "b"))
    assert kv.calls["hset_many"] == 1 and kv.calls["expire"] == 1
    await d.record(E("c"))
    assert kv.calls["hset_many"] == 2 and kv.calls["expire"] == 1  # once per bucket
    assert kv.keys() == ["t:answered:kvpipe.requests:g:10"]
    assert kv.ttl("t:answered:kvpipe.requests:g:10") == 120.0
    assert await d.answered(E("a", "x", "c")) == [True, False, True]
    assert kv.calls["hmget"] == 2  # this bucket and the one before, sent together
    now[0] = 719.0  # the next bucket still sees the one before
    assert await d.answered(E("a", "b")) == [True, True]
    now[0] = 720.0  # two buckets on: forgotten (kept ttl to 2 ttl)
    assert await d.answered(E("a", "b")) == [False, False]
    assert (d.stats.recorded, d.stats.skipped, d.stats.lookups) == (3, 4, 7)


async def test_groups_and_topics_never_share_a_record() -> None:
    kv = MemoryKV()
    await _dedupe(kv).record(E("a"))
    other_group = Dedupe(kv, key_prefix="t", topic="kvpipe.requests", group="h", ttl_s=60.0)
    other_topic = Dedupe(kv, key_prefix="t", topic="x.requests", group="g", ttl_s=60.0)
    assert await other_group.answered(E("a")) == [False]
    assert await other_topic.answered(E("a")) == [False]


async def test_a_failing_redis_costs_the_promise_not_the_answer_and_is_said_once() -> None:
    kv = MemoryKV()
    d = _dedupe(kv, pause_s=0.0)
    await d.record(E("a"))
    kv.fail = StoreUnavailable("Redis at x unavailable")
    with structlog.testing.capture_logs() as logs:
        assert await d.answered(E("a", "b")) == [False, False]  # answer again, not never
        await d.record(E("c"))
        assert await d.answered(E("a")) == [False]
    assert d.stats.failures == 3 and d.stats.degraded
    assert [e["event"] for e in logs] == ["dedupe_unavailable"]
    kv.fail = None
    with structlog.testing.capture_logs() as logs:
        assert await d.answered(E("a")) == [True]
    assert [e["event"] for e in logs] == ["dedupe_restored"] and not d.stats.degraded


async def test_after_a_failure_redis_is_left_alone_for_the_pause() -> None:
    kv = MemoryKV()
    d = _dedupe(kv, pause_s=3600.0)
    kv.fail = StoreUnavailable("down")
    await d.answered(E("a"))
    kv.fail = None
    calls = sum(kv.calls.values())
    assert await d.answered(E("a")) == [False]
    await d.record(E("a"))
    assert sum(kv.calls.values()) == calls  # no call at all while paused


async def test_a_stalled_redis_is_given_up_after_the_call_timeout() -> None:
    kv = MemoryKV()
    kv.latency_s = 3600.0  # never answers
    d = _dedupe(kv, timeout_s=0.05)
    assert await asyncio.wait_for(d.answered(E("a")), 60) == [False]
    assert d.stats.failures == 1


# -- in the worker ------------------------------------------------------------------------------


def _settings(**values: Any) -> Settings:
    return with_values(
        Settings(),
        {
            "worker.commit_interval_s": 0.01,
            "worker.watchdog_s": 0.0,
            "worker.shutdown_timeout_s": 5.0,
            "worker.listen_updates": False,
            "worker.dedupe_ttl_s": 60.0,
            **values,
        },
    )


class Bench:
    """Requests on a fake broker, answered by workers with dedupe over one memory KV."""

    def __init__(self) -> None:
        self.settings = _settings()
        self.broker = FakeBroker()
        k = self.settings.kafka
        self.broker.create(k.requests_topic, k.results_topic, k.dlq_topic)
        self.kv = MemoryKV()
        self.store = ParamStore(self.kv, prefix="t")

    def request(self, rid: str, row: int, partition: int) -> None:
        x = np.random.default_rng(row).normal(size=(1, MODEL.input_dim)).round(3).tolist()
        body = json.dumps({"id": rid, "model": "m", "inputs": x}).encode()
        self.broker.append(self.settings.kafka.requests_topic, partition, body)

    def all_committed(self) -> bool:
        ends = self.broker.end(self.settings.kafka.requests_topic)
        return all(self.broker.committed.get(p, 0) == end for p, end in ends.items() if end)

    def answers(self) -> list[str]:
        k = self.settings.kafka
        return [decode_result(r.value, r.headers).id for r in self.broker.records(k.results_topic)]

    async def serve(self, dedupe: Dedupe | None) -> Worker:
        worker = fake_worker(
            self.settings, self.broker, self.store, version_ttl_s=2.0, dedupe=dedupe
        )
        stop = asyncio.Event()
        async with worker:
            task = asyncio.create_task(worker.run(stop))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 20
            while not self.all_committed() and loop.time() < deadline and not task.done():  # noqa: ASYNC110
                await asyncio.sleep(0.01)  # polls the fake broker's state
            stop.set()
            await asyncio.wait_for(task, 30)
        return worker


async def test_a_redelivered_batch_is_skipped_and_committed_not_answered_again() -> None:
    b = Bench()
    await b.store.publish("m", MODEL.arch, PARAMS)
    for i in range(30):
        b.request(f"r{i}", i, partition=i % 3)
    first = await b.serve(_dedupe(b.kv))
    assert sorted(b.answers()) == sorted(f"r{i}" for i in range(30))
    assert first.stats.skipped_answered == 0
    # the commit is lost (a crash after the answers were acknowledged and recorded): the
    # next worker reads every request again
    b.broker.committed.clear()
    b.request("new", 99, partition=0)
    second = await b.serve(_dedupe(b.kv))
    assert sorted(b.answers()) == sorted([*(f"r{i}" for i in range(30)), "new"])
    assert second.stats.skipped_answered == 30
    assert b.all_committed()


async def test_without_dedupe_a_redelivered_batch_is_answered_again() -> None:
    b = Bench()
    await b.store.publish("m", MODEL.arch, PARAMS)
    for i in range(10):
        b.request(f"r{i}", i, partition=0)
    await b.serve(None)
    b.broker.committed.clear()
    await b.serve(None)
    assert len(b.answers()) == 20  # at-least-once: the control for the test above


async def test_redis_down_means_answered_again_and_committed_never_stuck() -> None:
    b = Bench()
    await b.store.publish("m", MODEL.arch, PARAMS)
    for i in range(10):
        b.request(f"r{i}", i, partition=0)
    # the parameters are cached by the first worker; dedupe's own KV is down throughout
    down = MemoryKV()
    down.fail = StoreUnavailable("Redis at x unavailable")
    d = _dedupe(down)
    await b.serve(d)
    b.broker.committed.clear()
    worker = await b.serve(_dedupe(down))
    assert len(b.answers()) == 20 and b.all_committed()
    assert worker.stats.skipped_answered == 0 and d.stats.degraded


class GatedKV(MemoryKV):
    """Records (hset_many) wait for ``gate``; everything else answers at once."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()

    async def hset_many(self, key: str, mapping: Any) -> None:
        await self.gate.wait()
        await super().hset_many(key, mapping)


async def test_an_offset_is_committed_only_after_its_answer_is_recorded() -> None:
    b = Bench()
    await b.store.publish("m", MODEL.arch, PARAMS)
    for i in range(12):
        b.request(f"r{i}", i, partition=i % 2)
    kv = GatedKV()
    d = Dedupe(kv, key_prefix="t", topic="q", group="g", ttl_s=60.0, timeout_s=3600.0)
    k = b.settings.kafka

    async def release_when_answered() -> None:
        while len(b.broker.records(k.results_topic)) < 12:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # many commit intervals with every answer acknowledged
        assert b.broker.committed == {}  # ... and nothing committed: the records are pending
        kv.gate.set()

    releaser = asyncio.create_task(release_when_answered())
    await b.serve(d)
    await releaser
    assert b.all_committed() and d.stats.recorded == 12


async def test_the_window_left_a_crash_before_the_record_repeats_those_answers() -> None:
    b = Bench()
    await b.store.publish("m", MODEL.arch, PARAMS)
    for i in range(8):
        b.request(f"r{i}", i, partition=0)
    kv = GatedKV()  # the record never lands before the crash
    d = Dedupe(kv, key_prefix="t", topic="q", group="g", ttl_s=60.0, timeout_s=3600.0)
    worker = fake_worker(b.settings, b.broker, b.store, version_ttl_s=2.0, dedupe=d)
    async with worker:
        task = asyncio.create_task(worker.run(asyncio.Event()))
        while len(b.answers()) < 8:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        task.cancel()  # killed: answers acknowledged, their record pending, nothing committed
        await asyncio.gather(task, return_exceptions=True)
    d.abandon()
    assert b.broker.committed == {}
    kv.gate.set()
    again = await b.serve(_dedupe(kv))
    assert sorted(b.answers()) == sorted([f"r{i}" for i in range(8)] * 2)  # the window
    assert again.stats.skipped_answered == 0


async def test_only_what_another_worker_may_have_answered_is_looked_up() -> None:
    b = Bench()
    await b.store.publish("m", MODEL.arch, PARAMS)
    for i in range(10):
        b.request(f"r{i}", i, partition=0)
    kv = MemoryKV()
    # this worker was assigned its partitions an hour ago: the requests came after that, no
    # previous owner can have answered them, so none is looked up; all are recorded
    an_hour_ago = Dedupe(
        kv, key_prefix="t", topic="q", group="g", ttl_s=60.0, clock=lambda: time.time() - 3600
    )
    await b.serve(an_hour_ago)
    assert kv.calls["hmget"] == 0 and an_hour_ago.stats.lookups == 0
    assert an_hour_ago.stats.recorded == 10
    # a worker assigned now: everything already in the topic is a suspect
    d = _dedupe(kv)
    assert not d.may_be_answered("p", time.time() * 1000)  # not assigned: not ours
    d.assigned(["p"])
    assert d.may_be_answered("p", time.time() * 1000)
    assert not d.may_be_answered("p", (time.time() + 3600) * 1000)


async def test_an_id_is_answered_again_under_another_message() -> None:
    """A corrected resend, or a stranger reusing the id, is a new request; only the same
    message (value and headers) again is skipped."""
    kv = MemoryKV()
    d = _dedupe(kv)
    await d.record([("a", fingerprint(_message(b"v1")))])
    same = fingerprint(_message(b"v1"))
    corrected = fingerprint(_message(b"v2"))
    elsewhere = fingerprint(_message(b"v1", [("kvpipe-reply-to", b"kvpipe.replies.thief")]))
    assert await d.answered([("a", same), ("a", corrected), ("a", elsewhere)]) == [
        True,
        False,
        False,
    ]


def _message(value: bytes, headers: list[tuple[str, bytes]] | None = None) -> Message:
    return Message(Partition("t", 0), 0, None, value, headers or [], 0)
