"""Child processes for the benchmarks: workers and echoes, each stopped on the way out.

Every process started through :class:`Children` is stopped when the ``async with`` block is
left, however it is left (an error, a cancelled task, Ctrl-C): SIGTERM, a bounded wait, then
SIGKILL. On Linux a child is also killed when the bench process dies (``PR_SET_PDEATHSIG``).
Output goes to one log file per process, whose tail explains an early exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import Settings, settings_to_env
from pipeline.dev.local import _die_with_parent
from pipeline.errors import KvpipeError
from pipeline.resource import AsyncResource


@dataclass
class Child:
    """One started process and where its output goes."""

    name: str
    proc: asyncio.subprocess.Process
    log: Path

    def tail(self, lines: int = 3) -> str:
        """The last lines the process wrote (for an error message)."""
        try:
            text = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    def check_alive(self) -> None:
        """Raise when the process has already exited."""
        code = self.proc.returncode
        if code is not None:
            raise KvpipeError(
                f"{self.name} exited with status {code}: {self.tail() or 'no output'}"
            )


def child_env(settings: Settings, name: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a kvpipe child: ours without ``KVPIPE_*``, then the settings'."""
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("KVPIPE_")},
        **settings_to_env(settings),
        "KVPIPE_WORKER_ID": name,
        "KVPIPE_LOG_FORMAT": "json",
        "KVPIPE_LOG_LEVEL": "warning",
        **(extra or {}),
    }


class Children(AsyncResource):
    """Processes started with :meth:`spawn`; all are stopped by :meth:`aclose`."""

    def __init__(self, *, stop_timeout_s: float = 20.0) -> None:
        self.stop_timeout_s = stop_timeout_s
        self.children: list[Child] = []
        self._dir = tempfile.TemporaryDirectory(prefix="kvpipe-bench-")

    async def spawn(self, name: str, module: str, env: dict[str, str]) -> Child:
        """Start ``python -m module`` with ``env``; stdout and stderr go to a log file."""
        log = Path(self._dir.name) / f"{name}.log"
        with log.open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                module,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                preexec_fn=_die_with_parent(),  # even a SIGKILLed bench leaves none behind
            )
        child = Child(name, proc, log)
        self.children.append(child)
        return child

    def check_alive(self) -> None:
        """Raise when any child has exited."""
        for child in self.children:
            child.check_alive()

    async def stop(self, child: Child) -> int:
        """SIGTERM, wait (bounded), then SIGKILL; returns the exit status."""
        proc = child.proc
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), self.stop_timeout_s)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        return proc.returncode if proc.returncode is not None else -1

    async def stop_all(self) -> None:
        """Stop every child at once; after a cancellation, kill what is left without waiting."""
        try:
            await asyncio.gather(*(self.stop(c) for c in self.children))
        finally:
            for child in self.children:
                if child.proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        child.proc.kill()

    async def aclose(self) -> None:
        """Stop every child, then remove the log files."""
        try:
            await self.stop_all()
        finally:
            self.children.clear()
            self._dir.cleanup()
