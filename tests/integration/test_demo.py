"""The demos, as `kvpipe demo` runs them (each starts and stops its own services)."""

from __future__ import annotations

import pytest

from pipeline.dev.demo import run_demo, run_train_demo

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
