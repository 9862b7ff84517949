"""One message never costs another its answer: the worker's real decode -> batch -> compute ->
encode -> deliver path, with Kafka and Redis replaced at the boundary by in-memory fakes.

The invariant, for every mix of messages: each gets exactly one result or dead letter, the
good requests among them are answered ok and correctly, and the committed offset reaches the
end of every partition.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.config import Settings, with_values
from pipeline.errors import ConfigError
from pipeline.io.kv.memory import MemoryKV
from pipeline.io.wire import H_DLQ_SOURCE, decode_result
from pipeline.params.models import preset
from pipeline.params.store import ParamStore
from pipeline.serving.worker import Worker
from tests.unit.kafka_fakes import FakeBroker, fake_worker

MODEL = preset("mlp")
PARAMS = MODEL.init(0)
WIDTH = MODEL.input_dim


def _settings(**values: Any) -> Settings:
    base = {
        "worker.max_wait_ms": 5.0,
        "worker.commit_interval_s": 0.01,
        "worker.watchdog_s": 0.0,
        "worker.shutdown_timeout_s": 5.0,
        "worker.listen_updates": False,
        "worker.topic_check_s": 0.05,
    }
    base.update(values)
    return with_values(Settings(), base)


class Served:
    """A worker on fakes: feed it messages, run it until all are answered, read the output."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.broker = FakeBroker()
        k = settings.kafka
        self.broker.create(k.requests_topic, k.results_topic, k.dlq_topic)
        self.kv = MemoryKV()
        self.store = ParamStore(self.kv, prefix="t")
        self.sent: list[tuple[int, int]] = []

    async def publish(self, name: str = "m", params: Any = None) -> None:
        await self.store.publish(name, MODEL.arch, PARAMS if params is None else params)

    def send(
        self, value: bytes | None, headers: Sequence[tuple[str, bytes]] = (), partition: int = 0
    ) -> None:
        msg = self.broker.append(self.settings.kafka.requests_topic, partition, value, headers)
        self.sent.append((partition, msg.offset))

    def request(self, rid: str, rows: Any, *, partition: int = 0, **extra: Any) -> None:
        body = {"id": rid, "model": "m", "inputs": rows, **extra}
        self.send(json.dumps(body).encode(), partition=partition)

    async def run(
        self, until: Callable[[Worker], bool] | None = None, *, timeout: float = 20.0
    ) -> Worker:
        stop = asyncio.Event()
        worker = fake_worker(self.settings, self.broker, self.store)
        done = until or (lambda w: self.all_committed())
        async with worker:
            task = asyncio.create_task(worker.run(stop))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while not done(worker) and loop.time() < deadline and not task.done():  # noqa: ASYNC110
                await asyncio.sleep(0.01)  # polls the fake broker's state; nothing to wait on
            stop.set()
            await asyncio.wait_for(task, 30)
        return worker

    def all_committed(self) -> bool:
        return self.broker.all_committed(self.settings.kafka.requests_topic)

    def answers(self, topic: str | None = None) -> list[Any]:
        k = self.settings.kafka
        return [
            decode_result(r.value, r.headers) for r in self.broker.records(topic or k.results_topic)
        ]

    def dead_letters(self) -> list[Any]:
        return self.broker.records(self.settings.kafka.dlq_topic)


def _rows(n: int = 1, seed: int = 0) -> list[list[float]]:
    return np.random.default_rng(seed).normal(size=(n, WIDTH)).round(3).tolist()


def _expected(rows: list[list[float]]) -> Any:
    return MODEL.forward(PARAMS, np.asarray(rows, dtype=np.float32))


async def test_a_lone_surrogate_costs_no_other_request_its_answer() -> None:
    s = Served(_settings(**{"worker.max_wait_ms": 50.0}))
    await s.publish()
    for i in range(8):  # one batch, over three partitions
        s.request(f"ok-{i}", _rows(1, i), partition=i % 3)
    # valid JSON, not encodable as UTF-8: the poison message, in the id and the model
    s.send(b'{"id": "bad\\ud800", "model": "m", "inputs": [[1.0]]}', partition=1)
    s.send(b'{"id": "bad-model", "model": "m\\udc00", "inputs": [[1.0]]}', partition=2)
    worker = await s.run()
    answers = {a.id: a for a in s.answers()}
    assert sorted(answers) == ["bad-model"] + [f"ok-{i}" for i in range(8)]
    for i in range(8):
        assert answers[f"ok-{i}"].ok
        np.testing.assert_allclose(answers[f"ok-{i}"].outputs, _expected(_rows(1, i)), rtol=1e-5)
    assert answers["bad-model"].error_code == "bad_request"
    assert "\\udc00" in answers["bad-model"].model  # echoed escaped, never raw
    (dead,) = s.dead_letters()
    assert dead.header(H_DLQ_SOURCE) == b"kvpipe.requests[1]@3"
    assert s.all_committed() and worker.in_flight == 0


async def test_a_result_that_cannot_be_encoded_is_answered_alone() -> None:
    """Even when encoding fails for a reason the decoder did not foresee."""
    s = Served(_settings(**{"worker.max_wait_ms": 50.0}))
    await s.publish()
    for i in range(6):
        s.request(f"r{i}", _rows(1, i))
    stop = asyncio.Event()
    worker = fake_worker(s.settings, s.broker, s.store, version_ttl_s=2.0)
    real = worker.delivery._encode

    def flaky(item: Any, result: Any) -> Any:
        if result.id == "r3":
            result.worker = "\ud800"  # a field no request controls, broken after the fact
        return real(item, result)

    worker.delivery._encode = flaky  # type: ignore[method-assign]
    async with worker:
        task = asyncio.create_task(worker.run(stop))
        for _ in range(2000):
            if s.all_committed():
                break
            await asyncio.sleep(0.01)
        stop.set()
        await task
    answers = {a.id: a for a in s.answers()}
    assert sorted(answers) == [f"r{i}" for i in range(6)]
    assert answers["r3"].error_code == "internal"
    assert all(answers[f"r{i}"].ok for i in (0, 1, 2, 4, 5))
    assert s.all_committed()


async def test_reply_to_only_into_allowed_topics() -> None:
    s = Served(_settings())
    await s.publish()
    k = s.settings.kafka
    s.broker.create("kvpipe.replies.mine", "other.team")
    cases = {
        "own": "kvpipe.replies.mine",
        "results": k.results_topic,
        "updates": k.updates_topic,
        "training": k.training_topic,
        "requests": k.requests_topic,
        "dlq": k.dlq_topic,
        "foreign": "other.team",
        "absent": "kvpipe.replies.nobody",
    }
    for rid, topic in cases.items():
        body = json.dumps({"id": rid, "model": "m", "inputs": _rows()}).encode()
        s.send(body, [("kvpipe-reply-to", topic.encode())])
    await s.run()
    mine = {a.id: a for a in s.answers("kvpipe.replies.mine")}
    assert list(mine) == ["own"] and mine["own"].ok
    results = {a.id: a for a in s.answers()}
    assert results["results"].ok
    for rid in ("updates", "training", "requests", "dlq", "foreign", "absent"):
        assert results[rid].error_code == "bad_reply_to", rid
    assert sorted(results) == sorted(set(cases) - {"own"})
    # nothing else was written anywhere, and no topic was created because a request named it
    assert s.broker.records(k.updates_topic) == s.broker.records("other.team") == []
    assert "kvpipe.replies.nobody" not in s.broker.topics


async def test_reply_to_patterns_are_configurable() -> None:
    s = Served(_settings(**{"kafka.reply_topics": ("team-a.*",)}))
    await s.publish()
    s.broker.create("team-a.inbox", "kvpipe.replies.x")
    for rid, topic in (("a", "team-a.inbox"), ("b", "kvpipe.replies.x")):
        body = json.dumps({"id": rid, "model": "m", "inputs": _rows()}).encode()
        s.send(body, [("kvpipe-reply-to", topic.encode())])
    await s.run()
    assert [a.id for a in s.answers("team-a.inbox")] == ["a"]
    assert [(a.id, a.error_code) for a in s.answers()] == [("b", "bad_reply_to")]


async def test_non_finite_outputs_are_errors_never_ok() -> None:
    """Inputs finite in float32 can still overflow the model: never an ok with nulls."""
    s = Served(_settings(**{"worker.max_wait_ms": 50.0}))
    await s.publish()
    s.send(json.dumps({"id": "huge", "model": "m", "inputs": [[3e38] * WIDTH]}).encode())
    s.request("fine", _rows(1))
    s.send(json.dumps({"id": "huge-2", "model": "m", "inputs": [[-3e38] * WIDTH] * 2}).encode())
    await s.run()
    answers = {a.id: a for a in s.answers()}
    for rid in ("huge", "huge-2"):
        assert answers[rid].status == "error" and answers[rid].version == 1
        assert answers[rid].error_code == "non_finite_output"
    assert answers["fine"].ok and np.isfinite(answers["fine"].outputs).all()


async def test_parameters_holding_nan_are_never_published() -> None:
    s = Served(_settings())
    nan_params = {k: np.array(v) for k, v in PARAMS.items()}
    nan_params["b0"][0] = np.nan
    with pytest.raises(ConfigError, match="'b0' holds NaN or infinity"):
        await s.publish("m", nan_params)
    assert await s.kv.get("t:m:current") is None


async def test_a_deleted_results_topic_is_created_again_and_nothing_is_committed_meanwhile() -> (
    None
):
    s = Served(_settings())
    await s.publish()
    k = s.settings.kafka
    del s.broker.topics[k.results_topic]
    for i in range(5):
        s.request(f"r{i}", _rows(1, i))
    worker = await s.run()
    assert sorted(a.id for a in s.answers()) == [f"r{i}" for i in range(5)]
    assert worker.stats.topics_recreated == 1 and s.all_committed()


async def test_sends_that_keep_failing_are_never_committed() -> None:
    s = Served(_settings(**{"worker.shutdown_timeout_s": 0.5}))
    await s.publish()
    k = s.settings.kafka
    s.broker.failing[k.results_topic] = RuntimeError("broker refuses")
    for i in range(5):
        s.request(f"r{i}", _rows(1, i))
    worker = await s.run(lambda w: w.stats.send_retries >= 10, timeout=10)
    assert s.broker.committed == {} and s.answers() == []
    assert worker.stats.send_retries >= 10


async def test_a_reply_topic_deleted_before_the_answer_gets_it_on_results() -> None:
    s = Served(_settings())
    await s.publish()
    s.broker.create("kvpipe.replies.gone")
    s.broker.failing["kvpipe.replies.gone"] = RuntimeError("unknown topic")
    body = json.dumps({"id": "r", "model": "m", "inputs": _rows()}).encode()
    s.send(body, [("kvpipe-reply-to", b"kvpipe.replies.gone")])

    async def delete_soon() -> None:
        await asyncio.sleep(0.05)
        del s.broker.topics["kvpipe.replies.gone"]

    deleter = asyncio.create_task(delete_soon())
    await s.run()
    await deleter
    assert [(a.id, a.error_code) for a in s.answers()] == [("r", "bad_reply_to")]
    assert s.all_committed()


# -- property: arbitrary text and bytes in every field and header ---------------------------

# every category, surrogates included, with the troublemakers drawn often
tricky = st.sampled_from(["\ud800", "\udfff", "\x00", "\n", "\x7f", "\u2028", "\ufeff", "é"])
any_text = st.text(st.one_of(st.characters(exclude_categories=()), tricky), max_size=12)
header_names = st.sampled_from(
    ["content-type", "kvpipe-id", "kvpipe-model", "kvpipe-version", "kvpipe-reply-to",
     "kvpipe-deadline", "traceparent", "x-other"]
)  # fmt: skip
header_values = st.one_of(
    st.binary(max_size=24),
    any_text.map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.sampled_from(
        [b"application/json", b"application/x-npy", b"m", b"kvpipe.results", b"kvpipe.updates",
         b"kvpipe.replies.x", b"1", b"-1", b"99999999999999999999999", b"\xff\xfe"]
    ),
)  # fmt: skip
headers = st.lists(st.tuples(header_names, header_values), max_size=4)
numbers = st.one_of(st.floats(), st.integers(), st.booleans(), st.none(), any_text)
fields = st.one_of(any_text, st.integers(), st.none(), st.just("m"), st.floats())
bodies = st.builds(
    lambda extra, body: {**extra, **body},
    st.dictionaries(any_text, fields, max_size=2),
    st.fixed_dictionaries(
        {"id": st.one_of(any_text, st.integers(), st.just("x"))},
        optional={
            "model": fields,
            "version": st.one_of(st.integers(), st.floats(), any_text, st.none()),
            "inputs": st.one_of(
                st.lists(st.lists(numbers, max_size=WIDTH + 1), max_size=3),
                st.just([[0.5] * WIDTH]),
                any_text,
                st.dictionaries(any_text, st.lists(st.lists(numbers, max_size=3)), max_size=3),
            ),
            "ids": st.lists(st.lists(st.integers(), max_size=3), max_size=2),
        },
    ),
)
values = st.one_of(
    bodies.map(lambda b: json.dumps(b, allow_nan=True).encode()),
    st.binary(max_size=64),
    st.none(),
)
messages = st.lists(st.tuples(values, headers, st.integers(0, 3)), max_size=12)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(batch=messages)
def test_every_message_gets_exactly_one_answer(
    batch: list[tuple[bytes | None, list[tuple[str, bytes]], int]],
) -> None:
    asyncio.run(_one_answer_each(batch))


async def _one_answer_each(batch: list[tuple[bytes | None, list[tuple[str, bytes]], int]]) -> None:
    s = Served(_settings(**{"worker.max_wait_ms": 2.0}))
    await s.publish()
    s.broker.create("kvpipe.replies.x")
    good: dict[str, list[list[float]]] = {}
    for i, (value, hdrs, partition) in enumerate(batch):
        s.send(value, hdrs, partition)
        rows = _rows(1, i)  # a good request after each hostile one, same partition
        good[f"good-{i}"] = rows
        s.request(f"good-{i}", rows, partition=partition)
    worker = await s.run()
    assert s.all_committed(), (s.broker.committed, worker.in_flight)
    out = [*s.broker.records("kvpipe.results"), *s.broker.records("kvpipe.replies.x")]
    dead = s.dead_letters()
    assert len(out) + len(dead) == len(s.sent), (len(out), len(dead), len(s.sent))
    sources = Counter(d.header(H_DLQ_SOURCE) for d in dead)
    assert all(n == 1 for n in sources.values())
    by_id: dict[str, list[Any]] = {}
    for r in out:
        if r.header("content-type") == b"application/json":
            orjson.loads(r.value)  # strict UTF-8 JSON, readable by any client
        res = decode_result(r.value, r.headers)
        by_id.setdefault(res.id, []).append(res)
    for rid, rows in good.items():
        (res,) = by_id[rid]
        assert res.ok, (rid, res.error_code, res.error_message)
        np.testing.assert_allclose(res.outputs, _expected(rows), rtol=1e-5)
