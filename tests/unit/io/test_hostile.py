"""Hostile and malformed input: every message is a Request, an error-coded Request, or an
UnreadableMessage for the DLQ — never another exception, never an unpickle."""

from __future__ import annotations

import io
import json
import pickletools
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.config import LimitSettings
from pipeline.errors import UnreadableMessage
from pipeline.io.npy import to_npy
from pipeline.io.wire import H_CONTENT_TYPE, H_ID, H_MODEL, NPY, decode_request

LIMITS = LimitSettings(max_request_bytes=64_000, max_elements=10_000, max_rows=100)
STABLE_CODES = {"bad_request", "bad_shape", "bad_dtype", "non_finite", "too_large",
                "bad_input", "bad_ids"}  # fmt: skip
DLQ_CODES = {"unreadable", "missing_id", "too_large"}

header_names = st.sampled_from(
    [
        H_CONTENT_TYPE,
        H_ID,
        H_MODEL,
        "kvpipe-version",
        "kvpipe-reply-to",
        "kvpipe-deadline",
        "x-other",
    ]
)
headers = st.lists(st.tuples(header_names, st.binary(max_size=40)), max_size=5)
json_values = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=30,
)


def outcome(value: bytes | None, hdrs: list[tuple[str, bytes]]) -> str:
    try:
        request = decode_request(value, hdrs, LIMITS)
    except UnreadableMessage as exc:
        assert exc.code in DLQ_CODES, exc.code
        return "dlq"
    if request.error is not None:
        assert request.error.code in STABLE_CODES, request.error.code
        return "error"
    assert request.inputs is not None and request.inputs.ndim == 2
    assert np.isfinite(request.inputs).all()
    return "ok"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300), headers)
def test_random_bytes_and_headers(value: bytes, hdrs: list[tuple[str, bytes]]) -> None:
    outcome(value, hdrs)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["id", "model", "version", "inputs", "ids"]), json_values, max_size=5
    )
)
def test_random_json_requests(body: dict[str, object]) -> None:
    outcome(json.dumps(body, allow_nan=True).encode(), [])


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.lists(st.floats(width=32) | st.integers(-(2**70), 2**70), min_size=1, max_size=4),
        min_size=1,
        max_size=4,
    )
)
def test_random_rows(rows: list[list[float]]) -> None:
    body = {"id": "x", "model": "m", "inputs": rows}
    assert outcome(json.dumps(body).encode(), []) in ("ok", "error")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"", "dlq"),
        (b"null", "dlq"),
        (b'{"id": "' + b"x" * 300 + b'"}', "dlq"),
        (
            b'{"id": "x", "model": "m", "inputs": [[1, 2]], "inputs2": '
            + b"[" * 5000
            + b"]" * 5000
            + b"}",
            "dlq",  # nesting deeper than the JSON parsers allow: unreadable
        ),
        (b'{"id": "x", "model": "m", "inputs": [[Infinity]]}', "error"),
        (b'{"id": "x", "model": "m", "inputs": [[1e400]]}', "error"),
        (
            b'{"id": "x", "model": "m", "inputs": '
            + json.dumps([[0.5] * 200] * 60).encode()
            + b"}",
            "error",  # readable, over the element limit: an error result (too_large)
        ),
        (b'{"id": "x", "model": "m", "ids": [[-1, 2]]}', "ok"),  # range is the model's call
        (b'{"id": "x", "model": "m", "ids": [[1.5, 2]]}', "error"),
    ],
)
def test_fixed_corpus(value: bytes, expected: str) -> None:
    assert outcome(value, []) == expected


class _Canary:
    """Unpickling this writes a file; the test checks the file never appears."""

    path = ""

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (Path.write_text, (Path(self.path), "pwned"))  # type: ignore[return-value]


def test_pickled_npy_never_unpickled(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    _Canary.path = str(canary)
    buf = io.BytesIO()
    np.save(buf, np.array([_Canary()], dtype=object), allow_pickle=True)
    hdrs = [(H_CONTENT_TYPE, NPY.encode()), (H_ID, b"p"), (H_MODEL, b"m")]
    request = decode_request(buf.getvalue(), hdrs, LIMITS)
    assert request.error is not None and request.error.code == "bad_input"
    assert not canary.exists()
    # The payload is live, shown without running it: its pickle calls Path.write_text.
    data = buf.getvalue()
    body = 10 + int.from_bytes(data[8:10], "little")  # npy 1.0: magic, version, header length
    ops = list(pickletools.genops(data[body:]))
    args = [arg for _, arg, _ in ops]
    assert "Path.write_text" in args and "pwned" in args
    assert "REDUCE" in {op.name for op, _, _ in ops[args.index("pwned") :]}  # then called


def test_npy_object_and_structured_dtypes_refused() -> None:
    hdrs = [(H_CONTENT_TYPE, NPY.encode()), (H_ID, b"p"), (H_MODEL, b"m")]
    structured = np.zeros(2, dtype=[("a", "f4"), ("b", "i4")])
    assert decode_request(to_npy(np.zeros((1, 2))), hdrs, LIMITS).error is None
    buf = io.BytesIO()
    np.save(buf, structured)
    assert decode_request(buf.getvalue(), hdrs, LIMITS).error.code == "bad_input"  # type: ignore[union-attr]
