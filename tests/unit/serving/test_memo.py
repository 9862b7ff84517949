"""The result memo on the shipped in-memory KV: no broker, no Redis."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from pipeline.cache.cache import ParamCache
from pipeline.config import CacheSettings
from pipeline.errors import KvpipeError
from pipeline.io.kafka import Message, Partition
from pipeline.io.kv.memory import MemoryKV
from pipeline.io.wire import Request
from pipeline.params.models import preset
from pipeline.params.registry import ModelRegistry, Resolved
from pipeline.params.store import ParamStore
from pipeline.serving.item import Item
from pipeline.serving.memo import ResultMemo
from pipeline.serving.stats import WorkerStats

MODEL = preset("mlp")


def item(value: float, offset: int = 0) -> Item:
    x = np.full((1, MODEL.input_dim), value, dtype=np.float32)
    msg = Message(Partition("t", 0), offset, None, b"", (), 0)
    return Item(msg, Request(id=f"r{offset}", model="m", inputs=x))


async def setup(**settings: Any) -> tuple[ResultMemo, Resolved, list[Any]]:
    kv = MemoryKV()
    store = ParamStore(kv, prefix="t")
    await store.publish("m", MODEL.arch, MODEL.init(0))
    registry = ModelRegistry(store, ParamCache(capacity_bytes=10**8, ttl_s=60.0))
    resolved = await registry.resolve("m")
    tasks: list[Any] = []
    memo = ResultMemo(
        CacheSettings(result_models=("m",), **settings),
        store,
        WorkerStats(),
        lambda coro: tasks.append(asyncio.ensure_future(coro)),
    )
    return memo, resolved, tasks


def outputs_for(items: list[Item]) -> list[Any]:
    return [np.full((1, 8), it.request.inputs[0, 0], dtype=np.float32) for it in items]  # type: ignore[index]


async def test_hits_misses_and_repeats_in_one_batch() -> None:
    memo, resolved, _ = await setup()
    batch = [item(1.0, 0), item(2.0, 1), item(1.0, 2)]
    split = await memo.split(resolved, batch)
    assert split is not None
    assert [it.message.offset for it in split.misses] == [0, 1]
    assert [(it.message.offset, j) for it, j in split.repeats] == [(2, 0)]
    memo.keep(split, outputs_for(split.misses))
    memo.release(split)
    again = await memo.split(resolved, [item(2.0, 3), item(3.0, 4)])
    assert again is not None
    assert [it.message.offset for it, _ in again.hits] == [3]
    assert [it.message.offset for it in again.misses] == [4]
    assert memo.stats.memo_hits == 2 and memo.stats.memo_misses == 3


async def test_a_batch_borrows_what_another_is_computing() -> None:
    memo, resolved, _ = await setup()
    first = await memo.split(resolved, [item(1.0, 0)])
    second = await memo.split(resolved, [item(1.0, 1)])
    assert first is not None and second is not None
    assert second.misses == [] and len(second.borrowed) == 1
    waiting = asyncio.ensure_future(memo.borrowed(second))
    await asyncio.sleep(0)
    assert not waiting.done()
    memo.keep(first, outputs_for(first.misses))
    ((it, out),) = await waiting
    assert it.message.offset == 1 and float(out[0, 0]) == 1.0


async def test_errors_are_handed_on_never_kept() -> None:
    memo, resolved, _ = await setup()
    first = await memo.split(resolved, [item(1.0, 0), item(2.0, 1)])
    second = await memo.split(resolved, [item(1.0, 2), item(2.0, 3)])
    assert first is not None and second is not None
    bad = KvpipeError("not finite", code="non_finite_output")
    memo.keep(first, [bad, outputs_for(first.misses)[1]])
    memo.release(first)
    borrowed = await memo.borrowed(second)
    assert borrowed[0][1] is bad and float(borrowed[1][1][0, 0]) == 2.0
    third = await memo.split(resolved, [item(1.0, 4)])
    assert third is not None and len(third.misses) == 1  # the error was not memoized
    memo.release(third)


async def test_a_failed_batch_releases_whoever_waits() -> None:
    memo, resolved, _ = await setup()
    first = await memo.split(resolved, [item(1.0, 0)])
    second = await memo.split(resolved, [item(1.0, 1)])
    assert first is not None and second is not None
    memo.release(first)  # computed nothing
    ((_, error),) = await memo.borrowed(second)
    assert isinstance(error, KvpipeError)
    again = await memo.split(resolved, [item(1.0, 2)])
    assert again is not None and len(again.misses) == 1  # nobody is computing it any longer


async def test_shared_outputs_reach_another_worker_and_damaged_ones_are_recomputed() -> None:
    memo, resolved, tasks = await setup(result_shared_ttl_s=60.0)
    split = await memo.split(resolved, [item(1.0, 0), item(2.0, 1)])
    assert split is not None
    memo.keep(split, outputs_for(split.misses))
    await asyncio.gather(*tasks)
    other = ResultMemo(memo.settings, memo.store, WorkerStats(), lambda coro: None)
    got = await other.split(resolved, [item(1.0, 2), item(2.0, 3)])
    assert got is not None and len(got.hits) == 2 and other.stats.memo_shared_hits == 2
    third = ResultMemo(memo.settings, memo.store, WorkerStats(), lambda coro: None)
    key = third.key(resolved, item(1.0, 0).request)
    await memo.store.write_outputs({key: b"not an npy"}, 60.0)
    damaged = await third.split(resolved, [item(1.0, 4)])
    assert damaged is not None and len(damaged.misses) == 1 and damaged.hits == []


async def test_only_chosen_dense_models() -> None:
    memo, resolved, _ = await setup()
    assert memo.applies(resolved)
    other = ResultMemo(
        CacheSettings(result_models=("x",)), memo.store, WorkerStats(), lambda coro: None
    )
    assert not other.applies(resolved) and await other.split(resolved, [item(1.0)]) is None
