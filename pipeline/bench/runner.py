"""``kvpipe bench``: the suites chosen, run on fresh local services, printed and written out.

Each comparison runs both of its sides in one run, on the same fresh local services (a Redis
and a Tansu broker), each side with topic, group and Redis key prefixes of its own
(:mod:`pipeline.bench.harness`). The requests of a side are produced first (a backlog); then
its consumer starts, and throughput is N / (the consumer's partitions assigned -> the N-th
distinct answer read back). Every answer is checked (:mod:`pipeline.bench.figures`): a side
with a wrong, failed or missing answer has no figure.

- ``naive`` (:mod:`pipeline.bench.naive`): the article's model (two 1000x1000 float32 linear
  heads) served by the real worker with its cache, against the same worker whose registry
  reads the version pointer, manifest and every tensor from Redis for each request (batches
  of one).
- ``echo`` (:mod:`pipeline.bench.overhead`): a bare aiokafka consume -> produce loop (the
  floor any Kafka worker sits on), against the real worker on the small MLP, same backlog and
  partition count.
- ``batching`` (:mod:`pipeline.bench.batching`): micro-batches against batch size 1, on the
  article's model and the small MLP.
- ``memo`` (:mod:`pipeline.bench.memo`): the result cache on and off, 30% of requests
  repeating an earlier input.
- ``e2e`` (:mod:`pipeline.bench.e2e`): open-loop latency per offered rate, worker and echo
  as processes of their own. ``scale`` (:mod:`pipeline.bench.scale`): one worker process
  against two. ``cache`` (:mod:`pipeline.bench.simulation`): the offline eviction simulation.
- ``--processes N`` (``echo`` and ``e2e``): ``kvpipe serve --processes N`` against one worker
  process; on ``echo`` a backlog comparison of its own (:func:`pipeline.bench.scale.
  bench_processes`), on ``e2e`` a third side in the sweep.
- ``dedupe`` (:mod:`pipeline.bench.dedupe`): the worker with ``KVPIPE_DEDUPE_TTL`` against the
  same worker without, on the small MLP, in the steady state and right after a rebalance;
  and how long an answer waits for its record.
- ``cluster`` (:mod:`pipeline.bench.cluster_rows`): embedding rows/s through the cache's miss
  path on a local Redis Cluster of 3 primaries against 1 primary (and a single Redis as a
  reference line), all on this machine.
- ``onnx`` (:mod:`pipeline.bench.onnx_digits`): scikit-learn's digits MLP served as ONNX
  (onnxruntime) against kvpipe's numpy MLP with the same weights: throughput, p99 latency, and
  the session build time per version. Needs the ``onnx`` extra; not part of ``all``.
- ``tracing`` (:mod:`pipeline.bench.tracing`): per-message cost of trace propagation, tracing
  off against opentelemetry-api alone against the SDK, in process and through a real worker.
  Needs the ``tracing`` extra; not part of ``all``.

Every suite prints its table and writes ``DIR/SUITE.json`` and, with matplotlib,
``DIR/SUITE.png`` (:mod:`pipeline.bench.plots`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pipeline.bench import plots
from pipeline.bench.batching import bench_batching, bench_batching_mlp
from pipeline.bench.cluster_rows import bench_cluster
from pipeline.bench.dedupe import bench_dedupe
from pipeline.bench.e2e import DEFAULT_DURATION_S, DEFAULT_RATES, bench_e2e, bench_light_latency
from pipeline.bench.figures import ATOL, RTOL, Emit, machine
from pipeline.bench.harness import PARTITIONS, drop_topics, side_settings
from pipeline.bench.memo import bench_memo
from pipeline.bench.naive import bench_naive
from pipeline.bench.onnx_digits import bench_onnx
from pipeline.bench.overhead import bench_echo
from pipeline.bench.prefix import bench_prefix
from pipeline.bench.scale import bench_processes, bench_scale
from pipeline.bench.simulation import CacheResult, bench_cache
from pipeline.bench.tracing import bench_tracing_suite
from pipeline.config import Settings
from pipeline.dev.local import LocalServices
from pipeline.errors import ConfigError
from pipeline.io.wire import JSON, NPY
from pipeline.logging import configure_logging
from pipeline.serving.worker import tune_gc

DEFAULT_REQUESTS = {
    "naive": 2000,
    "echo": 50000,
    "batching": 3000,
    "batching-mlp": 20000,
    "memo": 3000,
    "scale": 8000,
    "dedupe": 30000,
    "onnx": 20000,
    "tracing": 10000,
    "cluster": 40000,  # embedding rows per run
}
DEFAULT_OUT = "bench-results"
DEFAULT_NAIVE_REQUESTS = 200
DEFAULT_ROUNDS = 2
WIRES = {"json": JSON, "npy": NPY}


@dataclass
class Options:
    """What the suites were asked for (None: each suite's default)."""

    requests: int | None = None
    naive_requests: int = DEFAULT_NAIVE_REQUESTS
    rounds: int = DEFAULT_ROUNDS
    rates: tuple[float, ...] | None = None
    duration_s: float | None = None
    layers: list[int] | None = None
    wire: str | None = None  # None: JSON for the small MLP, npy for the article's model
    processes: int | None = None  # echo and e2e: also kvpipe serve --processes N

    def wire_for(self, model: str) -> str:
        """The request content type of a suite on ``model`` ("mlp" or "article")."""
        return self.wire or (JSON if model == "mlp" else NPY)

    def count(self, key: str) -> int:
        """Requests per run of the comparison ``key``."""
        return self.requests or DEFAULT_REQUESTS[key]


class Result(Protocol):
    """What every suite's result offers: whether every answer was right, and its JSON."""

    @property
    def passed(self) -> bool: ...

    def as_dict(self) -> dict[str, Any]: ...


async def run_suite(
    suite: str, settings: Settings, tag: str, opts: Options, emit: Emit
) -> dict[str, Result]:
    """One suite on running services; its results by key (batching has two)."""
    rounds = opts.rounds
    if suite == "echo":
        out: dict[str, Result] = {
            "echo": await bench_echo(
                settings, tag, opts.count("echo"), rounds, emit, opts.wire_for("mlp")
            )
        }
        if opts.processes is not None:
            out["echo-processes"] = await bench_processes(
                settings,
                tag,
                opts.count("echo"),
                rounds,
                emit,
                processes=opts.processes,
                wire=opts.wire_for("mlp"),
            )
        return out
    if suite == "dedupe":
        return dict(
            await bench_dedupe(
                settings, tag, opts.count("dedupe"), rounds, emit, opts.wire_for("mlp")
            )
        )
    if suite == "naive":
        n, naive_n = opts.count("naive"), opts.naive_requests
        wire = opts.wire_for("article")
        return {"naive": await bench_naive(settings, tag, n, naive_n, rounds, emit, wire)}
    if suite == "batching":
        n, n_mlp = opts.count("batching"), opts.count("batching-mlp")
        article = await bench_batching(settings, tag, n, rounds, emit, opts.wire_for("article"))
        mlp = await bench_batching_mlp(settings, tag, n_mlp, rounds, emit, opts.wire_for("mlp"))
        light_a = side_settings(settings, tag, "light-batched")
        light_b = side_settings(settings, tag, "light-single", {"worker.max_batch_size": 1})
        try:
            light = await bench_light_latency(
                light_a, light_b, rounds=rounds, wire=opts.wire_for("article"), emit=emit
            )
        finally:
            await drop_topics(light_a.kafka)
            await drop_topics(light_b.kafka)
        return {"batching": article, "batching-mlp": mlp, "batching-light": light}
    if suite == "memo":
        return {
            "memo": await bench_memo(
                settings, tag, opts.count("memo"), rounds, emit, opts.wire_for("article")
            )
        }
    if suite == "e2e":
        try:
            return {
                "e2e": await bench_e2e(
                    side_settings(settings, tag, "e2e-worker"),
                    side_settings(settings, tag, "e2e-echo"),
                    rates=opts.rates or DEFAULT_RATES,
                    duration_s=opts.duration_s or DEFAULT_DURATION_S,
                    emit=emit,
                    wire=opts.wire_for("mlp"),
                    processes=opts.processes or 1,
                    processes_settings=side_settings(settings, tag, "e2e-processes"),
                )
            }
        finally:
            await drop_topics(side_settings(settings, tag, "e2e-processes").kafka)
            await drop_topics(side_settings(settings, tag, "e2e-worker").kafka)
            await drop_topics(side_settings(settings, tag, "e2e-echo").kafka)
    if suite == "scale":
        n = opts.count("scale")
        return {
            "scale": await bench_scale(
                settings, tag, n, rounds, emit, layers=opts.layers, wire=opts.wire_for("scale")
            )
        }
    if suite == "onnx":
        return dict(
            await bench_onnx(
                settings,
                tag,
                opts.count("onnx"),
                rounds,
                emit,
                wire=opts.wire_for("mlp"),
                duration_s=opts.duration_s,
                latency_rate=opts.rates[0] if opts.rates else None,
            )
        )
    if suite == "cluster":
        return {"cluster": await bench_cluster(settings, tag, opts.count("cluster"), rounds, emit)}
    if suite == "prefix":
        return dict(await bench_prefix(settings, tag, rounds, emit))
    if suite == "tracing":
        n = opts.count("tracing")
        return {"tracing": await bench_tracing_suite(settings, tag, n, rounds, emit)}
    raise ValueError(f"unknown suite {suite!r}")


async def run_bench(
    suites: Sequence[str],
    opts: Options | None = None,
    *,
    base: Settings | None = None,
    emit: Emit = print,
    seconds: dict[str, float] | None = None,
) -> dict[str, Result]:
    """Run the suites on fresh local services (stopped afterwards, also on failure); the
    time each took goes into ``seconds``."""
    opts = opts or Options()
    tag = uuid.uuid4().hex[:8]
    out: dict[str, Result] = {}
    async with LocalServices() as local:
        settings = local.settings(base)
        for suite in suites:
            started = time.perf_counter()
            out.update(await run_suite(suite, settings, tag, opts, emit))
            if seconds is not None:
                seconds[suite] = round(time.perf_counter() - started, 2)
    return out


def _write(path: Path, doc: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=2) + "\n")
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc}") from None


def write_outputs(
    out_dir: Path, suite: str, doc: dict[str, Any], emit: Emit = print
) -> tuple[Path, Path | None]:
    """``out_dir/<suite>.json`` and, with matplotlib, ``out_dir/<suite>.png``."""
    json_path = out_dir / f"{suite}.json"
    _write(json_path, doc)
    png_path = out_dir / f"{suite}.png"
    if plots.write_plot(suite, doc, png_path):
        emit(f"{suite:<7} wrote {json_path} and {png_path}")
        return json_path, png_path
    emit(plots.MISSING)
    return json_path, None


def _parse_options(args: argparse.Namespace) -> Options:
    requests: int | None = getattr(args, "requests", None)
    naive_requests: int = getattr(args, "naive_requests", None) or DEFAULT_NAIVE_REQUESTS
    rounds: int = getattr(args, "rounds", None) or DEFAULT_ROUNDS
    if (requests is not None and requests <= 0) or naive_requests <= 0 or rounds <= 0:
        raise ConfigError("--requests, --naive-requests and --rounds must be positive")
    rates_arg: str | None = getattr(args, "rates", None)
    rates: tuple[float, ...] | None = None
    if rates_arg:
        try:
            rates = tuple(float(r) for r in rates_arg.split(",") if r.strip())
        except ValueError:
            raise ConfigError(f"--rates: not a list of numbers: {rates_arg!r}") from None
        if not rates or any(r <= 0 for r in rates):
            raise ConfigError("--rates must be positive numbers")
    duration: float | None = getattr(args, "duration", None)
    if duration is not None and duration <= 0:
        raise ConfigError("--duration must be positive")
    layers_arg: str | None = getattr(args, "layers", None)
    layers: list[int] | None = None
    if layers_arg:
        try:
            layers = [int(n) for n in layers_arg.replace("-", ",").split(",")]
        except ValueError:
            raise ConfigError(f"--layers: not a list of sizes: {layers_arg!r}") from None
    wire_arg: str | None = getattr(args, "wire", None)
    wire = None if wire_arg in (None, "auto") else WIRES[wire_arg]
    processes: int | None = getattr(args, "bench_processes", None)
    if processes is not None and processes < 2:
        raise ConfigError("--processes must be at least 2 (it is compared with one process)")
    return Options(requests, naive_requests, rounds, rates, duration, layers, wire, processes)


#: ``all``: every suite but ``onnx`` (it needs the optional onnx extra and trains a model).
ALL_SUITES = ["echo", "naive", "batching", "e2e", "scale", "cache"]
KEYS = {
    "echo": ["echo", "echo-processes"],
    "dedupe": ["dedupe", "dedupe-rebalance"],
    "batching": ["batching", "batching-mlp", "batching-light"],
    "onnx": ["onnx", "onnx-latency", "onnx-session"],
}


def main(args: argparse.Namespace, settings: Settings) -> int:
    """``kvpipe bench``: 0 when every answer of every side was right, 1 otherwise."""
    configure_logging(fmt=settings.log_format, level=getattr(args, "log_level", None) or "error")
    tune_gc()  # the in-process sides run as a serving process would, both alike
    opts = _parse_options(args)
    suites = ALL_SUITES if args.suite == "all" else [args.suite]
    out_dir = Path(getattr(args, "out", None) or DEFAULT_OUT)
    info = machine()
    if args.suite == "e2e":
        how = "each rate on both sides, order A B, B A, ..."
    elif args.suite == "cache":
        how = "offline simulation"
    else:
        how = f"{opts.rounds} run(s) of each side, order A B, B A, ..."
    print(
        f"kvpipe bench {args.suite}: nproc {info['nproc']}, {info['platform']}, "
        f"python {info['python']}, numpy {info['numpy']}, aiokafka {info['aiokafka']}, "
        f"redis-py {info['redis_py']}; {how}; requests as "
        + (opts.wire or "JSON on the small MLP, npy on the larger models"),
        flush=True,
    )

    def emit(line: str) -> None:
        print(line, flush=True)

    started = time.perf_counter()
    seconds: dict[str, float] = {}
    live = [s for s in suites if s != "cache"]
    results = (
        asyncio.run(run_bench(live, opts, base=settings, emit=emit, seconds=seconds))
        if live
        else {}
    )
    if "cache" in suites:
        t = time.perf_counter()
        results["cache"] = CacheResult(bench_cache(getattr(args, "accesses", None)))
        seconds["cache"] = round(time.perf_counter() - t, 2)
    passed = all(r.passed for r in results.values())
    elapsed = time.perf_counter() - started
    config = {
        "requests": {k: opts.count(k) for k in DEFAULT_REQUESTS},
        "naive_requests": opts.naive_requests,
        "rounds": opts.rounds,
        "partitions": PARTITIONS,
        "rtol": RTOL,
        "atol": ATOL,
        "rates": list(opts.rates) if opts.rates else None,
        "duration_s": opts.duration_s,
        "layers": opts.layers,
        "processes": opts.processes,
    }
    for suite in suites:
        keys = [k for k in KEYS.get(suite, [suite]) if k in results]
        doc = {
            "suite": suite,
            "machine": info,
            "seconds": seconds.get(suite),
            "passed": all(results[k].passed for k in keys),
            "config": config,
            "results": {k: results[k].as_dict() for k in keys},
        }
        write_outputs(out_dir, suite, doc, emit)
    print(
        f"total {elapsed:.1f} s; "
        + (
            "every answer checked and correct"
            if passed
            else "FAIL: some answers were wrong or missing; those figures are void"
        )
    )
    if args.json:
        doc = {
            "machine": info,
            "seconds": round(elapsed, 2),
            "passed": passed,
            "config": config,
            "suites": {k: r.as_dict() for k, r in results.items() if k != "cache"},
            "cache": results["cache"].as_dict() if "cache" in results else None,
        }
        _write(Path(args.json), doc)
    return 0 if passed else 1
