"""The key/value bytes running generations may hold: a sequence starts when it fits."""

from __future__ import annotations

import asyncio


class KVBudget:
    """Bytes of keys/values reserved by running sequences, bounded by ``budget_bytes``: a
    sequence's prompt plus max_tokens is reserved before it starts and released on every path;
    it waits while it does not fit beside the others, and runs alone when it fits nowhere."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.used = 0  # reserved by running sequences now
        self.peak = 0
        self._freed = asyncio.Event()

    async def reserve(self, need: int) -> None:
        """Wait until ``need`` bytes of keys/values fit beside the running sequences."""
        while self.used and self.used + need > self.budget_bytes:
            self._freed.clear()
            await self._freed.wait()
        self.used += need
        self.peak = max(self.peak, self.used)

    def release(self, need: int) -> None:
        self.used -= need
        self._freed.set()
