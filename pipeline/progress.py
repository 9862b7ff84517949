"""Progress for the CLI: a rich bar on a terminal, nothing (then one summary line) otherwise."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol, TextIO


class Advance(Protocol):
    def __call__(self, completed: int) -> None: ...


@contextmanager
def progress(
    description: str, total: int, *, enabled: bool = True, stream: TextIO | None = None
) -> Iterator[Advance]:
    """Yield ``update(completed)``; draws a bar only when ``stream`` (stderr) is a terminal."""
    out = stream or sys.stderr
    if not enabled or not out.isatty():
        yield lambda completed: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    bar = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(file=out),
        transient=True,
    )
    with bar:
        task = bar.add_task(description, total=total)
        yield lambda completed: bar.update(task, completed=completed)
