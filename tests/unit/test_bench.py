"""The benchmark's own logic without services: figures, ratios, the article's registry."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.bench.figures import (
    Comparison,
    RunFigures,
    Side,
    ratio_line,
    request_backlog,
    side_line,
)
from pipeline.bench.harness import FetchCounts, side_settings
from pipeline.bench.naive import NaiveRegistry
from pipeline.cache.cache import ParamCache, Source
from pipeline.config import LimitSettings, Settings
from pipeline.io.kv.memory import MemoryKV
from pipeline.io.wire import decode_request
from pipeline.params.models import preset
from pipeline.params.registry import ModelRegistry
from pipeline.params.store import ParamStore


def _side(name: str, runs: list[tuple[int, float]], unit: str = "req/s") -> Side:
    side = Side("naive", name, name, unit, runs[0][0])
    for requests, seconds in runs:
        run = side.new_run()
        run.requests, run.seconds, run.ok = requests, seconds, requests
    return side


def test_side_rate_is_all_answers_over_all_timed_seconds() -> None:
    side = _side("cached", [(100, 1.0), (100, 3.0)])
    assert side.passed
    assert side.rate == 50.0
    assert "50.0 req/s (100 requests x 2 runs: 100.0, 33.3)" in side_line(side)


def test_a_wrong_answer_voids_the_side_and_the_ratio() -> None:
    good = _side("cached", [(10, 1.0)])
    bad = _side("naive", [(10, 1.0)])
    bad.runs[0].ok, bad.runs[0].wrong = 9, 1
    cmp = Comparison("naive", good, bad, 50.0)
    assert bad.rate is None and cmp.ratio is None and not cmp.passed
    assert "FAIL" in side_line(bad) and "wrong 1" in side_line(bad)
    assert "n/a" in ratio_line(cmp)
    assert cmp.as_dict()["goal_met"] is False


def test_missing_answers_or_a_failure_void_a_run() -> None:
    assert not RunFigures(5, seconds=1.0, ok=4, missing=1).passed
    assert not RunFigures(5, seconds=1.0, ok=5, failure="broker gone").passed
    assert not RunFigures(5, seconds=0.0, ok=5).passed
    assert RunFigures(5, seconds=1.0, ok=5, duplicates=2).passed


def test_ratio_against_goal() -> None:
    cmp = Comparison("naive", _side("a", [(100, 1.0)]), _side("b", [(10, 1.0)]), 50.0)
    assert cmp.ratio == 10.0
    assert "10.00x" in ratio_line(cmp) and "NOT met" in ratio_line(cmp)
    cmp.goal = 5.0
    assert ratio_line(cmp).endswith("(goal >= 5x: met)")


def test_each_side_gets_its_own_topics_group_and_keys() -> None:
    a = side_settings(Settings(), "run1", "cached-0")
    b = side_settings(Settings(), "run1", "naive-0", {"worker.max_batch_size": 1})
    assert a.kafka.topic_prefix != b.kafka.topic_prefix
    assert a.kafka.group_id != b.kafka.group_id
    assert a.redis.key_prefix != b.redis.key_prefix
    assert a.kafka.partitions == b.kafka.partitions == 4
    assert (a.worker.max_batch_size, b.worker.max_batch_size) == (128, 1)


def test_backlog_is_one_json_request_per_row_keyed_by_id() -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    ids, backlog = request_backlog(x)
    assert ids == ["b0", "b1"]
    key, value, headers = backlog[1]
    request = decode_request(value, headers, LimitSettings())
    assert key == b"b1" and request.id == "b1"
    assert request.inputs is not None and request.inputs.tolist() == [[3.0, 4.0, 5.0]]


async def test_naive_registry_reads_everything_from_redis_every_time() -> None:
    kv = MemoryKV()
    store = ParamStore(kv, prefix="t")
    model = preset("mlp")
    params = model.init(0)
    await store.publish("m", model.arch, params)
    cache: ParamCache[Any] = ParamCache(capacity_bytes=10**8, ttl_s=60.0)
    registry = NaiveRegistry(store, cache, concurrency=2)
    before = dict(kv.calls)
    for _ in range(3):
        resolved = await registry.resolve("m")
        assert resolved.source is Source.LOADED and resolved.version == 1
        for name, arr in params.items():
            np.testing.assert_array_equal(resolved.params[name], arr)
    assert kv.calls["mget"] - before.get("mget", 0) == 3  # every tensor, every call
    assert kv.calls["get"] - before.get("get", 0) == 6  # pointer and manifest, every call
    assert registry.fetches == 3 and len(cache) == 0
    # the harness reports its Redis reads, not cache figures; the cached registry's are
    assert isinstance(registry, FetchCounts)
    assert not isinstance(ModelRegistry(store, cache), FetchCounts)
