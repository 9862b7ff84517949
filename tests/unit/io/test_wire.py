"""Request and result codecs: round trips and the three outcomes of decoding."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.cache.cache import Source
from pipeline.config import LimitSettings
from pipeline.errors import UnreadableMessage
from pipeline.io.npy import to_npy
from pipeline.io.wire import (
    H_CONTENT_TYPE,
    H_ID,
    H_MODEL,
    NPY,
    CacheSource,
    Result,
    Status,
    decode_request,
    decode_result,
    encode_request,
    encode_result,
)

LIMITS = LimitSettings(max_request_bytes=100_000, max_elements=1000, max_rows=50)


def test_json_request_round_trip() -> None:
    value, headers = encode_request(
        id="r1", model="m", inputs=[[1.0, 2.0]], version=3, reply_to="replies", deadline_ms=123
    )
    req = decode_request(value, headers, LIMITS)
    assert (req.id, req.model, req.version, req.reply_to, req.deadline_ms) == (
        "r1",
        "m",
        3,
        "replies",
        123,
    )
    assert req.error is None and req.inputs is not None
    assert req.inputs.dtype == np.float32 and req.inputs.tolist() == [[1.0, 2.0]]


def test_npy_request_round_trip() -> None:
    x = np.arange(6, dtype=np.float64).reshape(2, 3)
    value, headers = encode_request(id="r2", model="m", inputs=x, content_type=NPY)
    req = decode_request(value, headers, LIMITS)
    assert req.content_type == NPY and req.inputs is not None
    assert req.inputs.tolist() == x.tolist()


@pytest.mark.parametrize(
    ("value", "code"),
    [
        (b"\xff\xfe not utf8", "unreadable"),
        (b"{truncated", "unreadable"),
        (b"[1, 2]", "unreadable"),
        (b'{"model": "m", "inputs": [[1]]}', "missing_id"),
        (b'{"id": 5, "model": "m", "inputs": [[1]]}', "missing_id"),
        (b"[" * 100_000 + b"]" * 100_000, "too_large"),
        (b"[" * 20_000 + b"]" * 20_000, "unreadable"),
    ],
)
def test_unreadable_messages_go_to_the_dlq(value: bytes, code: str) -> None:
    with pytest.raises(UnreadableMessage) as info:
        decode_request(value, [], LIMITS)
    assert info.value.code == code


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"id": "x", "inputs": [[1]]}, "bad_request"),
        ({"id": "x", "model": "m"}, "bad_request"),
        ({"id": "x", "model": "m", "version": -1, "inputs": [[1]]}, "bad_request"),
        ({"id": "x", "model": "m", "inputs": [[1, 2], [3]]}, "bad_shape"),
        ({"id": "x", "model": "m", "inputs": [1, 2]}, "bad_shape"),
        ({"id": "x", "model": "m", "inputs": []}, "bad_shape"),
        ({"id": "x", "model": "m", "inputs": [["a", "b"]]}, "bad_dtype"),
        ({"id": "x", "model": "m", "inputs": [[True]]}, "bad_dtype"),
        ({"id": "x", "model": "m", "inputs": [[1e39]]}, "non_finite"),
        ({"id": "x", "model": "m", "inputs": [[0.0]] * 51}, "too_large"),
        ({"id": "x", "model": "m", "inputs": [[0.0] * 1001]}, "too_large"),
    ],
)
def test_wrong_requests_get_an_error_code(body: dict[str, object], code: str) -> None:
    req = decode_request(json.dumps(body).encode(), [], LIMITS)
    assert req.id == "x"
    assert req.error is not None and req.error.code == code


def test_nan_in_json_is_non_finite() -> None:
    req = decode_request(b'{"id":"x","model":"m","inputs":[[NaN]]}', [], LIMITS)
    assert req.error is not None and req.error.code == "non_finite"


def test_npy_problems() -> None:
    with pytest.raises(UnreadableMessage, match="request id"):
        decode_request(to_npy(np.zeros((1, 2))), [(H_CONTENT_TYPE, NPY.encode())], LIMITS)
    base = [(H_CONTENT_TYPE, NPY.encode()), (H_ID, b"i"), (H_MODEL, b"m")]
    assert decode_request(b"junk", base, LIMITS).error.code == "bad_input"  # type: ignore[union-attr]
    big = to_npy(np.zeros((10, 200), dtype=np.float32))
    assert decode_request(big, base, LIMITS).error.code == "too_large"  # type: ignore[union-attr]


def test_unknown_content_type_and_tombstone() -> None:
    with pytest.raises(UnreadableMessage, match="content-type"):
        decode_request(b"x", [(H_CONTENT_TYPE, b"text/csv")], LIMITS)
    with pytest.raises(UnreadableMessage, match="tombstone"):
        decode_request(None, [], LIMITS)


def test_named_inputs_round_trip_with_their_dtypes() -> None:
    value, headers = encode_request(
        id="n1",
        model="m",
        inputs={
            "features": np.ones((2, 3), np.float32),
            "bucket": [[4], [7]],
            "img": np.zeros((2, 1, 2, 2)),
        },
    )
    req = decode_request(value, headers, LIMITS)
    assert req.error is None and req.inputs is None and req.named is not None and req.rows == 2
    assert list(req.named) == ["features", "bucket", "img"]
    assert req.named["features"].dtype == np.float64  # until the model packs it
    assert req.named["bucket"].dtype == np.int64 and req.named["bucket"].tolist() == [[4], [7]]
    assert req.named["img"].shape == (2, 1, 2, 2)
    with pytest.raises(ValueError, match="JSON"):
        encode_request(id="n2", model="m", inputs={"a": [[1.0]]}, content_type=NPY)


@pytest.mark.parametrize(
    ("inputs", "code"),
    [
        ({}, "bad_request"),
        ({"": [[1.0]]}, "bad_request"),
        ({"a": [[1.0]], "b": [[1.0], [2.0]]}, "bad_shape"),
        ({"a": [["x"]]}, "bad_dtype"),
        ({"a": [[True]]}, "bad_dtype"),
        ({"a": 3.0}, "bad_shape"),
        ({"a": [[]]}, "bad_shape"),
        ({"a": [[1.0], [2.0, 3.0]]}, "bad_shape"),
        ({"a": [[float("nan")]]}, "non_finite"),
        ({"a": [[0.0] * 600], "b": [[0.0] * 600]}, "too_large"),
        ({f"i{k}": [[1.0]] for k in range(65)}, "too_large"),
        ({"a": [[2**64 - 1]]}, "bad_input"),
    ],
)
def test_named_inputs_that_are_wrong_get_an_error_code(inputs: object, code: str) -> None:
    value = json.dumps({"id": "x", "model": "m", "inputs": inputs}).encode()
    req = decode_request(value, [], LIMITS)
    assert req.error is not None and req.error.code == code, req.error


def test_named_outputs_round_trip_in_json() -> None:
    res = Result(
        id="a",
        model="m",
        status=Status.OK,
        outputs=np.array([[3.0, 0.1, 0.9]], dtype=np.float32),
        named={"label": np.array([3]), "p": np.array([[0.1, 0.9]], np.float32)},
    )
    back = decode_result(*encode_result(res))
    assert back.named is not None and back.named["label"].tolist() == [3]
    assert np.allclose(back.named["p"], [[0.1, 0.9]])
    assert json.loads(encode_result(res)[0])["named_outputs"]["label"] == [3]
    as_json = res.to_json()["named_outputs"]
    assert as_json["label"] == [3] and np.allclose(as_json["p"], [[0.1, 0.9]])


def test_result_round_trips_json_and_npy() -> None:
    res = Result(
        id="a",
        model="m",
        status="ok",
        version=2,
        outputs=np.array([[0.5, 1.5]], dtype=np.float32),
        cache="hit",
        timings={"total_ms": 1.0},
    )
    for ctype in ("application/json", NPY):
        value, headers = encode_result(res, ctype)
        back = decode_result(value, headers)
        assert back.meta() == res.meta()
        assert back.outputs is not None and back.outputs.tolist() == [[0.5, 1.5]]


def test_error_result_round_trip() -> None:
    res = Result(
        id="a", model="m", status="error", error_code="unknown_model", error_message="no such model"
    )
    back = decode_result(*encode_result(res))
    assert (back.ok, back.error_code, back.outputs) == (False, "unknown_model", None)


def test_status_and_cache_are_enums_that_decode_as_enums() -> None:
    res = Result(
        id="a",
        model="m",
        status=Status.OK,
        version=2,
        outputs=np.array([[0.5, 1.5]], dtype=np.float32),
        cache=CacheSource.MEMO,
        worker="w1",
        timings={"total_ms": 1.0},
    )
    for ctype in ("application/json", NPY):
        back = decode_result(*encode_result(res, ctype))
        assert back.status is Status.OK and back.cache is CacheSource.MEMO and back.ok
        assert back.meta() == res.meta()
    err = decode_result(*encode_result(Result(id="b", model="m", status=Status.ERROR)))
    assert err.status is Status.ERROR and err.cache is None and not err.ok
    assert err.status == "error" and f"{err.status}" == "error"  # still compares as text


def test_enum_results_encode_to_the_same_bytes_as_before() -> None:
    """The wire format did not move: golden bytes from the plain-string ``Result``."""
    res = Result(
        id="a",
        model="m",
        status=Status.OK,
        version=2,
        outputs=np.array([[0.5, 1.5]], dtype=np.float32),
        cache=CacheSource.MEMO,
        worker="w1",
        timings={"total_ms": 1.0},
    )
    meta = (
        b'{"id":"a","model":"m","version":2,"status":"ok","error":null,"cache":"memo",'
        b'"stale":false,"worker":"w1","timings":{"total_ms":1.0}'
    )
    assert encode_result(res)[0] == meta + b',"outputs":[[0.5,1.5]]}'
    assert dict(encode_result(res, NPY)[1])["kvpipe-result"] == meta + b"}"
    err = Result(id="a", model="m", status=Status.ERROR, error_code="x", error_message="y")
    assert encode_result(err)[0] == (
        b'{"id":"a","model":"m","version":null,"status":"error","error":{"code":"x",'
        b'"message":"y"},"cache":null,"stale":false,"worker":"","timings":{},"outputs":null}'
    )
    assert json.loads(encode_result(res)[0])["status"] == "ok"


def test_every_parameter_cache_source_is_a_result_cache_value() -> None:
    assert {CacheSource(s) for s in Source} == {
        CacheSource.HIT,
        CacheSource.LOADED,
        CacheSource.STALE,
    }
    assert CacheSource(Source.STALE) is CacheSource.STALE


@pytest.mark.parametrize(
    "meta",
    [
        {"id": "a", "status": "maybe"},
        {"id": "a", "status": "ok", "cache": "warm"},
        {"id": "a", "status": ["ok"]},
    ],
)
def test_unknown_status_or_cache_is_not_a_result(meta: dict[str, object]) -> None:
    with pytest.raises(UnreadableMessage, match="not a kvpipe result"):
        decode_result(json.dumps(meta).encode(), [])
