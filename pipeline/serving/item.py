"""One fetched request on its way through the worker, and the tasks the parts start."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from pipeline.io.kafka import Message
from pipeline.io.wire import Request

#: Starts a background task the worker tracks (cancelled when the worker closes).
Spawn = Callable[[Coroutine[Any, Any, None]], None]


@dataclass(slots=True)
class Item:
    """A consumed message and the request read from it."""

    message: Message
    request: Request
    answered: bool = False  # an answer (result or dead letter) was handed to delivery
    span: Any = None  # its consume span, while tracing records spans (serving/tracing.py)


class Tasks:
    """Background tasks of one worker: errors logged by ``on_error``, all cancelled at close."""

    def __init__(self, on_error: Callable[[BaseException], None]) -> None:
        self._tasks: set[asyncio.Task[None]] = set()
        self._on_error = on_error

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        error = None if task.cancelled() else task.exception()
        if error is not None:
            self._on_error(error)

    async def cancel_all(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
