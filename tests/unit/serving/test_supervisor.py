"""The supervisor with small stand-in children (python -c): restarts with back-off, a crash
loop ends it, SIGTERM drains every child, nothing is left behind."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from pipeline.serving.supervisor import Backoff, Supervisor

#: A child: notes its start, then behaves as $MODE says; on SIGTERM it notes a drain, exits 0.
CHILD = r"""
import os, signal, sys, time
from pathlib import Path
out = Path(os.environ["OUT"])
index = sys.argv[sys.argv.index("--child") + 1]
port_file = Path(sys.argv[sys.argv.index("--port-file") + 1])
starts = out / f"starts-{index}"
n = len(starts.read_text()) if starts.exists() else 0
with starts.open("a") as f:
    f.write("x")
def drained(*_):
    (out / f"drained-{os.getpid()}").write_text(index)
    sys.exit(0)
signal.signal(signal.SIGTERM, drained)
mode = os.environ["MODE"]
if mode == "always-fail" or (mode == "fail-first-two" and n < 2):
    sys.exit(3)
port_file.write_text(str(4000 + int(index)))
(out / f"up-{index}-{os.getpid()}").write_text("")
while True:
    time.sleep(0.05)
"""

FAST = Backoff(first_s=0.01, max_s=0.04, healthy_s=3600.0)


def _supervisor(tmp_path: Path, mode: str, processes: int = 2, **kw: object) -> Supervisor:
    env = {**os.environ, "OUT": str(tmp_path), "MODE": mode}
    return Supervisor(
        [sys.executable, "-c", CHILD],
        processes=processes,
        env=lambda i: env,
        stop_timeout_s=20.0,
        **kw,  # type: ignore[arg-type]
    )


async def _until(check: object, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():  # type: ignore[operator]
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


def test_backoff_doubles_up_to_its_bound() -> None:
    b = Backoff(first_s=0.5, max_s=4.0)
    assert [b.delay(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


async def test_a_killed_child_is_started_again_and_sigterm_drains_every_child(
    tmp_path: Path,
) -> None:
    stop = asyncio.Event()
    async with _supervisor(tmp_path, "serve", backoff=FAST) as sup:
        run = asyncio.create_task(sup.run(stop))
        await _until(lambda: all(s.status_port() for s in sup.slots))
        assert [s.status_port() for s in sup.slots] == [4000, 4001]
        victim = sup.pids[0]
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        await _until(lambda: sup.pids[0] not in (None, victim) and sup.slots[0].status_port())
        assert [s.restarts for s in sup.slots] == [1, 0]
        assert sup.slots[0].last_status == -signal.SIGKILL
        pids = set(sup.pids)
        stop.set()
        assert await asyncio.wait_for(run, 60) == 0
        workdir = sup.workdir
    drained = {
        int(p.name.split("-")[1]) for p in os.scandir(tmp_path) if p.name.startswith("drained-")
    }
    assert drained == pids  # every child running at the stop got SIGTERM and drained
    assert not workdir.exists()  # the supervisor's temporary directory is gone


async def test_a_crashing_child_is_restarted_with_backoff_until_it_stays_up(
    tmp_path: Path,
) -> None:
    stop = asyncio.Event()
    async with _supervisor(tmp_path, "fail-first-two", processes=1, backoff=FAST) as sup:
        run = asyncio.create_task(sup.run(stop))
        await _until(lambda: sup.slots[0].status_port() is not None)
        assert sup.slots[0].starts == 3 and sup.slots[0].failures == 2
        stop.set()
        assert await asyncio.wait_for(run, 60) == 0


async def test_a_crash_loop_ends_the_supervisor_with_status_2(tmp_path: Path) -> None:
    async with _supervisor(
        tmp_path, "always-fail", processes=2, backoff=FAST, give_up_after=3
    ) as sup:
        status = await asyncio.wait_for(sup.run(asyncio.Event()), 60)
    assert status == 2
    assert sup.failure is not None and "3 times in a row" in sup.failure
    assert all(s.proc is not None and s.proc.returncode is not None for s in sup.slots)


async def test_a_healthy_period_starts_the_failure_count_over(tmp_path: Path) -> None:
    healthy_at_once = Backoff(first_s=0.01, max_s=0.04, healthy_s=0.0)
    async with _supervisor(
        tmp_path, "always-fail", processes=1, backoff=healthy_at_once, give_up_after=2
    ) as sup:
        run = asyncio.create_task(sup.run(asyncio.Event()))
        await _until(lambda: sup.slots[0].starts >= 5)
        assert sup.slots[0].failures == 1 and not run.done()
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run


async def test_closing_kills_what_runs_and_is_safe_twice(tmp_path: Path) -> None:
    sup = _supervisor(tmp_path, "serve", processes=1, backoff=FAST)
    await sup.start()
    run = asyncio.create_task(sup.run(asyncio.Event()))
    await _until(lambda: sup.slots[0].status_port() is not None)
    proc = sup.slots[0].proc
    run.cancel()
    await asyncio.gather(run, return_exceptions=True)
    await sup.aclose()
    await sup.aclose()
    assert proc is not None and proc.returncode is not None
    assert not sup.workdir.exists()
