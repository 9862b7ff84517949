"""Delivery against the in-memory Kafka fakes: routing, isolation, retries, shrinking."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from pipeline.config import KafkaSettings
from pipeline.errors import KvpipeError, UnreadableMessage
from pipeline.io.kafka import Message, MessageTooLarge, Partition
from pipeline.io.wire import H_DLQ_REASON, Request, Result, Status, decode_result, error_result
from pipeline.serving.commits import OffsetTracker
from pipeline.serving.delivery import Delivery
from pipeline.serving.item import Item
from pipeline.serving.stats import WorkerStats
from tests.unit.kafka_fakes import FakeBroker, FakeProducer

K = KafkaSettings()


class Setup:
    def __init__(self, **producer: Any) -> None:
        self.broker = FakeBroker()
        self.broker.create(K.requests_topic, K.results_topic, K.dlq_topic, "kvpipe.replies.a")
        self.producer = FakeProducer(self.broker, **producer)
        self.book = OffsetTracker()
        self.abandon = asyncio.Event()
        self.delivery = Delivery(
            K,
            self.producer,  # type: ignore[arg-type]
            self.book,
            WorkerStats(),
            worker_id="w",
            abandon=self.abandon,
        )
        self.offset = 0

    def item(self, reply_to: str | None = None) -> Item:
        msg = Message(Partition(K.requests_topic, 0), self.offset, b"k", b"raw", (), 0)
        self.book.add(msg.partition, msg.offset)
        self.offset += 1
        request = Request(id=f"r{msg.offset}", model="m", inputs=None, reply_to=reply_to)
        return Item(msg, request)

    def results(self, topic: str = K.results_topic) -> list[Result]:
        return [decode_result(r.value, r.headers) for r in self.broker.records(topic)]


def ok(it: Item, value: float = 1.0) -> Result:
    return Result(
        id=it.request.id,
        model="m",
        status=Status.OK,
        version=1,
        outputs=np.full((1, 2), value, np.float32),
    )


async def test_answers_go_where_asked_and_finish_their_offsets() -> None:
    s = Setup()
    a, b = s.item(), s.item(reply_to="kvpipe.replies.a")
    await s.delivery.reply([(a, ok(a)), (b, ok(b))])
    assert [r.id for r in s.results()] == ["r0"]
    assert [r.id for r in s.results("kvpipe.replies.a")] == ["r1"]
    assert s.book.in_flight == 0 and a.answered and b.answered


async def test_a_reply_topic_that_does_not_exist_is_answered_on_results() -> None:
    s = Setup()
    it = s.item(reply_to="kvpipe.replies.nobody")
    await s.delivery.reply([(it, ok(it))])
    ((res,),) = [s.results()]
    assert res.error_code == "bad_reply_to" and res.version == 1
    assert "kvpipe.replies.nobody" not in s.broker.topics


async def test_one_unencodable_result_is_answered_alone() -> None:
    s = Setup()
    good, bad = s.item(), s.item()
    broken = ok(bad)
    broken.worker = "\ud800"  # not UTF-8: orjson refuses it
    await s.delivery.reply([(good, ok(good)), (bad, broken)])
    by_id = {r.id: r for r in s.results()}
    assert by_id["r0"].ok and by_id["r1"].error_code == "internal"
    assert s.book.in_flight == 0


async def test_when_even_the_error_cannot_be_encoded_the_request_is_a_dead_letter() -> None:
    s = Setup()
    it = s.item()
    it.request.id = "\ud800"  # nothing with this id can be sent back
    await s.delivery.reply([(it, error_result(it.request, KvpipeError("x")))])
    assert s.results() == []
    ((dead,),) = [s.broker.records(K.dlq_topic)]
    assert dead.value == b"raw" and dead.key == b"k"
    assert dead.header(H_DLQ_REASON).startswith(b"internal: ")  # type: ignore[union-attr]
    assert s.book.in_flight == 0


async def test_failed_sends_are_retried_and_never_finished_until_acknowledged() -> None:
    s = Setup(send_timeout_s=0.05)
    s.broker.failing[K.results_topic] = RuntimeError("refused")
    it = s.item()
    sending = asyncio.ensure_future(s.delivery.reply([(it, ok(it))]))
    await asyncio.sleep(0.5)
    assert s.book.in_flight == 1 and s.delivery.stats.send_retries >= 2
    s.broker.failing.clear()
    await asyncio.wait_for(sending, 10)
    assert s.book.in_flight == 0 and [r.id for r in s.results()] == ["r0"]


async def test_abandon_stops_retrying() -> None:
    s = Setup(send_timeout_s=0.05)
    s.broker.failing[K.results_topic] = RuntimeError("refused")
    it = s.item()
    sending = asyncio.ensure_future(s.delivery.reply([(it, ok(it))]))
    await asyncio.sleep(0.2)
    s.abandon.set()
    await asyncio.wait_for(sending, 5)
    assert s.book.in_flight == 1  # never committed


async def test_a_result_too_large_is_replaced_by_a_small_error() -> None:
    s = Setup()
    real = s.producer.enqueue

    async def limited(topic: str, value: bytes, **kw: Any) -> Any:
        if len(value) > 1000:
            raise MessageTooLarge(f"message of {len(value)} bytes refused")
        return await real(topic, value, **kw)

    s.producer.enqueue = limited  # type: ignore[method-assign]
    it = s.item()
    big = ok(it)
    big.outputs = np.ones((1, 5000), np.float32)
    await s.delivery.reply([(it, big)])
    ((res,),) = [s.results()]
    assert res.error_code == "result_too_large" and res.version == 1


async def test_answer_all_answers_what_a_failing_batch_left() -> None:
    s = Setup()
    items = [s.item(), s.item()]

    async def half_then_crash() -> None:
        await s.delivery.reply([(items[0], ok(items[0]))])
        raise RuntimeError("a bug")

    await s.delivery.answer_all(items, half_then_crash())
    by_id = {r.id: r for r in s.results()}
    assert by_id["r0"].ok and by_id["r1"].error_code == "internal"
    assert s.book.in_flight == 0


async def test_dead_letters_keep_the_original_and_say_why() -> None:
    s = Setup()
    msg = Message(Partition(K.requests_topic, 0), 0, b"k", b"\xff junk", (("x", b"1"),), 0)
    s.book.add(msg.partition, 0)
    await s.delivery.dead_letter(msg, UnreadableMessage("not JSON"))
    ((dead,),) = [s.broker.records(K.dlq_topic)]
    assert dead.value == b"\xff junk" and dead.header("x") == b"1"
    assert dead.header("kvpipe-dlq-source") == b"kvpipe.requests[0]@0"
    assert s.book.in_flight == 0
