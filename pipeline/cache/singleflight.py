"""Single-flight: concurrent calls for one key share one execution of the loader."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Iterable, Mapping
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    """Run at most one load per key at a time; every concurrent caller gets its outcome.

    A load runs in its own task: a caller that is cancelled stops waiting but does not cancel
    the load, so the other waiters still get the value. A failed load is forgotten as soon as
    it finishes, so the next call tries again; every waiter of the failed load gets the same
    exception object. :meth:`start_many` loads many keys in one call (one round trip) while
    each key still has its own flight that other callers can join.
    """

    def __init__(self) -> None:
        self._flights: dict[K, asyncio.Future[V]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    def __len__(self) -> int:
        return len(self._flights)

    def in_flight(self, key: K) -> bool:
        """Whether a load for ``key`` is running now."""
        return key in self._flights

    async def do(self, key: K, load: Callable[[], Awaitable[V]]) -> tuple[V, bool]:
        """Return ``(value, leader)``; ``leader`` is True for the caller that started the load."""
        fut = self._flights.get(key)
        leader = fut is None
        if fut is None:
            fut = self._start(key, load)
        return await asyncio.shield(fut), leader

    def _start(self, key: K, load: Callable[[], Awaitable[V]]) -> asyncio.Future[V]:
        if self._closed:
            raise RuntimeError("SingleFlight is closed")
        task = asyncio.get_running_loop().create_task(self._run(load))
        self._track(task)
        self._flights[key] = task
        task.add_done_callback(lambda t, k=key: self._forget(k, t))  # type: ignore[misc]
        return task

    def start_many(
        self,
        keys: Iterable[K],
        load_many: Callable[[list[K]], Awaitable[Mapping[K, V]]],
        missing: Callable[[K], BaseException],
    ) -> dict[K, asyncio.Future[V]]:
        """Futures for every key: joined flights for keys in flight, one new bulk load for the rest.

        A key the bulk load does not return fails with ``missing(key)``.
        """
        if self._closed:
            raise RuntimeError("SingleFlight is closed")
        wanted = list(dict.fromkeys(keys))
        new = [k for k in wanted if k not in self._flights]
        if new:
            loop = asyncio.get_running_loop()
            futures: dict[K, asyncio.Future[V]] = {k: loop.create_future() for k in new}
            for key, fut in futures.items():
                self._flights[key] = fut
                fut.add_done_callback(lambda f, k=key: self._forget(k, f))  # type: ignore[misc]
            task = loop.create_task(self._run_many(load_many, new))
            self._track(task)
            task.add_done_callback(lambda t: self._distribute(t, futures, missing))
        return {k: self._flights[k] for k in wanted}

    @staticmethod
    async def _run(load: Callable[[], Awaitable[V]]) -> V:
        return await load()

    @staticmethod
    async def _run_many(
        load_many: Callable[[list[K]], Awaitable[Mapping[K, V]]], keys: list[K]
    ) -> Mapping[K, V]:
        return await load_many(keys)

    @staticmethod
    def _distribute(
        task: asyncio.Task[Mapping[K, V]],
        futures: dict[K, asyncio.Future[V]],
        missing: Callable[[K], BaseException],
    ) -> None:
        if task.cancelled():
            for fut in futures.values():
                fut.cancel()
            return
        exc = task.exception()
        values = task.result() if exc is None else {}
        for key, fut in futures.items():
            if fut.done():
                continue
            if exc is not None:
                fut.set_exception(exc)
            elif key in values:
                fut.set_result(values[key])
            else:
                fut.set_exception(missing(key))

    def _track(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _forget(self, key: K, fut: asyncio.Future[V]) -> None:
        if self._flights.get(key) is fut:
            del self._flights[key]
        if not fut.cancelled():
            fut.exception()  # mark retrieved: nobody waiting is not an error

    async def aclose(self) -> None:
        """Cancel loads still running and wait for them; safe to call twice."""
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
