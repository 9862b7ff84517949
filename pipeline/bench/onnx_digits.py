"""``kvpipe bench onnx``: a scikit-learn model served as ONNX beside kvpipe's numpy MLP.

scikit-learn's digits data set (it ships inside scikit-learn: nothing downloaded) trains an
``MLPClassifier`` (one relu hidden layer, softmax output; fixed seed, a few seconds), converted
with skl2onnx. The same weights go to kvpipe's own numpy ``mlp`` kind (layers 64-H-10, relu,
softmax head), so both sides compute the same function:

- ``onnx``: the converted graph published with :meth:`ParamStore.publish_onnx
  <pipeline.params.store.ParamStore.publish_onnx>`, served by onnxruntime (one session per
  version, :class:`~pipeline.params.onnx.OnnxModel`); its answer is the label and the ten
  probabilities side by side.
- ``numpy``: the weights published as an ``mlp``; its answer is the ten probabilities.

Every answer of both sides is checked against the numpy MLP's probabilities (themselves
checked against scikit-learn's ``predict_proba`` before anything runs): the ONNX side's
probability columns within the bench's tolerance, and its label the most probable class (or
one within the tolerance of it). Three figures, both sides measured in one run:

1. Throughput: a backlog of requests (one digit each, the 1797 images in turn) drained by the
   same in-process worker with the same settings (:func:`pipeline.bench.harness.serve_backlog`),
   order A B, B A, ...; the ratio is onnx / numpy.
2. p99 latency: each side a worker process of its own (``python -m consumers.inference``),
   offered the same open-loop rate in turn (:mod:`pipeline.bench.loadgen`; default
   :data:`DEFAULT_LATENCY_RATE`, at most half the slower side's throughput, so that neither side
   is saturated and the p99 is the serving path's, not a queue's); the p99 of every answer's
   send -> arrival.
3. Session build per version: fresh versions published to Redis, each loaded and given to a
   new :class:`~pipeline.params.onnx.OnnxModel`, its first one-row request timed (checking
   the stored graph and building the onnxruntime session, then the row) against the second.

scikit-learn and skl2onnx (the ``onnx`` extra) are imported only inside :func:`train_digits`.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from consumers.inference import start_serving
from pipeline.bench.e2e import WARMUP, LiveSide, RatePoint
from pipeline.bench.figures import (
    ATOL,
    MODEL,
    Array,
    Check,
    Comparison,
    Emit,
    RunFigures,
    Side,
    check_answer,
    verify_results,
)
from pipeline.bench.harness import (
    Step,
    compare,
    drop_topics,
    serve_backlog,
    side_settings,
    side_topics,
    worker_detail,
)
from pipeline.config import Settings
from pipeline.dev.procs import Children, child_env
from pipeline.errors import ConfigError
from pipeline.io.kafka import Message
from pipeline.io.kv import open_kv
from pipeline.io.wire import JSON
from pipeline.io.wire import Result as Answer
from pipeline.params.models import MLP, build_model
from pipeline.params.onnx import GRAPH_PARAM
from pipeline.params.store import Manifest, ParamStore

SUITE = "onnx"
HIDDEN = 64
CLASSES = 10
SEED = 0
ONNX_GOAL = 0.8  # onnx / numpy throughput: onnxruntime costs little beside the Kafka work
SKLEARN_TOL = 1e-5  # numpy MLP (float32) vs scikit-learn's predict_proba (float64)
DEFAULT_LATENCY_S = 3.0
DEFAULT_LATENCY_RATE = 1000.0  # requests/s: well below either side's ceiling
DEFAULT_VERSIONS = 8
_INSTALL = "kvpipe bench onnx needs the onnx extra: pip install 'kvpipe[onnx]'"


# -- the model -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Digits:
    """The trained classifier as both sides serve it, and the rows the requests carry."""

    rows: Array  # every digits image, (1797, 64) float32 in [0, 1]
    onnx: bytes  # the converted graph, weights inside
    model: MLP  # kvpipe's numpy MLP of the same shape
    params: dict[str, Array]  # the classifier's weights, float32
    expected: Array  # the numpy MLP's probabilities for every row
    sklearn_max_diff: float  # |numpy MLP - predict_proba| over every row
    accuracy: float  # scikit-learn's accuracy on the held-out quarter
    train_s: float

    @property
    def shape(self) -> str:
        return "-".join(str(n) for n in self.model.layers)


def train_digits(hidden: int = HIDDEN, seed: int = SEED) -> Digits:
    """Train, convert and mirror the digits classifier (ConfigError without the onnx extra)."""
    try:
        from skl2onnx import convert_sklearn  # type: ignore[import-untyped]
        from skl2onnx.common.data_types import FloatTensorType  # type: ignore[import-untyped]
        from sklearn.datasets import load_digits  # type: ignore[import-untyped]
        from sklearn.model_selection import train_test_split  # type: ignore[import-untyped]
        from sklearn.neural_network import MLPClassifier  # type: ignore[import-untyped]
    except ImportError:
        raise ConfigError(_INSTALL) from None

    started = time.perf_counter()
    x_all, y_all = load_digits(return_X_y=True)
    rows = (x_all / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        rows, y_all, test_size=0.25, random_state=seed, stratify=y_all
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a capped number of iterations: ConvergenceWarning
        clf = MLPClassifier(hidden_layer_sizes=(hidden,), max_iter=120, random_state=seed)
        clf.fit(x_train, y_train)
    if clf.out_activation_ != "softmax" or clf.activation != "relu":
        raise ConfigError(f"unexpected MLPClassifier head {clf.activation}/{clf.out_activation_}")
    converted = convert_sklearn(
        clf,
        initial_types=[("input", FloatTensorType([None, rows.shape[1]]))],
        options={id(clf): {"zipmap": False}},  # probabilities as a tensor, not a map
    )
    model = MLP([rows.shape[1], hidden, CLASSES], activation="relu", softmax=True)
    params: dict[str, Array] = {}
    for i, (w, b) in enumerate(zip(clf.coefs_, clf.intercepts_, strict=True)):
        params[f"w{i}"] = np.ascontiguousarray(w, dtype=np.float32)
        params[f"b{i}"] = np.ascontiguousarray(b, dtype=np.float32)
    expected = model.forward(params, rows.copy())
    diff = float(np.abs(expected - clf.predict_proba(rows)).max())
    return Digits(
        rows=rows,
        onnx=converted.SerializeToString(),
        model=model,
        params=params,
        expected=expected,
        sklearn_max_diff=diff,
        accuracy=float(clf.score(x_test, y_test)),
        train_s=time.perf_counter() - started,
    )


# -- publishing and checking a side --------------------------------------------------------------


async def publish_side(settings: Settings, digits: Digits, side: str) -> Manifest:
    """Publish the classifier for ``side`` ("onnx" or "numpy") under the side's keys; its topics."""
    async with open_kv(settings.redis) as kv:
        store = ParamStore(kv, prefix=settings.redis.key_prefix)
        if side == "onnx":
            published = await store.publish_onnx(MODEL, digits.onnx)
        else:
            published = await store.publish(MODEL, digits.model.arch, digits.params)
    await side_topics(settings)
    return published.manifest


def probability_columns(manifest: Manifest) -> tuple[int, int] | None:
    """Where an ONNX classifier's probabilities are in a row (None: a numpy side, all of it)."""
    outputs = manifest.arch.get("outputs")
    if manifest.arch.get("kind") != "onnx" or not isinstance(outputs, list):
        return None
    for out in outputs:
        if out.get("name") == "probabilities":
            start, stop = out["columns"]
            return int(start), int(stop)
    raise ConfigError("the converted classifier has no 'probabilities' output")


def digit_check(columns: tuple[int, int] | None) -> Check:
    """Probabilities within the tolerance of numpy's; on the ONNX side the label (column 0)
    also the most probable class, or one within the tolerance of it."""

    def check(msg: Message, rid: str, row: Array, version: int) -> tuple[str, Answer | None]:
        verdict, result = check_answer(msg, rid, row, version, columns)
        if columns is None or verdict != "ok" or result is None or result.outputs is None:
            return verdict, result
        label = float(result.outputs[0, 0])
        if label != round(label) or not 0 <= label < row.shape[0]:
            return "wrong", result
        if row[int(label)] < row.max() - ATOL:
            return "wrong", result
        return "ok", result

    return check


# -- throughput ----------------------------------------------------------------------------------


def throughput_step(digits: Digits, side: str, inputs: Array, expected: Array, wire: str) -> Step:
    """One run of one side: publish, drain the backlog with the in-process worker, check."""
    timeout_s = 60.0 + len(inputs) / 10

    async def step(run: RunFigures, settings: Settings) -> None:
        manifest = await publish_side(settings, digits, side)
        run.detail["model"] = f"digits MLP {digits.shape} ({side})"
        run.detail["sklearn_accuracy"] = round(digits.accuracy, 4)
        run.detail["numpy_vs_predict_proba_max_diff"] = digits.sklearn_max_diff
        ids, arrivals, worker, stats = await serve_backlog(
            run, settings, inputs, timeout_s, wire, start_serving
        )
        check = digit_check(probability_columns(manifest))
        sources = verify_results(run, arrivals, ids, expected, manifest.version, check)
        run.detail["results_by_cache"] = {str(k): n for k, n in sources.items()}
        run.detail["param_mb"] = round(manifest.nbytes / 1e6, 3)
        worker_detail(run, worker, stats)

    return step


# -- p99 latency ---------------------------------------------------------------------------------


@dataclass
class LatencyResult:
    """Both sides as worker processes, offered the same open-loop rate in turn."""

    rate: float | None = None
    duration_s: float = 0.0
    points: list[RatePoint] = field(default_factory=list)
    failure: str | None = None

    def p99(self, side: str) -> float | None:
        """The mean p99 (ms) of the side's runs; None unless every run has a figure."""
        values = [p.latency_ms.get("p99") for p in self.points if p.side == side and p.passed]
        runs = [p for p in self.points if p.side == side]
        if not runs or len(values) != len(runs):
            return None
        numbers = [v for v in values if v is not None]
        return float(np.mean(numbers)) if len(numbers) == len(runs) else None

    @property
    def ratio(self) -> float | None:
        """p99 onnx / p99 numpy."""
        a, b = self.p99("onnx"), self.p99("numpy")
        return None if a is None or not b else a / b

    @property
    def passed(self) -> bool:
        return self.failure is None and bool(self.points) and all(p.passed for p in self.points)

    def as_dict(self) -> dict[str, Any]:
        ratio = self.ratio
        p99 = {s: self.p99(s) for s in ("onnx", "numpy")}
        return {
            "rate": None if self.rate is None else round(self.rate, 1),
            "rate_of": "the asked rate, at most half the slower side's backlog throughput",
            "duration_s": self.duration_s,
            "p99_ms": {k: None if v is None else round(v, 3) for k, v in p99.items()},
            "ratio": None if ratio is None else round(ratio, 4),
            "ratio_of": "p99 onnx / p99 numpy",
            "passed": self.passed,
            "runs": [p.as_dict() for p in self.points],
            "failure": self.failure,
        }


async def bench_latency(
    digits: Digits,
    sides: dict[str, Settings],
    rate: float,
    *,
    duration_s: float,
    rounds: int,
    wire: str,
) -> LatencyResult:
    """Each side a worker process; ``rate`` requests/s for ``duration_s`` on each in turn."""
    result = LatencyResult(rate, duration_s)
    try:
        async with Children() as children:
            live: list[LiveSide] = []
            for name, settings in sides.items():
                manifest = await publish_side(settings, digits, name)
                verify = digit_check(probability_columns(manifest))
                await children.spawn(
                    f"onnx-bench-{name}", "consumers.inference", child_env(settings, name)
                )
                live.append(
                    LiveSide(
                        name,
                        settings,
                        settings.kafka.results_topic,
                        _row_check(verify, digits.expected, manifest.version),
                        digits.rows,
                        wire,
                    )
                )
            async with live[0], live[1]:
                for side in live:
                    await side.warm(WARMUP, 90.0, children.check_alive)
                for i in range(rounds):
                    for side in live if i % 2 == 0 else live[::-1]:
                        point = await side.run_rate(
                            rate, duration_s, f"l{i}", half=False, alive=children.check_alive
                        )
                        result.points.append(point)
    except Exception as exc:  # recorded, not raised, like the other suites
        result.failure = f"{type(exc).__name__}: {exc}"
    return result


def _row_check(
    verify: Check, expected: Array, version: int
) -> Callable[[bytes, Message, Any, int], str]:
    def check(key: bytes, msg: Message, sent: Any, row: int) -> str:
        return verify(msg, key.decode(), expected[row], version)[0]

    return check


# -- session build per version ------------------------------------------------------------------


@dataclass
class SessionResult:
    """Fresh versions, each loaded from Redis into a new OnnxModel: the first request's time
    (the stored graph checked, the session built, one row run) and the next one's."""

    first_ms: list[float] = field(default_factory=list)
    warm_ms: list[float] = field(default_factory=list)
    wrong: int = 0
    failure: str | None = None

    @property
    def build_ms(self) -> list[float]:
        """Per version: the first request less the next (the session build alone)."""
        return [f - w for f, w in zip(self.first_ms, self.warm_ms, strict=True)]

    @property
    def passed(self) -> bool:
        return self.failure is None and bool(self.first_ms) and not self.wrong

    def as_dict(self) -> dict[str, Any]:
        def stats(values: list[float]) -> dict[str, float | None]:
            if not values:
                return {"mean": None, "max": None}
            return {"mean": round(float(np.mean(values)), 3), "max": round(max(values), 3)}

        return {
            "versions": len(self.first_ms),
            "build_ms": stats(self.build_ms),
            "first_request_ms": stats(self.first_ms),
            "warm_request_ms": stats(self.warm_ms),
            "each_first_request_ms": [round(v, 3) for v in self.first_ms],
            "wrong": self.wrong,
            "passed": self.passed,
            "failure": self.failure,
        }


async def bench_sessions(settings: Settings, digits: Digits, versions: int) -> SessionResult:
    """Publish ``versions`` fresh versions; time each one's first and second one-row request."""
    result = SessionResult()
    row = digits.rows[:1]
    try:
        async with open_kv(settings.redis) as kv:
            store = ParamStore(kv, prefix=settings.redis.key_prefix)
            for _ in range(versions):
                published = await store.publish_onnx(MODEL, digits.onnx)
                manifest, params = await store.load(MODEL, published.version)
                params[GRAPH_PARAM] = np.frombuffer(await store.graph(manifest), dtype=np.uint8)
                model = build_model(manifest.arch)  # a new OnnxModel: no session yet
                times = []
                out: Array | None = None
                for _ in range(2):
                    started = time.perf_counter()
                    out = model.forward(params, row)
                    times.append((time.perf_counter() - started) * 1e3)
                result.first_ms.append(times[0])
                result.warm_ms.append(times[1])
                columns = probability_columns(manifest) or (0, CLASSES)
                if out is None or not np.allclose(
                    out[0, columns[0] : columns[1]], digits.expected[0], atol=ATOL
                ):
                    result.wrong += 1
    except Exception as exc:
        result.failure = f"{type(exc).__name__}: {exc}"
    return result


# -- the suite -----------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} ms"


async def bench_onnx(
    base: Settings,
    tag: str,
    requests: int,
    rounds: int,
    emit: Emit,
    *,
    wire: str = JSON,
    duration_s: float | None = None,
    latency_rate: float | None = None,
    versions: int = DEFAULT_VERSIONS,
) -> dict[str, Comparison | LatencyResult | SessionResult]:
    """The three figures (see the module's doc); keys ``onnx``, ``onnx-latency``,
    ``onnx-session``."""
    digits = train_digits()
    emit(
        f"{SUITE:<7} digits MLP {digits.shape} (scikit-learn MLPClassifier, trained in "
        f"{digits.train_s:.1f} s, held-out accuracy {digits.accuracy:.4f}): ONNX via onnxruntime "
        f"vs kvpipe's numpy MLP, same weights; numpy vs predict_proba max diff "
        f"{digits.sklearn_max_diff:.1e}"
    )
    if digits.sklearn_max_diff > SKLEARN_TOL:
        raise ConfigError(
            f"the numpy MLP differs from scikit-learn's predict_proba by "
            f"{digits.sklearn_max_diff:.2e} (over {SKLEARN_TOL:g}): the weights were not mirrored"
        )
    pick = np.arange(requests) % len(digits.rows)
    inputs, expected = digits.rows[pick], digits.expected[pick]

    cmp = Comparison(
        SUITE,
        Side(SUITE, "onnx", "ONNX (onnxruntime)", "req/s", requests),
        Side(SUITE, "numpy", "numpy MLP", "req/s", requests),
        ONNX_GOAL,
    )
    steps: dict[str, tuple[Step, dict[str, Any]]] = {
        name: (throughput_step(digits, name, inputs, expected, wire), {})
        for name in ("onnx", "numpy")
    }
    await compare(cmp, steps, base=base, tag=f"{tag}-onnx", rounds=rounds, emit=emit)

    slower = [r for r in (cmp.first.rate, cmp.second.rate) if r is not None]
    latency = LatencyResult()
    if len(slower) == 2:
        sides = {name: side_settings(base, f"{tag}-onnx", f"{name}-lat") for name in steps}
        try:
            latency = await bench_latency(
                digits,
                sides,
                min(latency_rate or DEFAULT_LATENCY_RATE, min(slower) / 2),
                duration_s=duration_s or DEFAULT_LATENCY_S,
                rounds=rounds,
                wire=wire,
            )
        finally:
            for settings in sides.values():
                await drop_topics(settings.kafka)
    else:
        latency.failure = "no throughput figure to set the rate from"
    a, b, ratio = latency.p99("onnx"), latency.p99("numpy"), latency.ratio
    if ratio is None or latency.rate is None:
        emit(f"{SUITE:<7} p99 latency: no figure ({latency.failure or 'a run failed'})")
    else:
        emit(
            f"{SUITE:<7} p99 at {latency.rate:.0f} req/s open loop, worker processes: "
            f"ONNX {_ms(a)}, numpy {_ms(b)}, ratio onnx/numpy {ratio:.2f}x"
        )

    sessions = await bench_sessions(
        side_settings(base, f"{tag}-onnx", "sessions"), digits, versions
    )
    s = sessions.as_dict()
    if not sessions.passed:
        emit(f"{SUITE:<7} session build: FAIL ({sessions.failure or f'{sessions.wrong} wrong'})")
    else:
        emit(
            f"{SUITE:<7} session build per version ({s['versions']} fresh versions loaded from "
            f"Redis): mean {_ms(s['build_ms']['mean'])}, max {_ms(s['build_ms']['max'])} "
            f"(first one-row request mean {_ms(s['first_request_ms']['mean'])}, the next "
            f"{_ms(s['warm_request_ms']['mean'])})"
        )
    return {"onnx": cmp, "onnx-latency": latency, "onnx-session": sessions}
