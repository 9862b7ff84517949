"""``kvpipe demo``: local services, a published model, a worker, N requests, checked answers."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
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


def _demo_settings(local: LocalServices, base: Settings | None) -> Settings:
    """The demo's worker settings on its own local services (a quick group join)."""
    return with_values(
        local.settings(base),
        {
            "worker.worker_id": "demo-worker",
            "kafka.session_timeout_ms": 2000,
            "kafka.heartbeat_interval_ms": 300,
        },
    )


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
        settings = _demo_settings(local, base)
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
    *,
    model: str = DEMO_MODEL,
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
                model,
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


ONNX_DEMO_MODEL = "digits"
#: Where a served label may differ from scikit-learn's: its two best classes this close.
ROUNDING_MARGIN = 1e-5
#: The held-out quarter of the 1797 digits: the requests the demo sends.
DIGITS_HELD_OUT = 450
#: What ``kvpipe demo --onnx`` needs beyond kvpipe itself (the ``onnx`` extra).
ONNX_EXTRA = ("onnx", "onnxruntime", "skl2onnx", "sklearn")


def missing_onnx_extra() -> list[str]:
    """The modules of the ``onnx`` extra that are not installed (none imported here)."""
    return [name for name in ONNX_EXTRA if importlib.util.find_spec(name) is None]


@dataclass
class Mismatch:
    """A held-out row whose served label is not scikit-learn's ``predict``."""

    row: int
    served: int
    sklearn: int
    #: scikit-learn's two best probabilities apart, and the served two labels apart.
    margin: float
    served_margin: float

    @property
    def rounding(self) -> bool:
        return max(self.margin, self.served_margin) < ROUNDING_MARGIN


@dataclass
class OnnxDemoReport:
    """The digits MLP served as ONNX, checked row by row against scikit-learn."""

    requests: int = 0
    sklearn_version: str = ""
    hidden: list[int] = field(default_factory=list)
    train_seconds: float = 0.0
    onnx_bytes: int = 0
    tensors: int = 0  # initializers stored as tensors of their own (small ones stay inline)
    version: int = 0
    served: int = 0
    same: int = 0
    errors: int = 0
    error_codes: dict[str, int] = field(default_factory=dict)
    wrong_version: int = 0
    missing: int = 0
    duplicates: int = 0
    mismatches: list[Mismatch] = field(default_factory=list)
    served_accuracy: float = 0.0
    sklearn_accuracy: float = 0.0
    max_probability_diff: float = 0.0
    seconds: float = 0.0
    requests_per_s: float = 0.0
    latency_p50_ms: float = 0.0
    latency_p99_ms: float = 0.0
    worker_total_p50_ms: float = 0.0
    cache_loads: int = 0

    @property
    def passed(self) -> bool:
        return (
            self.requests > 0
            and self.served == self.requests
            and not (self.errors or self.missing or self.wrong_version)
            and all(m.rounding for m in self.mismatches)
        )

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


@dataclass
class _Digits:
    clf: Any
    x_test: np.ndarray[Any, Any]
    y_test: np.ndarray[Any, Any]
    onnx: bytes
    seconds: float


def _train_digits(seed: int, hidden: int) -> _Digits:
    """scikit-learn's bundled digits (nothing downloaded), an MLP, converted with skl2onnx."""
    import warnings

    from skl2onnx import convert_sklearn  # type: ignore[import-untyped]
    from skl2onnx.common.data_types import FloatTensorType  # type: ignore[import-untyped]
    from sklearn.datasets import load_digits  # type: ignore[import-untyped]
    from sklearn.model_selection import train_test_split  # type: ignore[import-untyped]
    from sklearn.neural_network import MLPClassifier  # type: ignore[import-untyped]

    x_all, y_all = load_digits(return_X_y=True)
    x_all = (x_all / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        x_all, y_all, test_size=0.25, random_state=seed, stratify=y_all
    )
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a fixed, short run on purpose: ConvergenceWarning
        clf = MLPClassifier(hidden_layer_sizes=(hidden,), max_iter=200, random_state=seed)
        clf.fit(x_train, y_train)
    seconds = time.perf_counter() - started
    converted = convert_sklearn(
        clf,
        initial_types=[("input", FloatTensorType([None, x_all.shape[1]]))],
        options={id(clf): {"zipmap": False}},  # label and probabilities as plain tensors
    )
    return _Digits(clf, x_test, y_test, converted.SerializeToString(), seconds)


async def run_onnx_demo(
    *,
    seed: int = 0,
    hidden: int = 64,
    base: Settings | None = None,
    timeout_s: float = 120.0,
    progress: Callable[[int, int], None] | None = None,
) -> OnnxDemoReport:
    """Train the digits MLP, publish it as ONNX into fresh local services, serve the held-out
    rows through Kafka one a request, and compare each served label with ``predict``."""
    report = OnnxDemoReport(hidden=[hidden])
    # before the services start: training alongside their start-up takes several times longer
    digits = await asyncio.to_thread(_train_digits, seed, hidden)
    async with LocalServices() as local:
        settings = _demo_settings(local, base)
        async with open_kv(settings.redis) as kv:
            published = await ParamStore(kv, prefix=settings.redis.key_prefix).publish_onnx(
                ONNX_DEMO_MODEL, digits.onnx
            )
        report.version = published.manifest.version
        report.tensors = len(published.manifest.tensors)
        stop = asyncio.Event()
        worker, serving = await start_serving(settings, stop)
        try:
            results, sent_at, arrived_at, seconds = await _exchange(
                settings, digits.x_test, timeout_s, progress, model=ONNX_DEMO_MODEL
            )
        finally:
            stop.set()
            await asyncio.wait_for(serving, settings.worker.shutdown_timeout_s + 15)
    import sklearn  # type: ignore[import-untyped]

    clf, x_test, y_test = digits.clf, digits.x_test, digits.y_test
    report.requests = len(x_test)
    report.sklearn_version = sklearn.__version__
    report.train_seconds = round(digits.seconds, 3)
    report.onnx_bytes = len(digits.onnx)
    predicted = clf.predict(x_test)
    proba = clf.predict_proba(x_test)
    report.sklearn_accuracy = round(float((predicted == y_test).mean()), 4)
    hits: list[bool] = []  # served label equals the true one
    latencies: list[float] = []
    totals: list[float] = []
    worst = 0.0
    for i in range(report.requests):
        rid = f"demo-{i}"
        found = results.get(rid)
        if found is None:
            report.missing += 1
            continue
        result = found[0]
        report.duplicates += len(found) - 1
        out = result.outputs
        if not result.ok or out is None or out.shape != (1, 1 + proba.shape[1]):
            report.errors += 1
            code = result.error_code or "bad_shape"
            report.error_codes[code] = report.error_codes.get(code, 0) + 1
            continue
        if result.version != report.version:
            report.wrong_version += 1
            continue
        report.served += 1
        latencies.append((arrived_at[rid] - sent_at[rid]) * 1000)
        totals.append(result.timings.get("total_ms", 0.0))
        label, probs = int(out[0, 0]), out[0, 1:].astype(np.float64)
        hits.append(label == int(y_test[i]))
        worst = max(worst, float(np.abs(probs - proba[i]).max()))
        if label == predicted[i]:
            report.same += 1
            continue
        top2 = np.sort(proba[i])[-2:]
        report.mismatches.append(
            Mismatch(
                row=i,
                served=label,
                sklearn=int(predicted[i]),
                margin=float(top2[1] - top2[0]),
                served_margin=float(abs(probs[label] - probs[int(predicted[i])])),
            )
        )
    if hits:
        report.served_accuracy = round(sum(hits) / report.requests, 4)  # unserved rows: wrong
    report.max_probability_diff = worst
    report.seconds = round(seconds, 3)
    report.requests_per_s = round(report.requests / seconds, 1) if seconds else 0.0
    report.latency_p50_ms = round(_percentile(latencies, 50), 2)
    report.latency_p99_ms = round(_percentile(latencies, 99), 2)
    report.worker_total_p50_ms = round(_percentile(totals, 50), 2)
    report.cache_loads = worker.registry.cache.stats.loads
    return report
