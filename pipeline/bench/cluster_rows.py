"""The ``cluster`` suite: embedding rows per second through the cache's miss path, read from a
local Redis Cluster of 3 primaries against one of 1 primary, in the same run (and a single
Redis as a reference line).

Each side publishes the same two embedding tables (``KVPIPE_EMB_PARTITIONS`` hashes each on a
cluster, one hash on the single Redis). A run starts with an empty cache and asks the
registry for every row of both tables once, in batches of ``BATCH`` id pairs with
``IN_FLIGHT`` batches at a time, as a worker's concurrent batches would: every row is a miss,
so each batch is one HMGET per partition holding its rows, the partitions' nodes asked in
parallel. Every row is checked against the table. All nodes run on this machine, so this
measures the client and routing cost of a cluster, not the capacity of more hosts.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.bench.figures import Comparison, Emit, RunFigures, Side, side_line
from pipeline.cache.cache import ParamCache
from pipeline.config import RedisSettings, Settings
from pipeline.dev.cluster import LocalRedisCluster
from pipeline.io.kv import open_kv
from pipeline.params.models import build_model
from pipeline.params.registry import ModelRegistry
from pipeline.params.store import EMB_PARTITIONS, ParamStore

#: No goal: with every node on one machine (2 cores here) more primaries need not be faster;
#: the ratio is reported as measured.
CLUSTER_GOAL = 0.0
DIM = 32
BATCH = 256
IN_FLIGHT = 8
MODEL = "bench-rows"


@dataclass
class ClusterComparison(Comparison):
    """3 primaries against 1, with a single (non-cluster) Redis measured alongside."""

    reference: Side | None = None

    def as_dict(self) -> dict[str, Any]:
        doc = super().as_dict()
        if self.reference is not None:
            doc["reference"] = self.reference.as_dict()
        doc["partitions"] = EMB_PARTITIONS
        return doc


def _arch(pairs: int) -> dict[str, Any]:
    return {"kind": "embedding", "users": pairs, "items": pairs, "dim": DIM}


async def _publish(url: str, prefix: str, pairs: int, tables: dict[str, Any]) -> None:
    scorer = build_model(_arch(pairs))
    async with open_kv(RedisSettings(url=url)) as kv:
        store = ParamStore(kv, prefix=prefix)
        await store.publish(MODEL, scorer.arch, scorer.init(0), tables=tables)


async def _run(
    url: str, prefix: str, order: np.ndarray[Any, Any], tables: dict[str, Any], run: RunFigures
) -> None:
    """Every row of both tables once, through an empty cache, checked; timed into ``run``."""
    async with open_kv(RedisSettings(url=url, pool_size=IN_FLIGHT)) as kv:
        store = ParamStore(kv, prefix=prefix)
        cache: ParamCache[Any] = ParamCache(capacity_bytes=1 << 30, ttl_s=3600.0)
        registry = ModelRegistry(store, cache, version_ttl_s=3600.0)
        resolved = await registry.resolve(MODEL)
        batches = [order[i : i + BATCH] for i in range(0, len(order), BATCH)]
        queue = iter(batches)

        async def worker() -> None:
            for pairs in queue:
                ids = np.stack([pairs, pairs[::-1]], axis=1).astype(np.int64)
                got, _ = await registry.rows(resolved, ids)
                for column, table in enumerate(("user", "item")):
                    if np.array_equal(got[table], tables[table][ids[:, column]]):
                        run.ok += len(ids)
                    else:
                        run.wrong += len(ids)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
        run.seconds = time.perf_counter() - started
        run.detail["redis_reads"] = cache.stats.loads


async def bench_cluster(
    base: Settings, tag: str, rows: int, rounds: int, emit: Emit
) -> ClusterComparison:
    """Rows/s through the miss path on 3 primaries and on 1, and on a single Redis."""
    pairs = max(BATCH, rows // 2)
    total = 2 * pairs
    scorer = build_model(_arch(pairs))
    assert scorer.kind == "embedding"  # narrows the type: an EmbeddingModel has tables
    tables = scorer.init_tables(7)
    order = np.random.default_rng(3).permutation(pairs)
    three = Side("cluster", "three", "3 primaries", "rows/s", total)
    one = Side("cluster", "one", "1 primary", "rows/s", total)
    single = Side("cluster", "single", "single Redis", "rows/s", total)
    prefix = f"b{tag}"
    async with contextlib.AsyncExitStack() as stack:
        clusters = await asyncio.gather(
            stack.enter_async_context(LocalRedisCluster(3)),
            stack.enter_async_context(LocalRedisCluster(1)),
        )
        urls = {"three": clusters[0].url, "one": clusters[1].url, "single": base.redis.url}
        sides = {"three": three, "one": one, "single": single}
        for url in urls.values():
            await _publish(url, prefix, pairs, tables)
        for r in range(rounds):  # order A B C, then C B A, ...
            names = ["three", "one", "single"] if r % 2 == 0 else ["single", "one", "three"]
            for name in names:
                run = sides[name].new_run()
                try:
                    await _run(urls[name], prefix, order, tables, run)
                except Exception as exc:  # a side that fails has no figure, the others do
                    run.failure = f"{type(exc).__name__}: {exc}"
    for side in (three, one, single):
        emit(side_line(side))
    comparison = ClusterComparison("cluster", three, one, CLUSTER_GOAL, reference=single)
    ratio = comparison.ratio
    shown = "n/a (a side has no valid figure)" if ratio is None else f"{ratio:.2f}x"
    emit(
        f"{'cluster':<7} {'ratio 3/1':<18} {shown:>9}   (3 primaries / 1; all nodes on "
        f"this machine, {EMB_PARTITIONS} partitions a table: reported, no scaling promised)"
    )
    return comparison
