"""A process per core: N worker processes of one consumer group under one supervisor.

The supervisor starts each child as ``command --child I --port-file PATH`` with an environment
of its own (a distinct worker id), in a session of its own (a terminal's Ctrl-C reaches only
the supervisor) and dying with it (``PR_SET_PDEATHSIG`` on Linux). A child that exits while
the supervisor is not stopping is started again after an exponential back-off, which is reset
once a child has stayed up for a healthy period; a slot that fails ``give_up_after`` times in
a row, each time within that period, ends the supervisor with status 2 (a crash loop is a
configuration to fix, not a fault to ride out). Stopping forwards SIGTERM to every child
(each drains: answers what it fetched, commits), waits, kills what is left.

A child with a status server writes its port to PATH; :mod:`pipeline.serving.fleet` reads
those to aggregate ``/metrics`` and ``/readyz``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from pipeline.resource import AsyncResource

log = structlog.get_logger("kvpipe.supervisor")

__all__ = ["Backoff", "ChildSlot", "Supervisor"]

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has Linux SIGTERM the child when the supervisor dies."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)

    return preexec


@dataclass(frozen=True, kw_only=True)
class Backoff:
    """Waits before a crashed child starts again: ``first_s``, doubled per failure in a row,
    at most ``max_s``; a child up for ``healthy_s`` starts the count over."""

    first_s: float = 0.5
    max_s: float = 30.0
    healthy_s: float = 60.0

    def delay(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th failure in a row (1, 2, ...)."""
        return float(min(self.max_s, self.first_s * 2.0 ** max(0, failures - 1)))


class ChildSlot:
    """One of the N places a child runs in: its current process and its history."""

    def __init__(self, index: int, port_file: Path) -> None:
        self.index = index
        self.port_file = port_file
        self.proc: asyncio.subprocess.Process | None = None
        self.started_at = 0.0
        self.starts = 0
        self.failures = 0  # in a row, each within the healthy period
        self.last_status: int | None = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.alive and self.proc is not None else None

    @property
    def restarts(self) -> int:
        return max(0, self.starts - 1)

    def status_port(self) -> int | None:
        """The port of the child's status server, once it wrote it."""
        try:
            text = self.port_file.read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None


class Supervisor(AsyncResource):
    """``async with Supervisor(...) as s: status = await s.run(stop)``.

    ``env(index)`` is child ``index``'s whole environment. ``run`` returns 0 after a drain
    on ``stop``, 2 after a crash loop; leaving the block kills any child still running and
    removes the supervisor's temporary directory.
    """

    def __init__(
        self,
        command: Sequence[str],
        *,
        processes: int,
        env: Callable[[int], Mapping[str, str]],
        backoff: Backoff | None = None,
        stop_timeout_s: float = 30.0,
        give_up_after: int = 10,
    ) -> None:
        if processes < 1:
            raise ValueError("a supervisor needs at least one process")
        self.command = list(command)
        self.processes = processes
        self._env = env
        self.backoff = backoff or Backoff()
        self.stop_timeout_s = stop_timeout_s
        self.give_up_after = give_up_after
        self.slots: list[ChildSlot] = []
        self.failure: str | None = None
        self._dir: Path | None = None
        self._stopping = False
        self._gave_up = asyncio.Event()
        self._keepers: list[asyncio.Task[None]] = []
        self._closed = False

    @property
    def workdir(self) -> Path:
        """The supervisor's temporary directory (children's port files)."""
        if self._dir is None:
            raise RuntimeError("supervisor is not started; use 'async with Supervisor(...)'")
        return self._dir

    @property
    def pids(self) -> list[int | None]:
        """The pid of each slot's running child (None while it is down)."""
        return [slot.pid for slot in self.slots]

    async def start(self) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="kvpipe-supervisor-"))
        self.slots = [ChildSlot(i, self._dir / f"child-{i}.port") for i in range(self.processes)]

    async def run(self, stop: asyncio.Event) -> int:
        """Keep every slot's child running until ``stop`` is set (then drain them all)."""
        log.info("supervisor_started", processes=self.processes, pid=os.getpid())
        self._keepers = [asyncio.create_task(self._keep(slot)) for slot in self.slots]
        for keeper in self._keepers:
            keeper.add_done_callback(self._keeper_done)
        stopped = asyncio.create_task(stop.wait())
        gave_up = asyncio.create_task(self._gave_up.wait())
        try:
            await asyncio.wait({stopped, gave_up}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            gave_up.cancel()
            await self._stop_children()
        if self.failure is not None:
            log.error("supervisor_gave_up", reason=self.failure)
            return 2
        log.info("supervisor_stopped", restarts=sum(s.restarts for s in self.slots))
        return 0

    def _keeper_done(self, task: asyncio.Task[None]) -> None:
        """A slot's keeper that failed (a bug, not a child's exit) ends the supervisor loudly
        rather than leaving the slot empty."""
        if task.cancelled() or task.exception() is None:
            return
        self.failure = self.failure or f"a child's keeper failed: {task.exception()!r}"
        self._gave_up.set()

    async def _keep(self, slot: ChildSlot) -> None:
        """Run the slot's child, and again after each exit (with back-off) until stopping."""
        bound = structlog.get_logger("kvpipe.supervisor").bind(child=slot.index)
        while not self._stopping:
            try:
                proc = await self._spawn(slot)
            except OSError as exc:
                self.failure = f"child {slot.index} could not start: {exc}"
                self._gave_up.set()
                return
            bound.info("child_started", pid=proc.pid, starts=slot.starts)
            status = await proc.wait()
            slot.last_status = status
            uptime = time.monotonic() - slot.started_at
            if self._stopping:
                return
            slot.failures = 1 if uptime >= self.backoff.healthy_s else slot.failures + 1
            delay = self.backoff.delay(slot.failures)
            bound.warning(
                "child_exited",
                pid=proc.pid,
                status=status,
                uptime_s=round(uptime, 2),
                failures_in_a_row=slot.failures,
                restart_in_s=delay,
            )
            if slot.failures >= self.give_up_after:
                self.failure = (
                    f"child {slot.index} exited {slot.failures} times in a row within "
                    f"{self.backoff.healthy_s:g} s of starting (last status {status})"
                )
                self._gave_up.set()
                return
            await asyncio.sleep(delay)

    async def _spawn(self, slot: ChildSlot) -> asyncio.subprocess.Process:
        with contextlib.suppress(FileNotFoundError):
            slot.port_file.unlink()
        argv = [*self.command, "--child", str(slot.index), "--port-file", str(slot.port_file)]
        slot.proc = await asyncio.create_subprocess_exec(
            *argv,
            env=dict(self._env(slot.index)),
            stdin=asyncio.subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent(),
        )
        slot.started_at = time.monotonic()
        slot.starts += 1
        return slot.proc

    async def _stop_children(self) -> None:
        """SIGTERM every child (each drains), wait up to ``stop_timeout_s``, kill the rest."""
        self._stopping = True
        for task in self._keepers:
            if not task.done():
                task.cancel()
        await asyncio.gather(*self._keepers, return_exceptions=True)
        live = [s.proc for s in self.slots if s.proc is not None and s.proc.returncode is None]
        if live:
            log.info("children_draining", count=len(live))
        for proc in live:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        waits = [asyncio.ensure_future(p.wait()) for p in live]
        try:
            if waits:
                await asyncio.wait(waits, timeout=self.stop_timeout_s)
        finally:
            for proc in live:
                if proc.returncode is None:
                    log.warning("child_killed", pid=proc.pid, after_s=self.stop_timeout_s)
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            with contextlib.suppress(BaseException):
                await asyncio.gather(*waits, return_exceptions=True)

    async def aclose(self) -> None:
        """Kill any child still running and remove the temporary directory; safe twice."""
        if self._closed:
            return
        self._closed = True
        try:
            if not self._stopping:
                self._stopping = True
                for task in self._keepers:
                    task.cancel()
                for slot in self.slots:
                    if slot.proc is not None and slot.proc.returncode is None:
                        with contextlib.suppress(ProcessLookupError):
                            slot.proc.kill()
                for slot in self.slots:
                    if slot.proc is not None:
                        with contextlib.suppress(Exception):
                            await asyncio.wait_for(asyncio.shield(slot.proc.wait()), 5.0)
        finally:
            if self._dir is not None:
                shutil.rmtree(self._dir, ignore_errors=True)
