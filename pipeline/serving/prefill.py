"""A generation's prompt computed after its reused prefix, one chunk at a time."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

import numpy as np

from pipeline.params.prefix import PrefixCache
from pipeline.params.transformer import KVState
from pipeline.serving.sequence import DeadlinePassed, Generation

T = TypeVar("T")


class ChunkedPrefill:
    """Prefills in the compute threads, one chunk of any request at a time (beside the decode
    thread, so a burst of new prompts never holds the running streams for long); a chunk
    another request is computing is joined, not computed twice."""

    def __init__(self, prefix: PrefixCache) -> None:
        self.prefix = prefix
        self.executor: Executor | None = None  # the worker's compute threads
        self._slot = asyncio.Semaphore(1)

    async def _compute(self, fn: Callable[..., T], *args: Any) -> T:
        """A prefill chunk in the compute threads, one at a time: beside the decode thread,
        so a burst of new prompts costs the running streams one chunk's worth of CPU, never
        all of their prefills at once (they queue here, chunk by chunk, in arrival order)."""
        async with self._slot:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.executor, fn, *args)

    async def run(self, seq: Generation) -> np.ndarray[Any, Any]:
        """Compute the prompt after the reused prefix, one chunk per compute call; full chunks
        are shared (single-flight) and kept (local and Redis); returns the last logits."""
        model, params, prompt = seq.model, seq.resolved.params, list(seq.spec.prompt)
        chunk = model.kv_chunk
        assert seq.reuse is not None
        keys = seq.reuse.keys
        usable = (len(prompt) - 1) // chunk
        for i in range(len(seq.reuse.chunks), usable):
            _check_deadline(seq)
            key = keys[i]
            lo, hi = i * chunk, (i + 1) * chunk
            have = self.prefix.cached(key)
            if have is not None:
                seq.state.append(have)
                seq.joined += chunk
                continue
            state = seq.state

            async def run(lo: int = lo, hi: int = hi, state: KVState = state) -> Any:
                await self._compute(model.prefill, params, prompt[lo:hi], state)
                return state.span(lo, hi)

            kv, leader = await self.prefix.compute(key, run)
            if leader:
                seq.computed += chunk
                seq.unshared.append((key, kv))
            else:
                seq.state.append(kv)
                seq.joined += chunk
        _check_deadline(seq)
        start = seq.state.length
        logits = await self._compute(model.prefill, params, prompt[start:], seq.state)
        seq.computed += len(prompt) - start
        for i in range(usable, len(keys)):  # a prompt ending on a chunk boundary: keep it too
            span = seq.state.span(i * chunk, (i + 1) * chunk)
            self.prefix.remember(keys[i], span)
            seq.unshared.append((keys[i], span))
        return logits

    def share(self, seq: Generation) -> None:
        """Write the chunks this request computed to Redis (in the background)."""
        for key, kv in seq.unshared:
            self.prefix.share(key, kv)
        seq.unshared.clear()


def _check_deadline(seq: Generation) -> None:
    if seq.past_deadline():
        raise DeadlinePassed
