"""``kvpipe demo``: local services, a published model, a worker, N requests, checked answers."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from consumers.inference import start_serving
from consumers.trainer import Publish, TrainSettings, train
from pipeline.client import InferenceClient
from pipeline.config import Settings, with_values
from pipeline.dev.local import LocalServices
from pipeline.io.kv import open_kv
from pipeline.io.wire import JSON, NPY, Result
from pipeline.params.models import EmbeddingScorer, build_model
from pipeline.params.models import preset as preset_model
from pipeline.params.store import ParamStore
from pipeline.params.training import SyntheticClicks, accuracy

DEMO_MODEL = "demo"


@dataclass
class DemoReport:
    """What the demo measured; ``passed`` is True when every request got a correct result."""

    requests: int
    preset: str
    version: int = 0
    ok: int = 0
    errors: int = 0
    wrong: int = 0
    missing: int = 0
    duplicates: int = 0
    seconds: float = 0.0
    requests_per_s: float = 0.0
    latency_p50_ms: float = 0.0
    latency_p99_ms: float = 0.0
    worker_total_p50_ms: float = 0.0
    cache_hit_rate: float = 0.0
    cache_loads: int = 0
    results_by_cache: dict[str, int] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.ok == self.requests and not (self.wrong or self.missing or self.errors)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def _percentile(values: list[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile (0 < q <= 100) of ``values``; 0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(math.ceil(q / 100 * len(ordered)), 1) - 1]


async def run_demo(
    *,
    requests: int = 1000,
    preset: str = "mlp",
    seed: int = 0,
    base: Settings | None = None,
    timeout_s: float | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> DemoReport:
    """Run the whole demo on fresh local services and stop everything it started."""
    model = preset_model(preset)
    params = model.init(seed)
    report = DemoReport(requests=requests, preset=preset)
    async with LocalServices() as local:
        settings = with_values(
            local.settings(base),
            {
                "worker.worker_id": "demo-worker",
                "kafka.session_timeout_ms": 2000,
                "kafka.heartbeat_interval_ms": 300,
            },
        )
        async with open_kv(settings.redis) as kv:
            manifest = await ParamStore(kv, prefix=settings.redis.key_prefix).publish(
                DEMO_MODEL, model.arch, params
            )
        report.version = manifest.version
        stop = asyncio.Event()
        worker, serving = await start_serving(settings, stop)
        try:
            rng = np.random.default_rng(seed + 1)
            inputs = rng.standard_normal((requests, model.input_dim)).astype(np.float32)
            results, sent_at, arrived_at, seconds = await _exchange(
                settings, inputs, timeout_s or 60.0 + requests / 50, progress
            )
        finally:
            stop.set()
            await asyncio.wait_for(serving, settings.worker.shutdown_timeout_s + 15)
    expected = model.forward(params, inputs)
    latencies = []
    totals = []
    for i in range(requests):
        rid = f"demo-{i}"
        found = results.get(rid)
        if found is None:
            report.missing += 1
            continue
        result = found[0]
        report.duplicates += len(found) - 1
        source = str(result.cache or "none")
        report.results_by_cache[source] = report.results_by_cache.get(source, 0) + 1
        if not result.ok or result.outputs is None:
            report.errors += 1
            continue
        if result.version != manifest.version or not np.allclose(
            result.outputs[0], expected[i], rtol=1e-4, atol=1e-5
        ):
            report.wrong += 1
            continue
        report.ok += 1
        latencies.append((arrived_at[rid] - sent_at[rid]) * 1000)
        totals.append(result.timings.get("total_ms", 0.0))
    report.seconds = round(seconds, 3)
    report.requests_per_s = round(requests / seconds, 1) if seconds else 0.0
    report.latency_p50_ms = round(_percentile(latencies, 50), 2)
    report.latency_p99_ms = round(_percentile(latencies, 99), 2)
    report.worker_total_p50_ms = round(_percentile(totals, 50), 2)
    stats = worker.registry.cache.stats
    report.cache_hit_rate = round(stats.hit_rate, 4)
    report.cache_loads = stats.loads
    return report


async def _exchange(
    settings: Settings,
    inputs: np.ndarray[Any, Any],
    timeout_s: float,
    progress: Callable[[int, int], None] | None,
) -> tuple[dict[str, list[Result]], dict[str, float], dict[str, float], float]:
    requests = len(inputs)
    results: dict[str, list[Result]] = {}
    sent_at: dict[str, float] = {}
    arrived_at: dict[str, float] = {}
    async with InferenceClient(settings.kafka) as client, client.stream() as stream:

        async def read() -> None:
            while len(arrived_at) < requests:
                batch = await stream.next_batch(0.2)
                now = time.perf_counter()
                for r in batch:
                    if r.id not in results:
                        arrived_at[r.id] = now
                    results.setdefault(r.id, []).append(r)
                if batch and progress is not None:
                    progress(len(arrived_at), requests)

        reader = asyncio.create_task(read())
        started = time.perf_counter()
        for i in range(requests):
            rid = f"demo-{i}"
            sent_at[rid] = time.perf_counter()
            await client.submit(
                DEMO_MODEL,
                inputs[i : i + 1],
                id=rid,
                content_type=NPY if i % 4 == 3 else JSON,
                wait=False,
            )
        await client.flush()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(reader, timeout_s)
        seconds = max(arrived_at.values(), default=started) - started
    return results, sent_at, arrived_at, seconds


@dataclass
class Wave:
    """One round of requests during the training demo."""

    index: int
    versions: list[int]
    accuracy: float
    errors: int


@dataclass
class TrainDemoReport:
    """Accuracy of served results, wave by wave, while the trainer publishes."""

    waves: list[Wave] = field(default_factory=list)
    publishes: int = 0

    @property
    def passed(self) -> bool:
        if len(self.waves) < 2 or any(w.errors for w in self.waves):
            return False
        return self.waves[-1].accuracy >= self.waves[0].accuracy + 0.15

    def as_dict(self) -> dict[str, Any]:
        return {
            "waves": [asdict(w) for w in self.waves],
            "publishes": self.publishes,
            "passed": self.passed,
        }


TRAIN_ARCH = {"kind": "embedding", "users": 2000, "items": 5000, "dim": 16}


async def run_train_demo(
    *,
    waves: int = 8,
    per_wave: int = 500,
    seed: int = 0,
    base: Settings | None = None,
    emit: Callable[[Wave], None] | None = None,
) -> TrainDemoReport:
    """A worker serves an embedding scorer while the trainer learns it; accuracy per wave."""
    model = build_model(TRAIN_ARCH)
    assert isinstance(model, EmbeddingScorer)
    task = SyntheticClicks(model, seed=seed)
    report = TrainDemoReport()
    async with LocalServices() as local:
        settings = with_values(local.settings(base), {
            "worker.worker_id": "demo-worker",
            "kafka.session_timeout_ms": 2000,
            "kafka.heartbeat_interval_ms": 300,
        })  # fmt: skip
        async with open_kv(settings.redis) as kv:
            tables = model.init_tables(seed + 1)
            await ParamStore(kv, prefix=settings.redis.key_prefix).publish(
                "recs", model.arch, model.init(seed), tables=tables
            )
        stop = asyncio.Event()
        published = asyncio.Event()

        def on_publish(_: Publish) -> None:
            report.publishes += 1
            published.set()

        _, serving = await start_serving(settings, stop)
        training: asyncio.Task[Any] | None = None
        try:
            cfg = TrainSettings(
                model="recs",
                synthetic=True,
                publish_every_steps=10**9,
                publish_every_s=0.5,
                batch_size=256,
                seed=seed,
            )
            async with InferenceClient(settings.kafka) as client, client.stream() as stream:
                for w in range(waves):
                    ids, labels = task.batch(per_wave)
                    rids = [f"w{w}-{i}" for i in range(per_wave)]
                    for i, rid in enumerate(rids):
                        await client.submit("recs", ids=ids[i : i + 1], id=rid, wait=False)
                    await client.flush()
                    got: dict[str, Result] = {}
                    while len(got) < per_wave:
                        for r in await stream.next_batch(0.2):
                            if r.id.startswith(f"w{w}-"):
                                got[r.id] = r
                    ok = [got[rid] for rid in rids if got[rid].ok]
                    scores = np.array([r.outputs[0, 0] for r in ok if r.outputs is not None])
                    wave = Wave(
                        index=w,
                        versions=sorted({r.version or 0 for r in ok}),
                        accuracy=round(accuracy(scores, labels[: len(scores)]), 4)
                        if len(ok) == per_wave
                        else 0.0,
                        errors=per_wave - len(ok),
                    )
                    report.waves.append(wave)
                    if emit is not None:
                        emit(wave)
                    if training is None:
                        training = asyncio.create_task(
                            train(settings, cfg, stop, on_publish=on_publish)
                        )
                    target = report.publishes + 2  # the next wave runs two versions later
                    while report.publishes < target:
                        waiter = asyncio.create_task(published.wait())
                        await asyncio.wait({waiter, training}, return_when=asyncio.FIRST_COMPLETED)
                        waiter.cancel()
                        published.clear()
                        if training.done():
                            training.result()  # the trainer failed: raise its error
                            break
                    await asyncio.sleep(0.2)  # let the announcement reach the worker
        finally:
            stop.set()
            if training is not None:
                await asyncio.wait_for(training, 30)
            await asyncio.wait_for(serving, settings.worker.shutdown_timeout_s + 15)
    return report
