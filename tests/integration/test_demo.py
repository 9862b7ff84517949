"""The demos, as `kvpipe demo` runs them (each starts and stops its own services)."""

from __future__ import annotations

import logging

import pytest
import structlog

from pipeline.cli import main
from pipeline.dev import demo
from pipeline.dev.demo import run_demo, run_train_demo
from tests.integration.test_cli import kvpipe

pytestmark = pytest.mark.integration


async def test_demo_every_result_correct() -> None:
    report = await run_demo(requests=400, preset="mlp")
    assert report.passed, report.as_dict()
    assert report.ok == 400 and report.duplicates == 0
    assert report.cache_loads == 5  # the pointer (its manifest rides along), four tensors


async def test_train_demo_accuracy_rises() -> None:
    report = await run_train_demo(waves=3, per_wave=300)
    assert report.passed, report.as_dict()
    assert report.publishes >= 2
    assert report.waves[-1].versions[0] > report.waves[0].versions[0]


def test_onnx_demo_serves_the_digits_mlp_as_scikit_learn_predicts_it() -> None:
    for module in demo.ONNX_EXTRA:
        pytest.importorskip(module)
    out = kvpipe("demo", "--onnx", timeout=180)  # as a user runs it
    print(out.stdout)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[-1].startswith("PASS: "), out.stdout
    assert lines[0].startswith(f"requests {demo.DIGITS_HELD_OUT}  served {demo.DIGITS_HELD_OUT}")
    assert any(line.startswith("served accuracy 0.9") for line in lines), out.stdout


def test_onnx_demo_without_the_extra_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(demo, "missing_onnx_extra", lambda: ["skl2onnx"])
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        assert main(["demo", "--onnx"]) == 2
    finally:  # main configured logging onto capsys's stream, which closes after this test
        structlog.reset_defaults()
        root.handlers[:], root.level = handlers, level
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install -e '.[onnx]'" in err[0], err


def test_onnx_demo_passes_a_difference_only_within_float_rounding() -> None:
    n = demo.DIGITS_HELD_OUT
    rounding = demo.Mismatch(row=3, served=5, sklearn=3, margin=2e-7, served_margin=1e-7)
    real = demo.Mismatch(row=4, served=5, sklearn=3, margin=0.2, served_margin=0.1)
    assert demo.OnnxDemoReport(requests=n, served=n, same=n - 1, mismatches=[rounding]).passed
    assert not demo.OnnxDemoReport(requests=n, served=n, same=n - 1, mismatches=[real]).passed
    assert not demo.OnnxDemoReport(requests=n, served=n - 1, same=n - 1, missing=1).passed
