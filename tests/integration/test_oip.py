"""Open Inference Protocol (V2) over Kafka against a real worker (local Redis and broker):
requests built with MLServer's own V2 types (``mlserver.types``, written by nobody here),
sent with MLServer's Kafka headers, answered with V2 bodies those types parse, outputs equal
numpy; a numpy MLP and an ONNX graph with named inputs and outputs."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from pipeline.io.kafka import Consumer, Message, Producer, ensure_topics
from pipeline.io.kv import open_kv
from pipeline.io.oip import OIP
from pipeline.params.models import preset
from pipeline.params.store import ParamStore

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
mlserver_types = pytest.importorskip("mlserver.types")
mlserver_codecs = pytest.importorskip("mlserver.codecs")

from tests.onnx_graphs import two_input_model, two_input_reference  # noqa: E402

pytestmark = pytest.mark.integration

NumpyCodec = mlserver_codecs.NumpyCodec
InferenceRequest = mlserver_types.InferenceRequest
InferenceResponse = mlserver_types.InferenceResponse
InferenceErrorResponse = mlserver_types.InferenceErrorResponse


async def _read(settings: Any, want: int, timeout_s: float = 60.0) -> dict[bytes, Message]:
    """The results topic from its start until ``want`` distinct keys came."""
    k = settings.kafka
    got: dict[bytes, Message] = {}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    async with Consumer(k, [k.results_topic], group_id=None, assign_from="start") as consumer:
        while len(got) < want and loop.time() < deadline:
            for m in await consumer.getmany(timeout_ms=200, max_records=1000):
                got.setdefault(m.key or b"", m)
    return got


async def test_v2_requests_built_with_mlserver_types_are_answered_equal_to_numpy(
    make_settings: Any, start_worker: Any
) -> None:
    settings = make_settings()
    k = settings.kafka
    mlp = preset("mlp")
    mlp_params = mlp.init(4)
    onnx_model, w = two_input_model(8)
    async with open_kv(settings.redis) as kv:
        store = ParamStore(kv, prefix=settings.redis.key_prefix)
        await store.publish("mlp", mlp.arch, mlp_params)
        await store.publish_onnx("two", onnx_model.SerializeToString())
    await ensure_topics(k, [k.requests_topic, k.results_topic, k.dlq_topic, k.updates_topic])
    await start_worker(settings)
    rng = np.random.default_rng(9)
    want_mlp: dict[str, np.ndarray] = {}
    want_two: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    async with Producer(k) as producer:
        for i in range(20):
            rid = f"mlp-{i}"
            x = rng.standard_normal((1 + i % 4, mlp.input_dim)).astype(np.float32)
            request = InferenceRequest(
                id=rid, inputs=[NumpyCodec.encode_input("input-0", x)], outputs=[{"name": "output"}]
            )
            headers = [("mlserver-model", b"mlp"), ("mlserver-version", b"1")]
            await producer.send(
                k.requests_topic, request.model_dump_json().encode(), headers=headers
            )
            want_mlp[rid] = mlp.forward(mlp_params, x)
        for i in range(20):
            rid = f"two-{i}"
            rows = 1 + i % 3
            features = rng.standard_normal((rows, 16)).astype(np.float32)
            bucket = rng.integers(0, 16, (rows, 1)).astype(np.int64)
            request = InferenceRequest(
                id=rid,
                inputs=[
                    NumpyCodec.encode_input("features", features),
                    NumpyCodec.encode_input("bucket", bucket),
                ],
            )
            headers = [("mlserver-model", b"two")]  # the serving version
            # MLServer's rule: the message key, when there is one, is the id
            await producer.send(
                k.requests_topic,
                request.model_dump_json().encode(),
                key=rid.encode(),
                headers=headers,
            )
            want_two[rid] = (features, bucket)
        wrong = InferenceRequest(
            id="wrong-width",
            inputs=[NumpyCodec.encode_input("x", np.ones((1, 3), np.float32))],
        )
        await producer.send(
            k.requests_topic, wrong.model_dump_json().encode(), headers=[("mlserver-model", b"mlp")]
        )
    got = await _read(settings, len(want_mlp) + len(want_two) + 1)
    assert len(got) == len(want_mlp) + len(want_two) + 1, sorted(got)
    for rid, want in want_mlp.items():
        message = got[rid.encode()]
        assert dict(message.headers)["content-type"] == OIP.encode()
        response = InferenceResponse.model_validate_json(message.value or b"")
        assert (response.id, response.model_name, response.model_version) == (rid, "mlp", "1")
        (output,) = response.outputs
        assert output.name == "output"
        np.testing.assert_allclose(NumpyCodec.decode_output(output), want, rtol=1e-5)
    for rid, (features, bucket) in want_two.items():
        response = InferenceResponse.model_validate_json(got[rid.encode()].value or b"")
        outputs = {o.name: o for o in response.outputs}
        assert {n: str(o.datatype) for n, o in outputs.items()} == {
            "label": "INT64",
            "scores": "FP32",
        }
        label, scores = two_input_reference(w, features, bucket)
        assert NumpyCodec.decode_output(outputs["label"]).tolist() == label.tolist()
        assert np.abs(NumpyCodec.decode_output(outputs["scores"]) - scores).max() < 1e-5
    error = InferenceErrorResponse.model_validate_json(got[b"wrong-width"].value or b"")
    assert error.error is not None and "columns" in error.error
    print(
        f"V2 over kafka: {len(want_mlp)} numpy-MLP and {len(want_two)} ONNX requests built with "
        "mlserver.types, every response parsed by them, outputs equal numpy"
    )
