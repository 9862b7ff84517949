"""The trainer against hostile examples on PREFIX.training, on the real broker and Redis: it
keeps running, skips and counts every bad example, publishes only finite versions, and a
worker serving what it published answers ok with finite outputs."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

import numpy as np
import orjson
import pytest

from consumers.trainer import Publish, TrainSettings, train
from pipeline.client import ResultStream
from pipeline.io.kafka import Producer, ensure_topics
from pipeline.io.kv import open_kv
from pipeline.params.store import ParamStore
from tests.integration.conftest import collect

pytestmark = pytest.mark.integration

GOOD = 24


def example(inputs: Any, target: Any) -> bytes:
    return orjson.dumps({"inputs": inputs, "target": target})


def hostile_mix() -> tuple[list[bytes | None], Counter[str], int]:
    """Good examples (the last message one of them) among junk; (messages, skipped by reason,
    examples that are valid but make a step explode)."""
    rng = np.random.default_rng(7)
    good = [
        example(rng.standard_normal(32).round(3).tolist(), (rng.random(8) - 0.5).round(3).tolist())
        for _ in range(GOOD)
    ]
    bad: list[tuple[bytes | None, str]] = [
        *[(example([0.1] * 32, "oops"), "not_numbers")] * 3,
        *[(example([0.1] * 32, [1e39] * 8), "out_of_range")] * 3,
        (example([1e39] * 32, [0.0] * 8), "out_of_range"),
        (b"\xff\xfe\x00 not utf-8", "not_utf8"),
        (b"\x80\x04\x95\x00 a pickle header", "not_utf8"),
        (b"hello, trainer", "not_json"),
        (b'{"inputs": [NaN' + b", 0.1" * 31 + b'], "target": [0,0,0,0,0,0,0,0]}', "not_json"),
        (b'{"inputs": [0.1' + b", 0.1" * 31 + b'], "target": [NaN,0,0,0,0,0,0,0]}', "not_json"),
        (example([0.1] * 31, [0.0] * 8), "wrong_width"),
        (example([0.1] * 32, [0.0] * 9), "wrong_width"),
        (example([[0.1] * 32], [0.0] * 8), "wrong_width"),
        (example([True] * 32, [0.0] * 8), "not_numbers"),
        (example([0.1] * 32, ["1"] * 8), "not_numbers"),
        (orjson.dumps({"ids": [1, 2], "target": 1}), "missing_field"),
        (b"[1, 2, 3]", "not_object"),
        (None, "empty"),
        (example([0.1] * 32 * 1000, [0.0] * 8), "too_large"),
    ]
    explosive = [example([1e6] * 32, [-1e6] * 8)] * 2  # valid, but the step diverges
    rest: list[bytes | None] = [*good[:-1], *(raw for raw, _ in bad), *explosive]
    random.Random(7).shuffle(rest)
    return [*rest, good[-1]], Counter(reason for _, reason in bad), len(explosive)


async def test_the_trainer_survives_hostile_examples_and_publishes_only_finite_versions(
    make_settings: Any, start_worker: Any, make_client: Any
) -> None:
    settings = make_settings(kafka__partitions=1)
    k = settings.kafka
    messages, expected_skips, explosive = hostile_mix()
    await ensure_topics(k, [k.training_topic])
    async with Producer(k) as producer:
        for i, raw in enumerate(messages):  # a tombstone (None) needs a key
            await producer.send(k.training_topic, raw, key=b"e%d" % i)  # type: ignore[arg-type]

    # one example per step, so the run ends (steps=GOOD) right after the last message
    cfg = TrainSettings(
        model="hostile",
        preset="mlp",
        synthetic=False,
        steps=GOOD,
        batch_size=1,
        publish_every_steps=8,
        seed=5,
    )
    published: list[Publish] = []
    report = await asyncio.wait_for(
        train(settings, cfg, asyncio.Event(), on_publish=published.append), 120
    )

    async with open_kv(settings.redis) as kv:
        store = ParamStore(kv, prefix=settings.redis.key_prefix)
        versions = [p.version for p in published]
        loaded = {v: (await store.load("hostile", v))[1] for v in versions}
        current = await store.current_version("hostile")
    non_finite = [
        v for v, params in loaded.items() if not all(np.isfinite(a).all() for a in params.values())
    ]
    print(
        f"\n{len(messages)} examples sent, {GOOD + explosive} valid ({explosive} explosive), "
        f"{sum(expected_skips.values())} skipped by reason {dict(sorted(report.skipped.items()))}, "
        f"{report.diverged} steps undone, {len(versions)} versions published {versions}, "
        f"non-finite {non_finite}"
    )
    assert non_finite == [], f"versions with non-finite weights: {non_finite}"
    assert report.skipped == expected_skips
    assert report.steps == GOOD and report.diverged == explosive and report.refused == 0
    assert versions == [1, 2, 3, 4] and current == 4

    worker = await start_worker(settings)
    client = await make_client(settings)
    x = np.random.default_rng(1).standard_normal((20, 32)).astype(np.float32)
    async with ResultStream(k, k.results_topic, from_beginning=True) as stream:
        for i in range(len(x)):
            await client.submit("hostile", x[i : i + 1], id=f"h{i}", wait=False)
        await client.flush()
        got = await collect(stream, {f"h{i}" for i in range(len(x))})
    assert worker.task.done() is False
    results = [got[f"h{i}"][0] for i in range(len(x))]
    assert all(r.ok and r.version == 4 for r in results), [r.error for r in results if not r.ok]
    expected = np.concatenate([np.asarray(r.outputs, np.float64) for r in results])
    assert expected.shape == (20, 8) and np.isfinite(expected).all()
