"""``kvpipe bench e2e``, ``scale`` and ``onnx`` at tiny sizes: real processes, real services.

Behaviour only (no timing thresholds): the JSON has its figures, every answer was right, the
worker processes are gone afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration


def bench(tmp_path: Path, *args: str, timeout: float = 90) -> tuple[int, str, dict[str, Any]]:
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "bench", *args, "--out", str(tmp_path)],
        env={k: v for k, v in os.environ.items() if not k.startswith("KVPIPE_")},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    doc = json.loads((tmp_path / f"{args[0]}.json").read_text())
    return out.returncode, out.stdout + out.stderr, doc


def _gone(pids: list[int]) -> None:
    """Every process the bench started has exited (and was reaped by it)."""
    assert pids
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.timeout(120)
def test_e2e_small(tmp_path: Path) -> None:
    code, output, doc = bench(tmp_path, "e2e", "--rates", "200,400", "--duration", "1")
    assert code == 0, output
    e2e = doc["results"]["e2e"]
    assert doc["passed"] and e2e["passed"], output
    points = e2e["points"]
    # two rates and the half-of-max run, each on both sides
    assert sorted((p["side"], p["half_of_max"]) for p in points) == sorted(
        [(s, h) for s in ("worker", "echo") for h in (False, False, True)]
    )
    for p in points:
        assert p["ok"] == p["sent"] > 0 and p["wrong"] == p["missing"] == p["errors"] == 0
        assert p["throughput"] > 0
        assert 0 < p["latency_ms"]["p50"] <= p["latency_ms"]["p95"] <= p["latency_ms"]["p99"]
    for key in ("max_throughput", "throughput_ratio", "latency_ratio", "half_rate"):
        assert e2e[key] is not None, key
    assert "goal <= 3x" in output and "goal >= 0.5x" in output
    assert (tmp_path / "e2e.png").read_bytes().startswith(b"\x89PNG")
    _gone(e2e["pids"])


@pytest.mark.timeout(120)
def test_scale_small(tmp_path: Path) -> None:
    code, output, doc = bench(
        tmp_path, "scale", "--requests", "300", "--rounds", "1", "--layers", "16,64,4"
    )
    assert code == 0, output
    scale = doc["results"]["scale"]
    assert doc["passed"] and scale["passed"], output
    two, one = scale["sides"]
    assert (two["side"], one["side"]) == ("two", "one")
    for side, workers in ((two, 2), (one, 1)):
        run = side["runs"][0]
        assert run["ok"] == 300 and run["wrong"] == run["missing"] == run["errors"] == 0
        # every worker of the side answered warm-up requests; the backlog was split among them
        assert len(run["detail"]["warmup_answers"]) == workers
        assert sum(run["detail"]["answers_by_worker"].values()) == 300
        assert len(run["detail"]["pids"]) == workers
        _gone(run["detail"]["pids"])
    assert scale["ratio"] is not None and scale["goal"] == 1.6
    assert "goal >= 1.6x" in output


@pytest.mark.timeout(150)
def test_onnx_small(tmp_path: Path) -> None:
    for module in ("onnx", "onnxruntime", "skl2onnx", "sklearn"):
        pytest.importorskip(module)
    code, output, doc = bench(
        tmp_path, "onnx", "--requests", "300", "--rounds", "1", "--duration", "1", timeout=140
    )
    assert code == 0, output
    results = doc["results"]
    assert doc["passed"] and set(results) == {"onnx", "onnx-latency", "onnx-session"}, output
    cmp = results["onnx"]
    assert [s["side"] for s in cmp["sides"]] == ["onnx", "numpy"] and cmp["ratio"] is not None
    for side in cmp["sides"]:
        run = side["runs"][0]
        # every answer checked: the numpy side's probabilities, the ONNX side's label and
        # probability columns, against the numpy MLP with scikit-learn's weights
        assert run["ok"] == 300 and run["wrong"] == run["missing"] == run["errors"] == 0
        assert run["detail"]["numpy_vs_predict_proba_max_diff"] <= 1e-5
        assert run["detail"]["sklearn_accuracy"] > 0.9
    latency = results["onnx-latency"]
    assert latency["passed"] and latency["rate"] > 0
    assert latency["p99_ms"]["onnx"] > 0 and latency["p99_ms"]["numpy"] > 0
    for run in latency["runs"]:
        assert run["ok"] == run["sent"] > 0 and run["wrong"] == run["missing"] == 0
    session = results["onnx-session"]
    assert session["passed"] and session["versions"] >= 2 and session["wrong"] == 0
    assert 0 < session["build_ms"]["mean"] <= session["build_ms"]["max"]
    assert "ONNX (onnxruntime)" in output and "session build per version" in output
