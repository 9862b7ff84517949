"""The ``naive`` suite: the cached worker against the article's method (everything from Redis)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

import numpy as np
import structlog

from consumers.updates import start_listener
from pipeline.bench.figures import Comparison, Emit, RunFigures, Side
from pipeline.bench.harness import Step, compare, run_worker_side, wait_event
from pipeline.cache.cache import ParamCache, Source
from pipeline.config import Settings
from pipeline.io.kafka import Producer, ensure_topics
from pipeline.io.kv import open_kv
from pipeline.io.wire import NPY
from pipeline.params.models import preset
from pipeline.params.registry import ModelRegistry, Resolved
from pipeline.params.store import ParamStore
from pipeline.serving.worker import Worker, WorkerStats

NAIVE_GOAL = 100.0


class NaiveRegistry(ModelRegistry):
    """The article's method: each resolve reads pointer, manifest and every tensor from Redis."""

    # No parameter is kept between calls (only the architecture object, which holds none; the
    # cache it is given is never used). The semaphore queues fetches for the Redis pool, whose
    # own 2 s wait limit would otherwise turn a deep backlog into timeouts, not a figure.

    def __init__(self, store: ParamStore, cache: ParamCache[Any], *, concurrency: int) -> None:
        super().__init__(store, cache)
        self._slots = asyncio.Semaphore(max(1, concurrency))
        self.fetches = 0
        self.bytes_fetched = 0

    async def resolve(self, name: str, version: int | None = None) -> Resolved:
        """Read and verify the whole version from Redis, every time."""
        async with self._slots:
            manifest, params = await self.store.load(name, version)
        self.fetches += 1
        self.bytes_fetched += manifest.nbytes
        model = self._model_for(manifest)
        return Resolved(name, manifest.version, model, manifest, params, Source.LOADED)


async def serve_naive(
    settings: Settings, stop: asyncio.Event, on_ready: Callable[[Worker], None]
) -> WorkerStats:
    """The serving worker with :class:`NaiveRegistry` for its registry, until ``stop``."""
    # The parts of consumers.inference.serve, composed here (no status server: the bench has none).
    async with AsyncExitStack() as stack:
        kv = await stack.enter_async_context(open_kv(settings.redis))
        store = ParamStore(kv, prefix=settings.redis.key_prefix)
        cache: ParamCache[object] = await stack.enter_async_context(
            ParamCache(capacity_bytes=settings.cache.capacity_bytes, ttl_s=settings.cache.ttl_s)
        )
        registry = NaiveRegistry(store, cache, concurrency=settings.redis.pool_size)
        k = settings.kafka
        await ensure_topics(k, [k.requests_topic, k.results_topic, k.dlq_topic, k.updates_topic])
        producer = await stack.enter_async_context(
            Producer(k, send_timeout_s=settings.worker.send_timeout_s)
        )
        listener = await start_listener(stack, settings, registry, stop)
        worker = await stack.enter_async_context(
            Worker(settings, registry=registry, producer=producer, listener=listener)
        )
        structlog.contextvars.bind_contextvars(worker=worker.worker_id)
        on_ready(worker)
        await worker.run(stop)
        return worker.stats


async def start_naive(
    settings: Settings, stop: asyncio.Event, timeout_s: float = 60.0
) -> tuple[Worker, asyncio.Task[WorkerStats]]:
    """Run :func:`serve_naive` as a task; return once its worker owns partitions."""
    workers: list[Worker] = []
    ready = asyncio.Event()

    def on_ready(worker: Worker) -> None:
        workers.append(worker)
        ready.set()

    task = asyncio.create_task(serve_naive(settings, stop, on_ready))
    try:
        await wait_event(ready, task, timeout_s)
        await wait_event(workers[0].assigned, task, timeout_s)
    except BaseException:
        stop.set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise
    return workers[0], task


async def bench_naive(
    base: Settings,
    tag: str,
    requests: int,
    naive_requests: int,
    rounds: int,
    emit: Emit,
    wire: str = NPY,
) -> Comparison:
    """The cached worker against the article's method, on the article's model."""
    model = preset("article")
    params = model.init(0)
    rng = np.random.default_rng(1)
    cached_inputs = rng.standard_normal((requests, model.input_dim)).astype(np.float32)
    naive_inputs = rng.standard_normal((naive_requests, model.input_dim)).astype(np.float32)

    async def cached(run: RunFigures, settings: Settings) -> None:
        await run_worker_side(
            run, settings, model, params, cached_inputs,
            timeout_s=60.0 + requests / 10, wire=wire,
        )  # fmt: skip

    async def naive(run: RunFigures, settings: Settings) -> None:
        await run_worker_side(
            run, settings, model, params, naive_inputs,
            timeout_s=60.0 + naive_requests / 2, wire=wire, start=start_naive,
        )  # fmt: skip

    cmp = Comparison(
        "naive",
        Side("naive", "cached", "cached worker", "req/s", requests),
        Side("naive", "naive", "article method", "req/s", naive_requests),
        NAIVE_GOAL,
    )
    steps: dict[str, tuple[Step, dict[str, Any]]] = {
        "cached": (cached, {}),
        "naive": (naive, {"worker.max_batch_size": 1}),
    }
    return await compare(cmp, steps, base=base, tag=tag, rounds=rounds, emit=emit)
