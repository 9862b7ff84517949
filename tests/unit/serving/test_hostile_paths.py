"""Hostile and careless clients on the newer request paths (named ONNX inputs, generation
requests, dedupe by id), through the worker's real path with Kafka and Redis replaced at the
boundary by fakes: every message gets exactly one final answer (or a dead letter) with a
stable code, never ``internal``; the good requests beside them are answered correctly; every
offset is committed."""

from __future__ import annotations

import asyncio
import json
import math
from collections import Counter
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.io.stream import GENERATION_CODES, decode_stream
from pipeline.io.wire import decode_result
from pipeline.params.models import preset
from pipeline.serving.dedupe import Dedupe
from tests.unit.kafka_fakes import fake_worker, run_until_committed
from tests.unit.serving.test_worker import Served, _expected, _rows, _settings

GEN = preset("gen-tiny")
GEN_PARAMS = GEN.init(0)
#: Codes a generation request may end with when the client got it wrong (never ``internal``).
CLIENT_CODES = {*GENERATION_CODES, "bad_request", "unknown_model", "unknown_version"}


# -- generation bodies: whatever a client sends, one final answer with a client's code ------

prompts = st.one_of(
    st.text(max_size=6),
    st.sampled_from(["\ud800", "x" * 600, "", "héllo", "\x00"]),
    st.lists(st.one_of(st.integers(-2, 300), st.booleans(), st.floats(0, 3)), max_size=5),
    st.none(),
    st.integers(),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
)
max_tokens = st.one_of(
    st.integers(-1, 4),
    st.sampled_from([4096, 4097, 10**30, 1.5, 2.0, True, "3", None, 505, 511]),
)
# Temperatures in (0, 1e-300] are left out: they are defect report item 7 (internal error).
temperatures = st.one_of(
    st.sampled_from([0, 0.0, 0.5, 1, 10, 10.5, -0.1, math.nan, math.inf, -math.inf, True, "1"]),
    st.floats(1e-3, 10.0),
)
sampling = st.one_of(
    st.none(),
    st.fixed_dictionaries(
        {},
        optional={
            "temperature": temperatures,
            "top_k": st.one_of(st.integers(-2, 300), st.sampled_from([2**21, 1.5, True])),
            "seed": st.one_of(st.integers(-1, 2**64), st.sampled_from([1.5, "7"])),
            "top_p": st.floats(-1, 2),
        },
    ),
    st.sampled_from([[1], "hot", 3]),
)
stops = st.one_of(
    st.none(),
    st.text(max_size=3),
    st.lists(st.text(max_size=3), max_size=6),
    st.sampled_from([["\ud800"], ["s" * 65], ["a"] * 10_000, [1], {"a": 1}]),
)
generation_bodies = st.fixed_dictionaries(
    {"prompt": prompts},
    optional={
        "model": st.sampled_from(["gpt", "m", "nope", "", "gpt" * 100]),
        "max_tokens": max_tokens,
        "sampling": sampling,
        "stop": stops,
        "version": st.sampled_from([1, 2, 0, -1, "1", None, 2**64]),
        "inputs": st.just([[0.5]]),
    },
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(batch=st.lists(generation_bodies, min_size=1, max_size=6))
def test_every_generation_body_gets_one_final_answer_with_a_clients_code(
    batch: list[dict[str, Any]],
) -> None:
    asyncio.run(_one_final_each(batch))


async def _one_final_each(batch: list[dict[str, Any]]) -> None:
    s = Served(_settings(**{"worker.max_wait_ms": 2.0}))
    await s.publish()
    await s.store.publish("gpt", GEN.arch, GEN_PARAMS)
    good: dict[str, Any] = {}
    for i, body in enumerate(batch):
        body = {"id": f"hostile-{i}", "model": "gpt", **body}
        s.send(json.dumps(body, allow_nan=True).encode(), partition=i % 3)
        rows = _rows(1, i)  # a good dense request after each, same partition
        good[f"good-{i}"] = rows
        s.request(f"good-{i}", rows, partition=i % 3)
    s.send(json.dumps({"id": "gen-ok", "model": "gpt", "prompt": "hi", "max_tokens": 2}).encode())
    worker = await s.run(timeout=60)
    assert s.all_committed(), (s.broker.committed, worker.in_flight)
    assert s.dead_letters() == []  # every body had a usable id
    finals: dict[str, list[Any]] = {}
    for record in s.broker.records(s.settings.kafka.results_topic):
        message = decode_stream(record.value)
        assert message is not None, record.value[:200]
        if message.final:
            finals.setdefault(message.id, []).append(message)
    assert Counter({k: len(v) for k, v in finals.items()}) == Counter(
        dict.fromkeys([*(f"hostile-{i}" for i in range(len(batch))), *good, "gen-ok"], 1)
    )
    for i in range(len(batch)):
        (final,) = finals[f"hostile-{i}"]
        assert final.ok or final.error_code in CLIENT_CODES, (final.error_code, final.error_message)
        assert final.error_message is None or "\n" not in final.error_message
    assert finals["gen-ok"][0].ok
    dense = {
        result.id: result
        for record in s.broker.records(s.settings.kafka.results_topic)
        if (result := decode_result(record.value, record.headers)).id in good
    }
    for rid, rows in good.items():
        result = dense[rid]
        assert result.ok, (rid, result.error_code, result.error_message)
        assert result.outputs is not None
        np.testing.assert_allclose(result.outputs, _expected(rows), rtol=1e-5)


# -- named ONNX inputs: every wrong body gets its own code, the good ones their outputs -----

onnx = pytest.importorskip("onnx")
from tests.onnx_graphs import two_input_model, two_input_reference  # noqa: E402

FEATURES = np.random.default_rng(3).normal(size=(2, 16)).round(3)
NAMED_CASES: dict[str, tuple[Any, str]] = {
    "missing": ({"features": FEATURES.tolist()}, "bad_input"),
    "extra": (
        {"features": FEATURES.tolist(), "bucket": [[1], [2]], "zzz": [[1], [1]]},
        "bad_input",
    ),
    "too-wide": ({"features": [[0.5] * 17] * 2, "bucket": [[1], [2]]}, "bad_shape"),
    "too-deep": ({"features": FEATURES.tolist(), "bucket": [[[1]], [[2]]]}, "bad_shape"),
    "fractions": ({"features": FEATURES.tolist(), "bucket": [[1.5], [2]]}, "bad_dtype"),
    "past-2**53": ({"features": FEATURES.tolist(), "bucket": [[2**60], [1]]}, "bad_input"),
    "past-float32": ({"features": [[1e39] * 16] * 2, "bucket": [[1], [2]]}, "non_finite"),
    "float-past-int64": ({"features": FEATURES.tolist(), "bucket": [[1e19], [1]]}, "bad_input"),
    # the graph itself refuses these (Gather out of range): only their own request fails
    "index-out-of-range": ({"features": FEATURES.tolist(), "bucket": [[99], [1]]}, "bad_input"),
    "negative-index": ({"features": FEATURES.tolist(), "bucket": [[-100], [1]]}, "bad_input"),
    "rows-differ": ({"features": FEATURES.tolist(), "bucket": [[1]]}, "bad_shape"),
    "strings": ({"features": [["a"] * 16] * 2, "bucket": [[1], [2]]}, "bad_dtype"),
    "nulls": ({"features": [[None] * 16] * 2, "bucket": [[1], [2]]}, "bad_dtype"),
    "ragged": ({"features": [[0.5] * 16, [0.5]], "bucket": [[1], [2]]}, "bad_shape"),
    "empty": ({"features": [], "bucket": []}, "bad_shape"),
    "scalar": ({"features": 3, "bucket": 1}, "bad_shape"),
    "nothing": ({}, "bad_request"),
    "too-many": ({f"in{i}": [[1]] for i in range(65)}, "too_large"),
    "long-name": ({"n" * 300: [[1]]}, "bad_request"),
    "deep": ({"features": [[[[[[[[[[0.5]]]]]]]]]], "bucket": [[1]]}, "bad_shape"),
    "unnamed": (FEATURES.tolist(), "bad_request"),
}


async def test_wrong_named_inputs_get_their_codes_and_cost_no_neighbour_its_answer() -> None:
    s = Served(_settings(**{"worker.max_wait_ms": 50.0}))  # one batch for all of them
    await s.publish()
    graph, w = two_input_model()
    await s.store.publish_onnx("two", graph.SerializeToString())
    buckets = np.array([[3], [15]])
    good = {"bucket": buckets.tolist(), "features": FEATURES.tolist()}
    for rid, (inputs, _) in NAMED_CASES.items():
        s.send(json.dumps({"id": rid, "model": "two", "inputs": inputs}).encode())
        s.send(json.dumps({"id": f"good-{rid}", "model": "two", "inputs": good}).encode())
    # a name that is not Unicode, and named inputs to a model that takes one unnamed input
    s.send(b'{"id": "surrogate", "model": "two", "inputs": {"\\ud800": [[1]]}}')
    s.send(json.dumps({"id": "to-mlp", "model": "m", "inputs": {"x": _rows()}}).encode())
    await s.run(timeout=60)
    assert s.all_committed() and s.dead_letters() == []
    answers = Counter(a.id for a in s.answers())
    assert set(answers.values()) == {1} and len(answers) == 2 * len(NAMED_CASES) + 2
    by_id = {a.id: a for a in s.answers()}
    for rid, (_, code) in NAMED_CASES.items():
        assert by_id[rid].error_code == code, (rid, by_id[rid].error_message)
        assert "\n" not in (by_id[rid].error_message or "")
    assert by_id["surrogate"].error_code == "bad_request"
    assert by_id["to-mlp"].error_code == "bad_request"
    label, scores = two_input_reference(w, FEATURES, buckets)
    for rid in NAMED_CASES:
        answer = by_id[f"good-{rid}"]
        assert answer.ok and answer.named is not None, (answer.error_code, answer.error_message)
        np.testing.assert_allclose(answer.named["scores"], scores, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(answer.named["label"], label)


# -- dedupe with hostile ids: near-identical ids are different requests ---------------------

#: Recorded first; then each is sent again beside its look-alikes, which are new requests.
FIRST_IDS = ["é", "id", "*", "a:b:c", "i" * 256, "\x00"]
LOOK_ALIKES = [
    "e\u0301",  # the same text decomposed
    "É",
    "ID",
    "id ",
    " id",
    "?",
    "[a-z]",
    "a:b",
    "{a:b:c}",
    "i" * 255,
    "\u2028",
    "\x00\x00",
]


async def _serve_with(s: Served, dedupe: Dedupe) -> None:
    worker = fake_worker(s.settings, s.broker, s.store, version_ttl_s=2.0, dedupe=dedupe)
    async with worker:
        await run_until_committed(worker, s.broker, s.settings.kafka.requests_topic)


async def test_dedupe_tells_look_alike_ids_apart_and_skips_only_exact_repeats() -> None:
    s = Served(_settings())
    await s.publish()
    dedupe = Dedupe(s.kv, key_prefix="t", topic="kvpipe.requests", group="g", ttl_s=60.0)
    for i, rid in enumerate(FIRST_IDS):
        s.request(rid, _rows(1, i), partition=i % 3)
    s.request("i" * 257, _rows(), partition=0)  # over the limit: dead-lettered, not recorded
    await _serve_with(s, dedupe)
    assert Counter(a.id for a in s.answers()) == Counter(FIRST_IDS)
    assert all(a.ok for a in s.answers()) and len(s.dead_letters()) == 1
    # the recorded ids again (a redelivery, as dedupe sees it) beside their look-alikes
    for i, rid in enumerate([*FIRST_IDS, *LOOK_ALIKES]):
        s.request(rid, _rows(1, i), partition=i % 3)
    await _serve_with(s, dedupe)
    assert s.all_committed()
    assert Counter(a.id for a in s.answers()) == Counter([*FIRST_IDS, *LOOK_ALIKES])
    assert len(s.dead_letters()) == 1 and dedupe.stats.skipped == len(FIRST_IDS)


async def test_dedupe_answers_a_corrected_resend_under_the_same_id() -> None:
    """An error answer recorded under an id does not swallow the client's corrected request
    (another message under that id), nor can a stranger's message claim the id first."""
    s = Served(_settings())
    await s.publish()
    dedupe = Dedupe(s.kv, key_prefix="t", topic="kvpipe.requests", group="g", ttl_s=60.0)
    s.request("req-1", [[1.0, 2.0]])  # the wrong width: bad_shape, recorded as answered
    s.request("claimed", _rows(1, 7))  # a stranger's request, first
    await _serve_with(s, dedupe)
    assert [a.error_code for a in s.answers()] == ["bad_shape", None]
    s.request("req-1", _rows(1, 1))  # corrected
    s.request("claimed", _rows(1, 8))  # the owner's own request under the claimed id
    await _serve_with(s, dedupe)
    assert s.all_committed()
    answers = [a for a in s.answers() if a.ok]
    assert sorted(a.id for a in answers) == ["claimed", "claimed", "req-1"]
    assert dedupe.stats.skipped == 0
