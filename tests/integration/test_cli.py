"""The kvpipe command as a user runs it: real processes, real services."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from typing import Any

import pytest
import redis as redis_py

from pipeline.cli import build_parser
from pipeline.config import settings_to_env
from pipeline.dev.local import free_port
from pipeline.io.kafka import list_topics

pytestmark = pytest.mark.integration


def kvpipe(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> Any:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_every_command_has_help() -> None:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name in ["", *sub.choices]:  # type: ignore[union-attr]
        out = kvpipe(*([name] if name else []), "--help")
        assert out.returncode == 0 and "usage: kvpipe" in out.stdout, name


def test_unreachable_services_give_one_line_not_a_traceback() -> None:
    dead = f"127.0.0.1:{free_port()}"
    out = kvpipe("publish", "--model", "m", "--preset", "mlp", "--redis", f"redis://{dead}/0")
    assert out.returncode == 1  # a failure at run time; 2 is for usage errors
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr
    assert lines[0].startswith("kvpipe publish: error: Redis at redis://") and dead in lines[0]
    out = kvpipe("produce", "--model", "m", "--count", "1", "--dim", "2", "--kafka", dead)
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1
    assert dead in out.stderr and "Traceback" not in out.stderr


def test_bad_settings_are_one_line() -> None:
    out = kvpipe("publish", "--model", "m", "--preset", "mlp", env={"KVPIPE_CACHE_BYTES": "lots"})
    assert out.returncode == 2 and "KVPIPE_CACHE_BYTES='lots'" in out.stderr
    out = kvpipe("publish", "--model", "bad name", "--preset", "mlp")
    assert out.returncode == 2 and "invalid model name" in out.stderr
    for url in ("redis://127.0.0.1:99999/0", "redis://127.0.0.1:abc/0", "http://127.0.0.1/0"):
        out = kvpipe("publish", "--model", "m", "--preset", "mlp", env={"KVPIPE_REDIS": url})
        assert out.returncode == 2 and "Redis URL" in out.stderr, out.stderr


def test_publish_produce_serve_results(make_settings: Any, tmp_path: Any) -> None:
    settings = make_settings()
    env = settings_to_env(settings)
    out = kvpipe("publish", "--model", "clf", "--preset", "mlp", "--seed", "1", env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"
    requests = tmp_path / "req.jsonl"
    requests.write_text(
        "\n".join(json.dumps({"id": f"f{i}", "inputs": [[float(i)] * 32]}) for i in range(5)) + "\n"
    )
    assert kvpipe("produce", "--model", "clf", "--file", str(requests), env=env).returncode == 0
    assert kvpipe("produce", "--model", "clf", "--count", "5", "--npy", env=env).returncode == 0
    worker = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "serve", "--log-format", "json"],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out = kvpipe("results", "--count", "10", env=env)
    finally:
        worker.terminate()
        _, err = worker.communicate(timeout=30)
    assert worker.returncode == 0, err[-2000:]
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) == 10 and all(r["status"] == "ok" and r["version"] == 1 for r in rows)
    assert {r["id"] for r in rows} >= {f"f{i}" for i in range(5)}
    assert '"event": "worker_drained"' in err


def _one_error_line(out: Any, command: str) -> str:
    """The single stderr line of a refused command (exit 2, no traceback)."""
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert lines[0].startswith(f"kvpipe {command}: error: "), lines
    return lines[0]


def test_a_model_name_with_a_newline_or_space_is_refused_and_writes_no_key(
    make_settings: Any,
) -> None:
    settings = make_settings()
    env = settings_to_env(settings)
    for command in (
        ["publish", "--model", "nl\n", "--preset", "mlp"],
        ["publish", "--model", "tab\there", "--preset", "mlp"],
        ["publish", "--model", "nbsp\u00a0", "--preset", "mlp"],
        ["produce", "--model", "nl\n", "--count", "1", "--dim", "2"],
        ["versions", "--model", "nl\n"],
        ["rollback", "--model", "nl\n", "--to", "1"],
    ):
        line = _one_error_line(kvpipe(*command, env=env), command[0])
        assert "invalid model name" in line, line
    raw = redis_py.Redis.from_url(settings.redis.url)
    try:
        assert raw.keys(f"{settings.redis.key_prefix}:*") == []
    finally:
        raw.close()


@pytest.mark.parametrize(
    "url",
    [
        "redis://:pw@127.0.0.1:99999/0",
        "redis://127.0.0.1:0/0",
        "redis://[::1",
        "redis://[::1:6379/0",
        "redis://127.0.0.1:6379/zero",
        "redis:///0",
        "redis://:6379/0",
        "unix://",
        "redis://127.0.0.1:6379/0\n",
    ],
)
def test_a_malformed_redis_url_is_one_line_from_any_command(url: str) -> None:
    dead = f"127.0.0.1:{free_port()}"
    for command in (["publish", "--model", "m", "--preset", "mlp"], ["serve"]):
        out = kvpipe(*command, env={"KVPIPE_REDIS": url, "KVPIPE_KAFKA": dead}, timeout=30)
        assert "Redis URL" in _one_error_line(out, command[0])


@pytest.mark.parametrize("arch", ["{bad", "[1]", '{"kind": "nope"}', '{"kind": "mlp"}'])
def test_a_malformed_arch_is_one_line(arch: str) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    out = kvpipe("publish", "--model", "m", "--preset", "mlp", "--arch", arch,
                 env={"KVPIPE_REDIS": dead}, timeout=30)  # fmt: skip
    assert "arch" in _one_error_line(out, "publish")


@pytest.mark.parametrize(
    "bootstrap",
    ["127.0.0.1:99999", "127.0.0.1:abc", "127.0.0.1:", "[::1", "[::1]9092", "a:1,,b:2", "tcp://h"],
)
def test_a_malformed_kafka_bootstrap_is_one_line_from_any_command(bootstrap: str) -> None:
    for command in (
        ["produce", "--model", "m", "--count", "1", "--dim", "2"],
        ["versions", "--model", "m"],
    ):
        out = kvpipe(*command, env={"KVPIPE_KAFKA": bootstrap}, timeout=30)
        assert "Kafka bootstrap" in _one_error_line(out, command[0])


def test_infer_prints_one_answer_and_exits_by_its_status(make_settings: Any) -> None:
    """``kvpipe infer`` against a served model: the answer equals numpy, an error result
    exits 1, a usage error 2, and no reply topic is left behind."""
    import numpy as np

    from pipeline.params.models import preset

    settings = make_settings()
    env = settings_to_env(settings)
    out = kvpipe("publish", "--model", "clf", "--preset", "mlp", "--seed", "3", env=env)
    assert out.returncode == 0, out.stderr
    worker = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "serve", "--log-format", "json"],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    x = np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32)
    try:
        ok = kvpipe("infer", "--model", "clf", "--input", json.dumps(x.tolist()), env=env)
        unknown = kvpipe("infer", "--model", "ghost", "--input", "[0.5, 0.5]", env=env)
        pinned = kvpipe("infer", "--model", "clf", "--version", "7", "--input", "[[0.5]]", env=env)
        usage = kvpipe("infer", "--model", "clf", "--input", "[[1,", env=env)
        topics = asyncio.run(list_topics(settings.kafka))  # listed, no topic named
    finally:
        worker.terminate()
        _, err = worker.communicate(timeout=30)
    assert ok.returncode == 0, ok.stderr[-2000:]
    answer = json.loads(ok.stdout)
    assert answer["status"] == "ok" and answer["model"] == "clf" and answer["version"] == 1
    model = preset("mlp")
    np.testing.assert_allclose(
        np.asarray(answer["outputs"]), model.forward(model.init(3), x), rtol=1e-4, atol=1e-5
    )
    assert unknown.returncode == 1
    assert json.loads(unknown.stdout)["error"]["code"] == "unknown_model"
    assert pinned.returncode == 1 and json.loads(pinned.stdout)["status"] == "error"
    assert usage.returncode == 2 and usage.stdout == ""
    assert "is not JSON rows of numbers" in usage.stderr
    replies = [t for t in topics if t.startswith(f"{settings.kafka.topic_prefix}.replies.")]
    assert replies == [], replies
    assert worker.returncode == 0, err[-2000:]
