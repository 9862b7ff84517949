"""Single-flight: concurrent calls for one key share one execution of the loader."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    """Run at most one load per key at a time; every concurrent caller gets its outcome.

    The load runs in its own task: a caller that is cancelled stops waiting but does not
    cancel the load, so the other waiters still get the value. A failed load is forgotten as
    soon as it finishes, so the next call tries again; every waiter of the failed load gets
    the same exception object.
    """

    def __init__(self) -> None:
        self._flights: dict[K, asyncio.Task[V]] = {}
        self._closed = False

    def __len__(self) -> int:
        return len(self._flights)

    def in_flight(self, key: K) -> bool:
        """Whether a load for ``key`` is running now."""
        return key in self._flights

    async def do(self, key: K, load: Callable[[], Awaitable[V]]) -> tuple[V, bool]:
        """Return ``(value, leader)``; ``leader`` is True for the caller that started the load."""
        task = self._flights.get(key)
        leader = task is None
        if task is None:
            if self._closed:
                raise RuntimeError("SingleFlight is closed")
            task = asyncio.get_running_loop().create_task(self._run(load))
            self._flights[key] = task
            task.add_done_callback(lambda t, k=key: self._forget(k, t))  # type: ignore[misc]
        return await asyncio.shield(task), leader

    @staticmethod
    async def _run(load: Callable[[], Awaitable[V]]) -> V:
        return await load()

    def _forget(self, key: K, task: asyncio.Task[V]) -> None:
        if self._flights.get(key) is task:
            del self._flights[key]
        if not task.cancelled():
            task.exception()  # mark retrieved: nobody waiting is not an error

    async def aclose(self) -> None:
        """Cancel loads still running and wait for them; safe to call twice."""
        self._closed = True
        tasks = list(self._flights.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
