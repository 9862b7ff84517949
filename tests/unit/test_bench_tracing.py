"""The tracing bench runs its sides in one process and reports what each recorded."""

from __future__ import annotations

from pipeline.bench.tracing import bench_tracing


def test_the_tracing_bench_measures_every_side_and_the_sdk_records_five_spans_each() -> None:
    lines: list[str] = []
    out = bench_tracing(messages=128, rounds=1, emit=lines.append)
    assert set(out["us_per_message"]) == {"off", "api", "sdk", "sdk-unsampled"}
    assert all(v > 0 for v in out["us_per_message"].values())
    assert all(v > 0 for v in out["hooks_us_per_message"].values())
    assert out["sdk_spans"] == 5 * 128  # consume, batch, load, compute, produce per message
    assert len(lines) == 6 and all("us/message" in line for line in lines[1:5])
