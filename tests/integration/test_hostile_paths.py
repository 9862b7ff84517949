"""Hostile messages on the newer request paths (V2 bodies with MLServer's headers, named ONNX
inputs, generation requests, trace headers) against a worker on the real local Redis and
broker: each gets exactly one final answer with its stable code, the good ones beside them are
answered right, nothing is dead-lettered that had an id, and every offset is committed."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import numpy as np
import pytest

from pipeline.io.kafka import Producer, ensure_topics
from pipeline.io.kv import open_kv
from pipeline.io.oip import OIP
from pipeline.io.stream import decode_stream
from pipeline.io.wire import decode_result
from pipeline.params.models import preset
from pipeline.params.store import ParamStore
from tests.integration.test_hostile_worker import _committed_vs_end
from tests.integration.test_worker import read_all

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from tests.onnx_graphs import two_input_model, two_input_reference

pytestmark = pytest.mark.integration

PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
FEATURES = np.random.default_rng(2).normal(size=(1, 16)).round(3).tolist()


def _v2(tensors: list[dict[str, Any]], **extra: Any) -> bytes:
    return json.dumps({"inputs": tensors, **extra}).encode()


def _t(name: str, datatype: str, shape: list[int], data: Any, **extra: Any) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape, "data": data, **extra}


#: id -> (value, headers, the code of its final answer: None when it is answered ok)
CASES: dict[str, tuple[bytes, list[tuple[str, bytes]], str | None]] = {
    # V2: the key is the id; the model and version come in MLServer's headers
    "v2-bytes": (_v2([_t("x", "BYTES", [1, 1], ["a"])]), [], "unsupported_datatype"),
    "v2-huge-shape": (_v2([_t("x", "FP32", [10**9, 10**9], [1.0])]), [], "too_large"),
    "v2-negative": (_v2([_t("x", "FP32", [-1, 32], [1.0] * 32)]), [], "bad_shape"),
    "v2-zero": (_v2([_t("x", "FP32", [0, 32], [])]), [], "bad_shape"),
    "v2-short-data": (_v2([_t("x", "FP32", [2, 32], [1.0] * 32)]), [], "bad_shape"),
    "v2-twice": (
        _v2([_t("x", "FP32", [1, 32], [1.0] * 32), _t("x", "FP32", [1, 32], [1.0] * 32)]),
        [],
        "bad_request",
    ),
    "v2-fp16-overflow": (_v2([_t("x", "FP16", [1, 32], [1e6] * 32)]), [], "non_finite"),
    "v2-past-int64": (_v2([_t("x", "INT64", [1, 32], [2**63] * 32)]), [], "bad_input"),
    "v2-binary": (
        _v2([_t("x", "FP32", [1, 32], [], parameters={"binary_data_size": 128})]),
        [],
        "bad_request",
    ),
    "v2-pandas": (
        _v2([_t("x", "FP32", [1, 32], [1.0] * 32)], parameters={"content_type": "pd"}),
        [],
        "unsupported_content_type",
    ),
    "v2-no-output": (
        _v2([_t("x", "FP32", [1, 32], [0.5] * 32)], outputs=[{"name": "nope"}]),
        [],
        "unknown_output",
    ),
    "v2-method": (
        _v2([_t("x", "FP32", [1, 32], [0.5] * 32)]),
        [("mlserver-method", b"load")],
        "bad_request",
    ),
    "v2-good": (_v2([_t("x", "FP32", [1, 32], [0.5] * 32)]), [("mlserver-version", b"v1")], None),
    # generation
    "gen-long": (b'{"prompt": "' + b"x" * 600 + b'", "model": "gpt"}', [], "context_too_long"),
    "gen-dense-model": (b'{"prompt": "hi", "model": "mlp"}', [], "not_generative"),
    "gen-nan": (
        b'{"prompt": "hi", "model": "gpt", "sampling": {"temperature": NaN}}',
        [],
        "bad_sampling",
    ),
    "gen-top-p": (
        b'{"prompt": "hi", "model": "gpt", "sampling": {"top_p": 0.9}}',
        [],
        "bad_sampling",
    ),
    "gen-surrogate": (b'{"prompt": "\\ud800", "model": "gpt"}', [], "bad_text"),
    "gen-ids": (b'{"prompt": [0, 256], "model": "gpt"}', [], "bad_prompt"),
    "gen-stops": (
        json.dumps({"prompt": "hi", "model": "gpt", "stop": ["a"] * 10_000}).encode(),
        [],
        "bad_stop",
    ),
    "gen-max": (b'{"prompt": "hi", "model": "gpt", "max_tokens": 1e400}', [], "bad_max_tokens"),
    "gen-late": (
        b'{"prompt": "hi", "model": "gpt"}',
        [("kvpipe-deadline", b"1")],
        "deadline_exceeded",
    ),
    "gen-good": (b'{"prompt": "hi", "model": "gpt", "max_tokens": 3}', [], None),
    # named inputs
    "named-missing": (
        json.dumps({"model": "two", "inputs": {"features": FEATURES}}).encode(),
        [],
        "bad_input",
    ),
    "named-fraction": (
        json.dumps({"model": "two", "inputs": {"features": FEATURES, "bucket": [[0.5]]}}).encode(),
        [],
        "bad_dtype",
    ),
    "named-good": (
        json.dumps({"model": "two", "inputs": {"features": FEATURES, "bucket": [[7]]}}).encode(),
        [("traceparent", b"00-" + b"0" * 200), ("tracestate", b"x" * 5000)],  # dropped, no harm
        None,
    ),
    "traced-good": (
        json.dumps({"model": "mlp", "inputs": [[0.5] * 32]}).encode(),
        [("traceparent", PARENT.encode()), ("tracestate", b"\xff" * 10)],
        None,
    ),
}


async def test_hostile_messages_on_the_new_paths_each_get_one_final_answer(
    make_settings: Any, start_worker: Any
) -> None:
    settings = make_settings(worker__max_wait_ms=5.0)
    k = settings.kafka
    mlp, gen = preset("mlp"), preset("gen-tiny")
    mlp_params = mlp.init(1)
    graph, w = two_input_model(3)
    async with open_kv(settings.redis) as kv:
        store = ParamStore(kv, prefix=settings.redis.key_prefix)
        await store.publish("mlp", mlp.arch, mlp_params)
        await store.publish("gpt", gen.arch, gen.init(0))
        await store.publish_onnx("two", graph.SerializeToString())
    await ensure_topics(k, [k.requests_topic, k.results_topic, k.dlq_topic, k.updates_topic])
    running = await start_worker(settings)
    async with Producer(k) as producer:
        for rid, (value, headers, _) in CASES.items():
            if rid.startswith("v2-"):
                headers = [("mlserver-model", b"mlp"), *headers]
                await producer.send(k.requests_topic, value, key=rid.encode(), headers=headers)
                continue
            raw = value.replace(b"{", b'{"id": "%s", ' % rid.encode(), 1)
            await producer.send(k.requests_topic, raw, key=rid.encode(), headers=headers)
    messages: list[Any] = []
    finals: dict[str, list[Any]] = {}
    for _ in range(30):  # generation streams add progress messages: read until every final
        messages = await read_all(settings, k.results_topic, want=len(messages) + 1, timeout=5)
        finals = {}
        for m in messages:
            if dict(m.headers).get("content-type") == OIP.encode():
                result = decode_result(m.value, m.headers)
                finals.setdefault(result.id, []).append(result)
                continue
            message = decode_stream(m.value)
            assert message is not None, m.value[:200]
            if message.final:
                finals.setdefault(message.id, []).append(message)
        if len(finals) >= len(CASES):
            break
    await running.stop()
    assert Counter({rid: len(v) for rid, v in finals.items()}) == Counter(dict.fromkeys(CASES, 1))
    for rid, (_, _, code) in CASES.items():
        (final,) = finals[rid]
        assert final.error_code == code, (rid, final.error_code, final.error_message)
    assert await read_all(settings, k.dlq_topic, want=1, timeout=1) == []
    named = decode_result(
        next(m.value for m in messages if m.key == b"named-good"),
        next(m.headers for m in messages if m.key == b"named-good"),
    )
    label, scores = two_input_reference(w, np.asarray(FEATURES), np.array([[7]]))
    assert named.named is not None
    np.testing.assert_allclose(named.named["scores"], scores, rtol=1e-4, atol=1e-5)
    assert named.named["label"].tolist() == label.tolist()
    traced = [m for m in messages if m.key == b"traced-good"]
    assert next(dict(m.headers).get("traceparent") for m in traced) is not None
    assert all("tracestate" not in dict(m.headers) for m in traced)  # not printable: dropped
    named_headers = dict(next(m.headers for m in messages if m.key == b"named-good"))
    assert "traceparent" not in named_headers and "tracestate" not in named_headers
    offsets = await _committed_vs_end(settings, len(CASES))
    assert all(c == end for c, end in offsets.values()), offsets
