"""The result memo: outputs of dense models kept by (model, version, input digest), in this
worker's own byte budget and, when shared, in Redis for the whole fleet.

A batch is split into inputs answered already, inputs another batch is computing (borrowed:
waited for, not recomputed), inputs to compute, and repeats of an input earlier in the same
batch (computed once). A new version never answers from an old version's outputs; embedding
models are never memoized (their rows change without a new version).
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog

from pipeline.cache.cache import ENTRY_OVERHEAD_BYTES, ParamCache
from pipeline.config import CacheSettings
from pipeline.errors import KvpipeError
from pipeline.io.npy import from_npy, to_npy
from pipeline.io.wire import Request
from pipeline.params.keys import OutputKey
from pipeline.params.registry import Resolved
from pipeline.params.store import ParamStore
from pipeline.serving.item import Item, Spawn
from pipeline.serving.stats import WorkerStats

log = structlog.get_logger("kvpipe.worker")


@dataclass(slots=True)
class MemoSplit:
    """A batch split by the memo."""

    hits: list[tuple[Item, Any]] = field(default_factory=list)
    misses: list[Item] = field(default_factory=list)
    keys: list[OutputKey] = field(default_factory=list)
    repeats: list[tuple[Item, int]] = field(default_factory=list)  # (item, index in misses)
    owned: list[asyncio.Future[Any]] = field(default_factory=list)  # one per key, for others
    borrowed: list[tuple[Item, asyncio.Future[Any]]] = field(default_factory=list)


def _retrieve(fut: asyncio.Future[Any]) -> None:
    """Mark a shared future's exception as seen (each waiter handles it)."""
    if not fut.cancelled():
        fut.exception()


class ResultMemo:
    """Memoized outputs for the models ``settings.result_models`` names (``*``: all)."""

    def __init__(
        self,
        settings: CacheSettings,
        store: ParamStore,
        stats: WorkerStats,
        spawn: Spawn,
        *,
        entry_overhead_bytes: int = ENTRY_OVERHEAD_BYTES,
    ) -> None:
        self.settings = settings
        self.store = store
        self.stats = stats
        self._spawn = spawn
        self.cache: ParamCache[Any] = ParamCache(
            capacity_bytes=settings.result_bytes,
            ttl_s=settings.ttl_s,
            entry_overhead_bytes=entry_overhead_bytes,
        )
        self._pending: dict[OutputKey, asyncio.Future[Any]] = {}

    def applies(self, resolved: Resolved) -> bool:
        """Opted in per model, dense models only."""
        if resolved.model.kind != "dense":
            return False
        chosen = self.settings.result_models
        return "*" in chosen or resolved.name in chosen

    @staticmethod
    def key(resolved: Resolved, request: Request) -> OutputKey:
        x = request.inputs
        assert x is not None
        digest = hashlib.blake2b(x.tobytes(), digest_size=16)
        digest.update(f"{x.dtype.str}{x.shape}".encode())
        return OutputKey(resolved.name, resolved.version, digest.digest())

    async def split(self, resolved: Resolved, items: list[Item]) -> MemoSplit | None:
        """Split a batch (None when the memo does not apply to it)."""
        if not items or not self.applies(resolved):
            return None
        split = MemoSplit()
        first: dict[OutputKey, int] = {}
        loop = asyncio.get_running_loop()
        for it in items:
            key = self.key(resolved, it.request)
            out = self.cache.peek(key)
            if out is not None:
                split.hits.append((it, out))
            elif key in first:
                split.repeats.append((it, first[key]))
            elif key in self._pending:  # another batch is computing this input
                split.borrowed.append((it, self._pending[key]))
            else:
                first[key] = len(split.misses)
                split.misses.append(it)
                split.keys.append(key)
                fut: asyncio.Future[Any] = loop.create_future()
                fut.add_done_callback(_retrieve)
                self._pending[key] = fut
                split.owned.append(fut)
        if split.misses and self.settings.result_shared_ttl_s > 0:
            await self._shared(resolved, split)
        self.stats.memo_hits += len(split.hits) + len(split.repeats) + len(split.borrowed)
        self.stats.memo_misses += len(split.misses)
        return split

    async def _shared(self, resolved: Resolved, split: MemoSplit) -> None:
        """Move the misses another worker already answered (kept in Redis) to the hits.

        This batch owns those keys while it asks, so no batch here computes them meanwhile.
        Redis trouble costs the lookup, never the answer: the misses are computed.
        """
        try:
            blobs = await self.store.read_outputs(split.keys)
        except KvpipeError as exc:
            log.debug("memo_shared_read_failed", error=str(exc))
            return
        found: dict[int, Any] = {}
        for i, (it, blob) in enumerate(zip(split.misses, blobs, strict=True)):
            out = self._shared_output(resolved, it.request, blob)
            if out is not None:
                found[i] = out
        if not found:
            return
        kept = MemoSplit(hits=split.hits, borrowed=split.borrowed)
        index: dict[int, int] = {}
        for i, (it, key, fut) in enumerate(zip(split.misses, split.keys, split.owned, strict=True)):
            if i in found:
                self.cache.put(key, found[i])
                fut.set_result(found[i])
                del self._pending[key]
                kept.hits.append((it, found[i]))
            else:
                index[i] = len(kept.misses)
                kept.misses.append(it)
                kept.keys.append(key)
                kept.owned.append(fut)
        for it, j in split.repeats:
            if j in found:
                kept.hits.append((it, found[j]))
            else:
                kept.repeats.append((it, index[j]))
        self.stats.memo_shared_hits += len(found)
        split.hits, split.misses, split.keys = kept.hits, kept.misses, kept.keys
        split.owned, split.repeats = kept.owned, kept.repeats

    @staticmethod
    def _shared_output(resolved: Resolved, request: Request, blob: bytes | None) -> Any:
        """A shared output, if it is one: float32 ``.npy`` of the shape this request gets."""
        if blob is None:
            return None
        try:
            out = from_npy(blob, max_elements=request.rows * resolved.model.output_dim)
        except ValueError:
            return None
        if out.dtype != np.float32 or out.shape != (request.rows, resolved.model.output_dim):
            return None
        out.flags.writeable = False
        return out

    def keep(self, split: MemoSplit, outputs: list[Any]) -> None:
        """Keep the computed outputs, hand them to batches waiting for the same inputs, and
        (when shared) copy them to Redis in the background. An output that is an error (not
        finite) is handed on as that error and never kept."""
        share = self.settings.result_shared_ttl_s
        blobs: dict[OutputKey, bytes] = {}
        for key, fut, out in zip(split.keys, split.owned, outputs, strict=True):
            if isinstance(out, KvpipeError):
                if not fut.done():
                    fut.set_exception(out)
                continue
            out = np.array(out)  # its own buffer: a split view would pin the whole batch
            out.flags.writeable = False
            self.cache.put(key, out)
            if not fut.done():
                fut.set_result(out)
            if share > 0:
                blobs[key] = to_npy(out)
        if blobs:
            self._spawn(self._share(blobs, share))

    async def _share(self, blobs: dict[OutputKey, bytes], ttl: float) -> None:
        try:
            await self.store.write_outputs(blobs, ttl)
        except KvpipeError as exc:
            log.debug("memo_shared_write_failed", error=str(exc))

    def release(self, split: MemoSplit) -> None:
        """Whatever happened to the batch, no other batch waits for it any longer."""
        for key, fut in zip(split.keys, split.owned, strict=True):
            if not fut.done():
                fut.set_exception(KvpipeError("the batch computing this input failed"))
            if self._pending.get(key) is fut:
                del self._pending[key]

    async def borrowed(self, split: MemoSplit) -> list[tuple[Item, Any]]:
        """Outputs another batch computed meanwhile: (item, output), or (item, its error)."""
        out: list[tuple[Item, Any]] = []
        for it, fut in split.borrowed:
            try:
                out.append((it, await asyncio.shield(fut)))
            except KvpipeError as exc:
                out.append((it, exc))
        return out
