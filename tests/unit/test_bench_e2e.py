"""The e2e and scale suites' own logic without services: figures, ratios, goals, the echo."""

from __future__ import annotations

import pytest

from pipeline.bench.e2e import (
    E2EResult,
    LightResult,
    RatePoint,
    echo_check,
    point_line,
    summary_lines,
)
from pipeline.bench.echo import echo_topic
from pipeline.bench.runner import Options, _parse_options
from pipeline.bench.scale import scale_model
from pipeline.config import Settings
from pipeline.dev.procs import child_env
from pipeline.errors import ConfigError
from pipeline.io.kafka import Message, Partition


def _point(
    side: str, rate: float, answered_per_s: float, p99: float, half: bool = False
) -> RatePoint:
    p = RatePoint(side, rate, 2.0, half=half)
    p.sent = p.ok = int(rate * 2)
    p.offered_rate, p.on_schedule = rate, True
    p.seconds = p.ok / answered_per_s
    p.latency_ms = {"p50": p99 / 4, "p95": p99 / 2, "p99": p99}
    return p


def _result(worker_half_p99: float) -> E2EResult:
    r = E2EResult()
    r.points = [
        _point("worker", 1000, 1000, 10),
        _point("echo", 1000, 1000, 8),
        _point("worker", 8000, 5000, 900),  # saturated: answered well below offered
        _point("echo", 8000, 7900, 30),
        _point("worker", 2500, 2500, worker_half_p99, half=True),
        _point("echo", 2500, 2500, 10, half=True),
    ]
    r.half_rate = 2500.0
    return r


def test_max_throughput_and_ratios_come_from_valid_points() -> None:
    r = _result(worker_half_p99=25.0)
    assert r.passed
    assert r.max_throughput("worker") == pytest.approx(5000)
    assert r.max_throughput("echo") == pytest.approx(7900)
    assert r.saturated("worker") and not r.saturated("echo")
    assert r.throughput_ratio == pytest.approx(5000 / 7900)
    assert r.latency_ratio == pytest.approx(2.5)
    doc = r.as_dict()
    assert doc["latency_goal_met"] and doc["throughput_goal_met"]
    lines = "\n".join(summary_lines(r))
    assert "2.50x (goal <= 3x: met)" in lines
    assert "0.63x (goal >= 0.5x: met)" in lines
    assert "echo 7900/s (never saturated: a lower bound)" in lines


def test_the_latency_goal_can_be_missed() -> None:
    r = _result(worker_half_p99=40.0)
    assert r.latency_ratio == pytest.approx(4.0)
    assert not r.as_dict()["latency_goal_met"]
    assert "NOT met" in "\n".join(summary_lines(r))


def test_a_wrong_or_missing_answer_voids_the_point_and_the_ratios() -> None:
    r = _result(worker_half_p99=25.0)
    half_worker = r.points[4]
    half_worker.ok -= 1
    half_worker.missing = 1
    assert not half_worker.passed and half_worker.throughput is None
    assert r.latency_ratio is None and not r.passed
    assert "FAIL" in point_line(half_worker) and "missing 1" in point_line(half_worker)
    assert r.as_dict()["latency_goal_met"] is False


def test_a_rate_the_sender_missed_is_flagged() -> None:
    p = _point("echo", 32000, 20000, 50)
    p.on_schedule, p.offered_rate = False, 25000
    assert "offered rate NOT reached" in point_line(p)


def test_the_echo_must_return_the_same_bytes() -> None:
    part = Partition("t", 0)
    sent = (b"abc", [("content-type", b"application/json")])
    assert echo_check(b"k", Message(part, 0, b"k", b"abc", (), 0), sent, 0) == "ok"
    assert echo_check(b"k", Message(part, 0, b"k", b"abd", (), 0), sent, 0) == "wrong"


def test_options_parse_rates_and_layers() -> None:
    class Args:
        requests = None
        naive_requests = None
        rounds = None
        rates = "500, 1000,2000"
        duration = 1.5
        layers = "64-128-8"

    opts = _parse_options(Args())  # type: ignore[arg-type]
    assert opts.rates == (500.0, 1000.0, 2000.0)
    assert opts.duration_s == 1.5 and opts.layers == [64, 128, 8]
    assert Options().count("scale") == 8000
    Args.rates = "1000,-1"
    with pytest.raises(ConfigError):
        _parse_options(Args())  # type: ignore[arg-type]


def test_children_get_one_core_settings_and_their_own_name() -> None:
    env = child_env(Settings(), "w1", {"OPENBLAS_NUM_THREADS": "1"})
    assert env["KVPIPE_WORKER_ID"] == "w1" and env["OPENBLAS_NUM_THREADS"] == "1"
    assert echo_topic(Settings().kafka) == "kvpipe.echo"
    model = scale_model([8, 16, 4])
    assert (model.input_dim, model.output_dim) == (8, 4)


def test_light_load_ratio_is_the_mean_p99_of_the_batcher_over_batch_size_one() -> None:
    r = LightResult(200.0, 2.0)
    r.points = [
        _point("batched", 200, 200, 12),
        _point("single", 200, 200, 10),
        _point("single", 200, 200, 10),
        _point("batched", 200, 200, 18),
    ]
    assert r.p99("batched") == 15 and r.p99("single") == 10
    assert r.ratio == pytest.approx(1.5)
    assert r.as_dict()["goal_met"] and r.passed
    r.points[3].missing, r.points[3].ok = 1, r.points[3].ok - 1  # one answer lost: no figure
    assert r.p99("batched") is None and r.ratio is None
    assert not r.passed and not r.as_dict()["goal_met"]
