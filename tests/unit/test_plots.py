"""PNG plots of bench results, and the JSON-only path without matplotlib."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipeline.bench import plots
from pipeline.bench.figures import Comparison, machine
from pipeline.bench.runner import write_outputs
from tests.unit.test_bench import _side

pytest.importorskip("matplotlib")


def _e2e_doc() -> dict[str, Any]:
    def point(side: str, rate: float, tp: float, p50: float, p99: float, half: bool = False) -> Any:
        return {
            "side": side,
            "rate": rate,
            "half_of_max": half,
            "passed": True,
            "throughput": tp,
            "latency_ms": {"p50": p50, "p95": p99 * 0.8, "p99": p99},
        }

    return {
        "results": {
            "e2e": {
                "points": [
                    point("worker", 1000, 990, 5, 9),
                    point("echo", 1000, 995, 4, 8),
                    point("worker", 4000, 3000, 50, 300),
                    point("echo", 4000, 3900, 6, 20),
                    point("worker", 1500, 1490, 6, 12, half=True),
                ],
                "latency_ratio": 1.5,
                "latency_goal": 3.0,
                "half_rate": 1500.0,
            }
        }
    }


def _cmp_doc() -> dict[str, Any]:
    a = Comparison("batching", _side("batched", [(100, 1.0)]), _side("single", [(100, 4.0)]), 2.5)
    b = Comparison("batching", _side("batched", [(100, 1.0)]), _side("single", [(100, 2.0)]), 2.5)
    return {"machine": machine(), "results": {"batching": a.as_dict(), "mlp": b.as_dict()}}


def _cache_doc() -> dict[str, Any]:
    rows = [
        {"trace": "zipf s=1.0", "capacity": 10, "hit_rate": {"lru": 0.4, "lfu": 0.5, "opt": 0.6}},
        {"trace": "scan", "capacity": 10, "hit_rate": {"lru": 0.1, "lfu": 0.3, "opt": 0.5}},
    ]
    return {"results": {"cache": {"rows": rows}}}


@pytest.mark.parametrize(
    ("suite", "doc"),
    [("e2e", _e2e_doc()), ("batching", _cmp_doc()), ("cache", _cache_doc())],
)
def test_each_plot_is_a_png(suite: str, doc: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "sub" / f"{suite}.png"
    assert plots.write_plot(suite, doc, path)
    assert path.read_bytes().startswith(plots.PNG_MAGIC)


def test_outputs_are_json_and_png(tmp_path: Path) -> None:
    lines: list[str] = []
    json_path, png_path = write_outputs(tmp_path, "batching", _cmp_doc(), lines.append)
    assert json_path.read_text().startswith("{")
    assert png_path is not None and png_path.read_bytes().startswith(plots.PNG_MAGIC)


def test_without_matplotlib_json_is_still_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(plots, "available", lambda: False)
    lines: list[str] = []
    json_path, png_path = write_outputs(tmp_path, "echo", _cmp_doc(), lines.append)
    assert json_path.exists() and png_path is None
    assert not (tmp_path / "echo.png").exists()
    assert lines == [plots.MISSING]
