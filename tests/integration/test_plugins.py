"""A model plugin served end to end by real processes: kvpipe publish and serve find the docs'
RBF network through PYTHONPATH (by KVPIPE_MODEL_PLUGINS or by entry point), and every answer
matches numpy; a plugin that fails to load stops each command with one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.config import settings_to_env
from tests.unit.params.test_plugins import example_source, rbf_reference, write_package

pytestmark = pytest.mark.integration

ARCH = {"kind": "rbf", "dim_in": 3, "units": 6, "dim_out": 2, "gamma": 0.7}


def kvpipe(*args: str, env: dict[str, str], timeout: float = 120) -> Any:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def plugin_env(tmp_path: Path, how: str) -> dict[str, str]:
    """The example plugin in ``tmp_path``, and the variables that make a process find it."""
    root = tmp_path / "plugins"
    path = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)
    if how == "module":
        write_package(root, "rbf_models", example_source())
        return {"PYTHONPATH": path, "KVPIPE_MODEL_PLUGINS": "rbf_models"}
    write_package(root, "rbf_models", example_source(), {"rbf": "rbf_models:RBFNet"})
    return {"PYTHONPATH": path}


@pytest.mark.parametrize("how", ["module", "entry_point"])
def test_publish_and_serve_a_plugin_model(make_settings: Any, tmp_path: Path, how: str) -> None:
    env = {**settings_to_env(make_settings()), **plugin_env(tmp_path, how)}
    rng = np.random.default_rng(5)
    tensors = {
        "centers": rng.standard_normal((6, 3)).astype(np.float32),
        "weight": rng.standard_normal((6, 2)).astype(np.float32),
        "bias": rng.standard_normal(2).astype(np.float32),
    }
    np.savez(tmp_path / "weights.npz", **tensors)  # type: ignore[arg-type]
    arch = json.dumps(ARCH)
    out = kvpipe(
        "publish", "--model", "bumps", "--from", str(tmp_path / "weights.npz"), "--arch", arch,
        env=env,
    )  # fmt: skip
    assert out.returncode == 0 and out.stdout.strip() == "1", out.stderr
    out = kvpipe("train", "--model", "bumps", "--synthetic", "--steps", "1", env=env)
    assert out.returncode == 2 and "error: cannot train a 'rbf' model" in out.stderr, out.stderr
    x = rng.standard_normal((8, 3)).astype(np.float32)
    requests = tmp_path / "req.jsonl"
    requests.write_text(
        "".join(json.dumps({"id": f"p{i}", "inputs": [x[i].tolist()]}) + "\n" for i in range(8))
    )
    out = kvpipe("produce", "--model", "bumps", "--file", str(requests), env=env)
    assert out.returncode == 0, out.stderr
    worker = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "serve", "--log-format", "json"],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out = kvpipe("results", "--count", "8", env=env)
    finally:
        worker.terminate()
        _, err = worker.communicate(timeout=30)
    assert worker.returncode == 0, err[-2000:]
    assert out.returncode == 0, out.stderr
    rows = {r["id"]: r for r in map(json.loads, out.stdout.splitlines())}
    assert set(rows) == {f"p{i}" for i in range(8)}
    expected = rbf_reference(tensors, x, ARCH["gamma"])
    for i in range(8):
        r = rows[f"p{i}"]
        assert r["status"] == "ok" and r["version"] == 1, r
        np.testing.assert_allclose(r["outputs"], expected[i : i + 1], rtol=1e-4, atol=1e-5)
    assert '"event": "model_plugins_loaded"' in err and "rbf" in err


def test_a_plugin_that_fails_to_load_stops_each_command_with_one_line(tmp_path: Path) -> None:
    env = plugin_env(tmp_path, "module")
    (tmp_path / "plugins" / "rbf_models.py").write_text("import not_installed_anywhere\n")
    env["KVPIPE_REDIS"] = "redis://127.0.0.1:1/0"  # never reached: the plugin fails first
    for command in (
        ["publish", "--model", "m", "--preset", "mlp"],
        ["serve"],
        ["produce", "--model", "m", "--count", "1"],
        ["train", "--model", "m", "--preset", "mlp", "--steps", "1"],
    ):
        out = kvpipe(*command, env=env, timeout=60)
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        assert out.returncode == 2 and len(lines) == 1, out.stderr[-2000:]
        assert lines[0] == (
            f"kvpipe {command[0]}: error: model plugin module rbf_models (KVPIPE_MODEL_PLUGINS) "
            "cannot be imported: ModuleNotFoundError: No module named 'not_installed_anywhere'"
        )
