"""Every README command runs as written: each ```sh block that needs no Docker, run with bash.

A block runs in a fresh temporary directory (with ``.venv`` linked to this interpreter's
virtual environment, so ``. .venv/bin/activate`` works and ``kvpipe`` resolves), under
``set -euo pipefail`` and a timeout, in a process group of its own. A block that needs
services starts them itself (``eval "$(kvpipe local up)"``); afterwards nothing it started
may still run: its process group must be empty and ``kvpipe local down`` must find nothing.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).parents[2]
README = REPO / "README.md"
BLOCK_TIMEOUT_S = 180.0
NEEDS_DOCKER = "# needs Docker"
NOTHING_RUNNING = "no local services were running"


@dataclass(frozen=True)
class Block:
    """One ```sh block of the README: the heading it sits under, its line and its text."""

    heading: str
    line: int
    text: str

    @property
    def id(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.heading.lower()).strip("-")
        return f"{slug}-line{self.line}"


def sh_blocks(markdown: str) -> list[Block]:
    """The ```sh blocks of ``markdown``, in order."""
    blocks: list[Block] = []
    heading = ""
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#") and not line.startswith("#!"):
            heading = line.lstrip("#").strip()
        if line.strip().startswith("```"):
            fence = line.strip()
            start = i + 1
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                i += 1
            if fence == "```sh":
                blocks.append(Block(heading, start, "\n".join(lines[start:i]) + "\n"))
        i += 1
    return blocks


BLOCKS = sh_blocks(README.read_text())


def skip_reason(block: Block) -> str | None:
    """Why a block is not run here, or None to run it."""
    first = block.text.lstrip().splitlines()[0] if block.text.strip() else ""
    if first.strip() == NEEDS_DOCKER:
        return "needs Docker (no Docker engine on the build machines)"
    if re.search(r"^\s*make (demo|test)\b", block.text, re.MULTILINE):
        return (
            "Quick start: `make test` would run this test suite inside itself; "
            "tests/unit/test_readme.py checks both targets exist in the Makefile"
        )
    return None


def venv_dir() -> Path:
    """The virtual environment running this test (or the repository's ``.venv``)."""
    if sys.prefix != sys.base_prefix:
        return Path(sys.prefix)
    return REPO / ".venv"


def block_env(venv: Path) -> dict[str, str]:
    """This environment without any KVPIPE_* setting, the venv's bin first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVPIPE_")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env.pop("VIRTUAL_ENV", None)
    return env


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_group(pgid: int) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left after a few seconds."""
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
        if not group_alive(pgid):
            return
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)


def local_down(workdir: Path, env: dict[str, str]) -> str:
    done = subprocess.run(
        ["kvpipe", "local", "down"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.stdout + done.stderr


def test_the_readme_has_the_blocks_this_test_expects() -> None:
    run = [b for b in BLOCKS if skip_reason(b) is None]
    assert any("kvpipe serve &" in b.text for b in run), "the 'Using it' block is gone"
    assert any("kvpipe train" in b.text for b in run), "the training block is gone"
    docker = [b for b in BLOCKS if skip_reason(b) and NEEDS_DOCKER in b.text]
    assert any("docker compose" in b.text for b in docker), "the compose block is gone"


@pytest.mark.timeout(BLOCK_TIMEOUT_S + 60)
@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_readme_block_runs_as_written(block: Block, tmp_path: Path) -> None:
    reason = skip_reason(block)
    if reason is not None:
        pytest.skip(reason)
    venv = venv_dir()
    if not (venv / "bin" / "kvpipe").exists() or not (venv / "bin" / "activate").exists():
        pytest.skip(f"no virtual environment with kvpipe at {venv}")
    (tmp_path / ".venv").symlink_to(venv, target_is_directory=True)
    script = tmp_path / "block.sh"
    script.write_text("set -euo pipefail\n" + block.text)
    env = block_env(venv)
    proc = subprocess.Popen(
        ["bash", str(script)],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    pgid = proc.pid
    left_running = False
    try:
        try:
            out, err = proc.communicate(timeout=BLOCK_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            stop_group(pgid)
            out, err = proc.communicate()
            pytest.fail(
                f"README block at line {block.line} ran over {BLOCK_TIMEOUT_S:.0f} s\n"
                f"stdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}"
            )
        left_running = group_alive(pgid)
    finally:
        stop_group(pgid)
        cleanup = local_down(tmp_path, env)
    context = f"README block at line {block.line}:\n{block.text}\nstdout:\n{out[-3000:]}\n"
    context += f"stderr:\n{err[-5000:]}"
    assert proc.returncode == 0, f"exit status {proc.returncode}\n{context}"
    assert not left_running, f"a process the block started was still running\n{context}"
    assert NOTHING_RUNNING in cleanup, f"local services were left running ({cleanup})\n{context}"
    if "kvpipe serve &" in block.text:  # "Using it": 100 results printed, 1 kvpipe infer's
        results = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        assert len(results) == 101, context
        assert len({r["id"] for r in results}) == 101, context
        assert all(r["status"] == "ok" for r in results), context
