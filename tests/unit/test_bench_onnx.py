"""The onnx suite's own logic without services: how an ONNX classifier's answer is checked
(probability columns beside the label), the p99 ratio and the session figures."""

from __future__ import annotations

import numpy as np

from pipeline.bench.e2e import RatePoint
from pipeline.bench.figures import MODEL
from pipeline.bench.onnx_digits import LatencyResult, SessionResult, digit_check
from pipeline.io.kafka import Message, Partition
from pipeline.io.wire import Result, Status, encode_result

PROBS = np.array([0.1, 0.7, 0.2], dtype=np.float32)


def _msg(outputs: list[float], version: int = 1, rid: str = "r") -> Message:
    row = np.array([outputs], dtype=np.float32)
    value, headers = encode_result(Result(rid, MODEL, Status.OK, version, row))
    return Message(Partition("t", 0), 0, rid.encode(), value, tuple(headers), 0)


def test_numpy_answers_are_compared_whole() -> None:
    check = digit_check(None)
    assert check(_msg([0.1, 0.7, 0.2]), "r", PROBS, 1)[0] == "ok"
    assert check(_msg([0.1, 0.6, 0.3]), "r", PROBS, 1)[0] == "wrong"
    assert check(_msg([1.0, 0.1, 0.7, 0.2]), "r", PROBS, 1)[0] == "wrong"  # one column too many
    assert check(_msg([0.1, 0.7, 0.2], version=2), "r", PROBS, 1)[0] == "wrong"


def test_onnx_answers_compare_the_probability_columns_and_check_the_label() -> None:
    check = digit_check((1, 4))
    assert check(_msg([1.0, 0.1, 0.7, 0.2]), "r", PROBS, 1)[0] == "ok"
    assert check(_msg([2.0, 0.1, 0.7, 0.2]), "r", PROBS, 1)[0] == "wrong"  # not the best class
    assert check(_msg([1.5, 0.1, 0.7, 0.2]), "r", PROBS, 1)[0] == "wrong"  # not a class
    assert check(_msg([1.0, 0.1, 0.6, 0.3]), "r", PROBS, 1)[0] == "wrong"  # probabilities off
    assert check(_msg([0.1, 0.7, 0.2]), "r", PROBS, 1)[0] == "wrong"  # the label missing
    tie = np.array([0.5, 0.5, 0.0], dtype=np.float32)
    assert check(_msg([0.0, 0.5, 0.5, 0.0]), "r", tie, 1)[0] == "ok"  # a tie: either label
    assert check(_msg([1.0, 0.5, 0.5, 0.0]), "r", tie, 1)[0] == "ok"


def _point(side: str, p99: float, passed: bool = True) -> RatePoint:
    p = RatePoint(side, 100.0, 1.0)
    p.sent = 100
    p.ok = 100 if passed else 99
    p.missing = 0 if passed else 1
    p.seconds = 1.0
    p.latency_ms = {"p50": p99 / 2, "p95": p99, "p99": p99}
    return p


def test_the_p99_ratio_is_onnx_over_numpy_and_void_with_a_failed_run() -> None:
    r = LatencyResult(100.0, 1.0, [_point("onnx", 12.0), _point("numpy", 8.0)])
    r.points += [_point("numpy", 12.0), _point("onnx", 6.0)]
    assert r.passed and r.p99("onnx") == 9.0 and r.p99("numpy") == 10.0 and r.ratio == 0.9
    r.points.append(_point("onnx", 5.0, passed=False))
    assert not r.passed and r.p99("onnx") is None and r.ratio is None
    assert r.as_dict()["ratio"] is None


def test_session_build_is_the_first_request_less_the_next() -> None:
    s = SessionResult(first_ms=[3.0, 2.0], warm_ms=[0.5, 0.5])
    assert s.passed and s.build_ms == [2.5, 1.5]
    d = s.as_dict()
    assert d["versions"] == 2 and d["build_ms"] == {"mean": 2.0, "max": 2.5}
    s.wrong = 1
    assert not s.passed and not SessionResult().passed
