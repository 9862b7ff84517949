"""Running generations advanced a token per step, batched per (model, version)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import structlog

from pipeline.errors import KvpipeError
from pipeline.resource import AsyncResource
from pipeline.serving.sequence import Generation

log = structlog.get_logger("kvpipe.generation")

T = TypeVar("T")

#: What a step does with a sequence's logits: sample, stream, decide whether it is finished.
Advance = Callable[[Generation, np.ndarray[Any, Any]], Awaitable[None]]


class DecodeGroups(AsyncResource):
    """The decode groups, one per (model, version): every step advances up to ``max_batch``
    of a group's sequences (in turn, when it holds more) by one token in one numpy call, on a
    decode thread of its own; a sequence's ``done`` is set when it leaves."""

    def __init__(self, advance: Advance, *, max_batch: int = 64) -> None:
        self.advance = advance
        self.max_batch = max_batch
        #: Decode steps run on a thread of their own, so they never queue behind prefill chunks
        #: in the compute threads (a burst of new prompts would stall every running stream).
        self._pool: ThreadPoolExecutor | None = None
        self._groups: dict[tuple[str, int], list[Generation]] = {}
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._closed = False
        self.steps = 0  # decode steps run
        self.stepped_sequences = 0  # sequences advanced over all steps (mean batch = / steps)

    @property
    def active(self) -> int:
        return sum(len(g) for g in self._groups.values())

    async def aclose(self) -> None:
        """Stop the decode loop and its thread; safe twice."""
        self._closed = True
        try:
            if self._loop_task is not None:
                self._loop_task.cancel()
                await asyncio.gather(self._loop_task, return_exceptions=True)
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)

    def join(self, seq: Generation) -> None:
        self._groups.setdefault(seq.group, []).append(seq)
        self._wake.set()
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._loop())

    def leave(self, seq: Generation) -> None:
        group = self._groups.get(seq.group)
        if group is not None and seq in group:
            group.remove(seq)
            if not group:
                del self._groups[seq.group]
        if seq.done is not None and not seq.done.done():
            seq.done.set_result(None)

    async def _decode(self, fn: Callable[..., T], *args: Any) -> T:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="kvpipe-decode")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def _loop(self) -> None:
        """Advance every active sequence by one token per step, one numpy call per group."""
        while not self._closed:
            if not self._groups:
                self._wake.clear()
                await self._wake.wait()
                continue
            for key in list(self._groups):
                group = self._groups.get(key, [])[: self.max_batch]
                if not group:
                    continue
                try:
                    await self._step(key, group)
                except Exception as exc:  # one bad step fails its sequences, never the loop
                    log.exception("decode_failed", model=key[0], sequences=len(group))
                    for s in group:
                        if s.finish is None:
                            s.finish, s.error = "error", KvpipeError(f"internal error: {exc}")
                        self.leave(s)

    async def _step(self, key: tuple[str, int], group: list[Generation]) -> None:
        model, params = group[0].model, group[0].resolved.params
        logits = await self._decode(
            model.decode, params, [s.tokens[-1] for s in group], [s.state for s in group]
        )
        self.steps += 1
        self.stepped_sequences += len(group)
        for s, row in zip(group, logits, strict=True):
            await self.advance(s, row)
            if s.finish is not None:
                self.leave(s)
        waiting = self._groups.get(key)
        if waiting is not None and len(waiting) > self.max_batch:  # the next step: the others
            stepped = {id(s) for s in group}
            waiting.sort(key=lambda s: id(s) in stepped)
