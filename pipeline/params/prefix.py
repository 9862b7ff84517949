"""Prefix keys/values of the transformer, reused across requests and workers: two levels.

A prompt is cut into chunks of ``kv_chunk`` tokens (a property of the model version). Chunk
``i`` is named by a chained sha256: ``h_0 = sha256(model, version, kv_chunk)``,
``h_{i+1} = sha256(h_i, tokens of chunk i)``, so a name stands for every token up to the
chunk's end and for one version only: equal prefixes meet wherever they were computed, and a
new version never reuses old keys/values.

Each chunk's keys/values for all layers are one value (:func:`encode_chunk`: a magic, a JSON
header naming the chunk and its shape, the float32 bytes, a sha256 over all of it; never
pickle). Level one is the worker's own byte-budgeted :class:`~pipeline.cache.cache.ParamCache`;
level two is Redis, ``P:{model}:v{n}:kv:{digest}`` with a TTL. :meth:`PrefixCache.lookup` finds
the longest cached prefix: the local cache first, then one MGET for the remaining candidates,
stopping at the first miss or damaged value (a damaged chunk is recomputed and written again,
never used). New chunks go to Redis in the background; concurrent requests computing the
same chunk share one computation (:meth:`PrefixCache.compute`).
"""

from __future__ import annotations

import asyncio
import hashlib
import struct
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
import structlog

from pipeline.cache.cache import ParamCache
from pipeline.cache.singleflight import SingleFlight
from pipeline.errors import KvpipeError, ParamsCorrupt
from pipeline.io.kv import KeyValue
from pipeline.params.keys import PrefixKey
from pipeline.params.transformer import Transformer
from pipeline.resource import AsyncResource

log = structlog.get_logger("kvpipe.prefix")

Array = npt.NDArray[np.float32]

MAGIC = b"KVPC\x01"
_HEAD = struct.Struct("<5sI")  # magic, JSON header length
_DIGEST = 32
#: Largest JSON header a chunk value may carry (a hostile value cannot make us parse more).
_MAX_HEADER = 4096


def chunk_keys(
    model: str, version: int, chunk: int, tokens: Sequence[int], count: int
) -> list[PrefixKey]:
    """The names of the first ``count`` full chunks of ``tokens`` (chained sha256)."""
    h = hashlib.sha256(f"kvpipe-prefix\0{model}\0{version}\0{chunk}".encode()).digest()
    ids = np.asarray(tokens[: count * chunk], dtype="<i4")
    out: list[PrefixKey] = []
    for i in range(count):
        h = hashlib.sha256(h + ids[i * chunk : (i + 1) * chunk].tobytes()).digest()
        out.append(PrefixKey(model, version, h.hex()))
    return out


def chunk_shape(t: Transformer) -> tuple[int, int, int, int, int]:
    """The shape of one chunk's keys/values: ``(layers, 2, heads, kv_chunk, head_dim)``."""
    return (t.n_layers, 2, t.n_heads, t.kv_chunk, t.head_dim)


def encode_chunk(key: PrefixKey, kv: Array) -> bytes:
    """One chunk as bytes: magic, header length, JSON header, float32 data, sha256 of it all."""
    header = orjson.dumps({
        "model": key.model, "version": key.version, "digest": key.digest,
        "shape": list(kv.shape), "dtype": "<f4",
    })  # fmt: skip
    head = _HEAD.pack(MAGIC, len(header)) + header
    data = np.ascontiguousarray(kv, "<f4").data  # hashed and joined without a copy of its own
    digest = hashlib.sha256(head)
    digest.update(data)
    return b"".join((head, data, digest.digest()))


def decode_chunk(key: PrefixKey, blob: bytes, shape: tuple[int, ...]) -> Array:
    """The keys/values in ``blob``, checked: magic, checksum, that it names ``key`` and has
    ``shape``, finite values. ParamsCorrupt otherwise."""
    what = f"prefix chunk {key.digest[:12]} of {key.model!r} v{key.version}"
    if len(blob) < _HEAD.size + _DIGEST:
        raise ParamsCorrupt(f"{what} is truncated ({len(blob)} bytes)")
    body, digest = blob[:-_DIGEST], blob[-_DIGEST:]
    if hashlib.sha256(body).digest() != digest:
        raise ParamsCorrupt(f"{what} fails its checksum")
    magic, n = _HEAD.unpack_from(body)
    if magic != MAGIC or n > _MAX_HEADER or _HEAD.size + n > len(body):
        raise ParamsCorrupt(f"{what} is not a kvpipe prefix chunk")
    try:
        header = orjson.loads(body[_HEAD.size : _HEAD.size + n])
    except orjson.JSONDecodeError:
        raise ParamsCorrupt(f"{what} has an unreadable header") from None
    named = (header.get("model"), header.get("version"), header.get("digest"))
    if not isinstance(header, dict) or named != (key.model, key.version, key.digest):
        raise ParamsCorrupt(f"{what} holds another chunk")
    if header.get("shape") != list(shape) or header.get("dtype") != "<f4":
        raise ParamsCorrupt(f"{what} has shape {header.get('shape')}, expected {list(shape)}")
    data = body[_HEAD.size + n :]
    if len(data) != int(np.prod(shape)) * 4:
        raise ParamsCorrupt(f"{what} has {len(data)} data bytes for shape {list(shape)}")
    kv = np.frombuffer(data, dtype="<f4").reshape(shape).astype(np.float32)
    if not np.isfinite(kv).all():
        raise ParamsCorrupt(f"{what} is not finite")
    kv.flags.writeable = False
    return kv


@dataclass
class Reuse:
    """The longest cached prefix found for a prompt: its chunks and where they came from."""

    keys: list[PrefixKey]  # every full chunk the prompt has (cached or not)
    chunks: list[Array] = field(default_factory=list)  # the reused ones, in order
    local: int = 0  # chunks from this worker's memory
    redis: int = 0  # chunks from Redis
    damaged: int = 0  # chunks found damaged (not used; recomputed)
    bytes_read: int = 0  # bytes fetched from Redis


@dataclass
class PrefixStats:
    """Counters since start (chunks, bytes); the local cache keeps its own stats too."""

    lookups: int = 0
    local_chunks: int = 0
    redis_chunks: int = 0
    missed_chunks: int = 0
    damaged: int = 0
    computed: int = 0
    joined: int = 0
    bytes_read: int = 0
    writes: int = 0
    bytes_written: int = 0
    write_errors: int = 0
    writes_skipped: int = 0
    redis_errors: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class PrefixCache(AsyncResource):
    """The two levels of prefix keys/values for one worker (see the module docstring)."""

    def __init__(
        self,
        kv: KeyValue,
        *,
        key_prefix: str,
        capacity_bytes: int,
        ttl_s: float,
        max_pending_writes: int = 64,
        close_grace_s: float = 2.0,
    ) -> None:
        self.kv = kv
        self.key_prefix = key_prefix
        self.ttl_s = ttl_s
        self.local: ParamCache[Array] = ParamCache(
            capacity_bytes=capacity_bytes, ttl_s=ttl_s, entry_overhead_bytes=560
        )
        self.stats = PrefixStats()
        self._flights: SingleFlight[PrefixKey, Array] = SingleFlight()
        self._writes: set[asyncio.Task[None]] = set()
        self._max_pending = max_pending_writes
        self.close_grace_s = close_grace_s
        self._closed = False
        #: Off: no lookups, no sharing, nothing kept (the benchmark's "no prefix cache" side).
        self.enabled = True

    def redis_key(self, key: PrefixKey) -> str:
        return f"{self.key_prefix}:{key.model}:v{key.version}:kv:{key.digest}"

    async def aclose(self) -> None:
        """Stop background writes and computations, drop the local level; safe twice."""
        if self._closed:
            return
        self._closed = True
        if self._writes:  # a drain: writes under way get a short grace, then are dropped
            await asyncio.wait(set(self._writes), timeout=self.close_grace_s)
        for task in list(self._writes):
            task.cancel()
        try:
            if self._writes:
                await asyncio.gather(*self._writes, return_exceptions=True)
            await self._flights.aclose()
        finally:
            await self.local.aclose()

    async def flush(self) -> None:
        """Wait for the background writes started so far (tests and benchmarks)."""
        if self._writes:
            await asyncio.gather(*list(self._writes), return_exceptions=True)

    async def lookup(
        self, model: str, version: int, t: Transformer, tokens: Sequence[int]
    ) -> Reuse:
        """The longest cached prefix of ``tokens``, always leaving at least one token to compute
        (its logits start the generation)."""
        usable = (len(tokens) - 1) // t.kv_chunk
        reuse = Reuse(
            keys=chunk_keys(model, version, t.kv_chunk, tokens, len(tokens) // t.kv_chunk)
        )
        if not self.enabled:
            return reuse
        self.stats.lookups += 1
        candidates = reuse.keys[:usable]
        for key in candidates:
            if key not in self.local:
                break
            value, _ = await self.local.get(key, _never)
            reuse.chunks.append(value)
            reuse.local += 1
        rest = candidates[reuse.local :]
        if rest:
            try:
                blobs = await self.kv.mget([self.redis_key(k) for k in rest])
            except KvpipeError as exc:  # Redis down: compute, do not fail the request
                self.stats.redis_errors += 1
                log.warning("prefix_lookup_failed", model=model, error=str(exc))
                blobs = [None] * len(rest)
            shape = chunk_shape(t)
            reuse.bytes_read = sum(len(b) for b in blobs if b is not None)
            for key, blob in zip(rest, blobs, strict=True):
                if blob is None:
                    break
                try:
                    value = decode_chunk(key, blob, shape)
                except ParamsCorrupt as exc:
                    reuse.damaged += 1
                    log.warning("prefix_chunk_damaged", model=model, error=str(exc))
                    break
                self.local.put(key, value)
                reuse.chunks.append(value)
                reuse.redis += 1
        self.stats.local_chunks += reuse.local
        self.stats.redis_chunks += reuse.redis
        self.stats.missed_chunks += len(candidates) - len(reuse.chunks)
        self.stats.damaged += reuse.damaged
        self.stats.bytes_read += reuse.bytes_read
        return reuse

    def cached(self, key: PrefixKey) -> Array | None:
        """The chunk if this worker holds it now (another request may have just computed it)."""
        return self.local.peek(key)

    async def compute(
        self, key: PrefixKey, run: Callable[[], Awaitable[Array]]
    ) -> tuple[Array, bool]:
        """The chunk computed by ``run`` once for all concurrent callers; ``(kv, leader)``.
        The result is kept locally; the leader :meth:`share` s it when it suits it."""
        if not self.enabled:
            return await run(), True
        value, leader = await self._flights.do(key, lambda: self._computed(key, run))
        if leader:
            self.stats.computed += 1
        else:
            self.stats.joined += 1
        return value, leader

    async def _computed(self, key: PrefixKey, run: Callable[[], Awaitable[Array]]) -> Array:
        value = await run()
        value.flags.writeable = False
        self.remember(key, value)
        return value

    def keep(self, key: PrefixKey, value: Array) -> None:
        """:meth:`remember` and :meth:`share` a computed chunk."""
        self.remember(key, value)
        self.share(key, value)

    def remember(self, key: PrefixKey, value: Array) -> None:
        """Keep a computed chunk in this worker's cache (for the requests that follow)."""
        if not self._closed and self.enabled:
            self.local.put(key, value)

    def share(self, key: PrefixKey, value: Array) -> None:
        """Write a chunk to Redis in the background (bounded: when too many writes are
        pending, this one is skipped and counted). The generation calls it once its first
        token is out, so the encoding and the transfer never delay that token."""
        if self._closed or not self.enabled:
            return
        if len(self._writes) >= self._max_pending:
            self.stats.writes_skipped += 1
            return
        task = asyncio.get_running_loop().create_task(self._write(key, value))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(self, key: PrefixKey, value: Array) -> None:
        try:
            blob = await asyncio.get_running_loop().run_in_executor(None, encode_chunk, key, value)
            await self.kv.set(self.redis_key(key), blob, ex=self.ttl_s)
        except KvpipeError as exc:
            self.stats.write_errors += 1
            log.warning("prefix_write_failed", model=key.model, error=str(exc))
            return
        self.stats.writes += 1
        self.stats.bytes_written += len(blob)


async def _never() -> Array:
    raise KvpipeError("prefix chunk left the local cache during lookup", code="internal")
