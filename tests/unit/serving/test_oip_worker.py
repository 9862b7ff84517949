"""V2 (Open Inference Protocol) requests through the worker's real path, Kafka and Redis
replaced at the boundary by fakes: every hostile V2 message mixed among good ones gets exactly
one answer (or dead letter), the good ones answered in V2 bodies that MLServer's types parse,
equal to numpy, and every offset committed."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.config import Settings, with_values
from pipeline.io.kv.memory import MemoryKV
from pipeline.io.oip import DATATYPES, OIP
from pipeline.params.models import preset
from pipeline.params.store import ParamStore
from tests.unit.kafka_fakes import (
    FakeBroker,
    Record,
    fake_worker,
    run_until_committed,
)

mlserver_types = pytest.importorskip("mlserver.types")
mlserver_codecs = pytest.importorskip("mlserver.codecs")

MODEL = preset("mlp")
PARAMS = MODEL.init(0)
WIDTH = MODEL.input_dim
Message = tuple[bytes | None, Sequence[tuple[str, bytes]], bytes | None]


def _settings() -> Settings:
    return with_values(
        Settings(),
        {
            "worker.max_wait_ms": 2.0,
            "worker.commit_interval_s": 0.01,
            "worker.watchdog_s": 0.0,
            "worker.shutdown_timeout_s": 5.0,
            "worker.listen_updates": False,
            "worker.topic_check_s": 0.05,
        },
    )


async def _serve(messages: Sequence[Message]) -> tuple[list[Record], list[Record]]:
    """A worker on fakes until every message is committed: (results, dead letters)."""
    settings = _settings()
    k = settings.kafka
    broker = FakeBroker()
    broker.create(k.requests_topic, k.results_topic, k.dlq_topic)
    store = ParamStore(MemoryKV(), prefix="t")
    await store.publish("m", MODEL.arch, PARAMS)
    for i, (value, headers, key) in enumerate(messages):
        broker.append(k.requests_topic, i % 3, value, headers, key=key)
    worker = fake_worker(settings, broker, store)
    async with worker:
        await run_until_committed(worker, broker, k.requests_topic)
    assert broker.all_committed(k.requests_topic), broker.committed
    return broker.records(k.results_topic), broker.records(k.dlq_topic)


def _good(rid: str, seed: int) -> tuple[Message, np.ndarray]:
    x = np.random.default_rng(seed).normal(size=(1 + seed % 3, WIDTH)).astype(np.float32)
    request = mlserver_codecs.NumpyRequestCodec.encode_request(x)
    request.id = rid
    headers = [("mlserver-model", b"m"), ("mlserver-version", b"1")]
    return (request.model_dump_json().encode(), headers, None), x


async def test_mlserver_built_requests_are_answered_in_v2_bodies_equal_to_numpy() -> None:
    messages, inputs = [], {}
    for i in range(12):
        message, x = _good(f"r{i}", i)
        messages.append(message)
        inputs[f"r{i}"] = x
    keyed, x_keyed = _good("ignored-body-id", 99)
    messages.append((keyed[0], keyed[1], b"from-key"))  # the key is the id, as in MLServer
    inputs["from-key"] = x_keyed
    results, dead = await _serve(messages)
    assert not dead and len(results) == len(inputs)
    for record in results:
        assert record.header("content-type") == OIP.encode()
        response = mlserver_types.InferenceResponse.model_validate_json(record.value)
        assert response.model_name == "m" and response.model_version == "1"
        assert record.key == (response.id or "").encode()
        got = mlserver_codecs.NumpyRequestCodec.decode_response(response)
        want = MODEL.forward(PARAMS, inputs[response.id])
        np.testing.assert_allclose(got, want, rtol=1e-5)


async def test_an_output_the_model_lacks_is_an_unknown_output_error_counted_as_one() -> None:
    x = np.zeros((1, WIDTH), np.float32)
    asked = mlserver_types.InferenceRequest(
        id="asked",
        inputs=[mlserver_codecs.NumpyCodec.encode_input("x", x)],
        outputs=[{"name": "output"}, {"name": "probabilities"}],
    )
    value = asked.model_dump_json().encode()
    settings = _settings()
    results, _ = await _serve([(value, [("mlserver-model", b"m")], None)])
    (record,) = results
    error = mlserver_types.InferenceErrorResponse.model_validate_json(record.value)
    assert "probabilities" in str(error.error) and "output" in str(error.error)
    meta = orjson.loads(record.header("kvpipe-result") or b"{}")
    assert (meta["status"], meta["error"]["code"], meta["version"]) == (
        "error",
        "unknown_output",
        1,
    )
    assert settings.kafka.results_topic == record.topic


# -- property: hostile V2 messages cost no good request its answer --------------------------

numbers = st.one_of(st.floats(), st.integers(), st.booleans(), st.none(), st.text(max_size=3))
data = st.recursive(numbers, lambda inner: st.lists(inner, max_size=WIDTH + 1), max_leaves=24)
tensor = st.fixed_dictionaries(
    {
        "name": st.one_of(st.just("x"), st.text(max_size=4), st.integers()),
        "datatype": st.one_of(st.sampled_from([*DATATYPES, "BYTES", "fp32"]), st.none()),
        "shape": st.one_of(
            st.just([1, WIDTH]), st.lists(st.integers(-1, WIDTH + 1), max_size=3), data
        ),
        "data": st.one_of(st.just([0.5] * WIDTH), data),
    },
    optional={"parameters": st.one_of(st.just({"content_type": "pd"}), numbers)},
)
body = st.fixed_dictionaries(
    {"inputs": st.one_of(st.lists(tensor, max_size=3), data)},
    optional={
        "id": st.one_of(st.text(max_size=6), st.integers()),
        "outputs": st.one_of(data, st.just([{"name": "output"}]), st.just([{"name": "nope"}])),
    },
)
header_values = st.one_of(
    st.binary(max_size=12), st.sampled_from([b"m", b"v1", b"1", b"v0.1.0", b"infer", b"\xff"])
)
headers = st.lists(
    st.tuples(
        st.sampled_from(
            ["mlserver-model", "mlserver-version", "mlserver-method", "content-type", "traceparent"]
        ),
        header_values,
    ),
    max_size=3,
)
messages = st.lists(
    st.tuples(
        st.one_of(
            body.map(lambda b: json.dumps(b, allow_nan=True).encode()), st.binary(max_size=40)
        ),
        headers.map(lambda h: [("mlserver-model", b"m"), *h]),
        st.one_of(st.none(), st.binary(max_size=6)),
    ),
    max_size=8,
)


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(batch=messages)
def test_every_v2_message_gets_exactly_one_answer(batch: list[Message]) -> None:
    asyncio.run(_one_answer_each(batch))


async def _one_answer_each(batch: list[Message]) -> None:
    sent: list[Message] = []
    good: dict[str, np.ndarray] = {}
    for i, message in enumerate(batch):
        sent.append(message)
        rid = f"good-request-{i}"  # longer than any id or key drawn above
        follower, x = _good(rid, i)
        sent.append(follower)
        good[rid] = x
    results, dead = await _serve(sent)
    assert len(results) + len(dead) == len(sent)
    answered: dict[str, list[Record]] = {}
    for record in results:
        orjson.loads(record.value)  # strict UTF-8 JSON, readable by any client
        answered.setdefault((record.key or b"").decode(), []).append(record)
    for rid, x in good.items():
        (record,) = answered[rid]
        response = mlserver_types.InferenceResponse.model_validate_json(record.value)
        got = mlserver_codecs.NumpyRequestCodec.decode_response(response)
        np.testing.assert_allclose(got, MODEL.forward(PARAMS, x), rtol=1e-5)
