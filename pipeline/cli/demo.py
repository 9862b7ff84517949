"""``kvpipe demo``: end to end on fresh local services, every answer checked."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from pipeline.cli.flags import FLAGS
from pipeline.cli.program import Subparsers
from pipeline.config import Settings
from pipeline.logging import configure_logging
from pipeline.progress import progress


def _demo_onnx(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.dev.demo import (
        DIGITS_HELD_OUT,
        ROUNDING_MARGIN,
        missing_onnx_extra,
        run_onnx_demo,
    )

    missing = missing_onnx_extra()
    if missing:
        print(
            f"kvpipe demo --onnx needs the onnx extra ({', '.join(missing)} missing): "
            "pip install -e '.[onnx]'",
            file=sys.stderr,
        )
        return 2
    configure_logging(
        fmt=settings.log_format, level=args.log_level or "warning", dependencies="error"
    )
    print(
        "kvpipe demo --onnx: training scikit-learn's MLPClassifier on its bundled digits, "
        "converting it with skl2onnx, publishing it as ONNX into a fresh local Redis, sending "
        "the held-out rows through Kafka one a request",
        file=sys.stderr,
    )
    with progress("results", DIGITS_HELD_OUT, enabled=not args.json) as update:
        report = asyncio.run(
            run_onnx_demo(seed=args.seed, base=settings, progress=lambda done, _: update(done))
        )
    if args.json:
        print(json.dumps(report.as_dict()))
        return 0 if report.passed else 1
    n = report.requests
    print(
        f"requests {n}  served {report.served}  errors {report.errors}"
        f"{' ' + str(report.error_codes) if report.error_codes else ''}  "
        f"missing {report.missing}  wrong version {report.wrong_version}  "
        f"duplicates {report.duplicates}"
    )
    print(f"correct {report.same}/{n}  (served label equals scikit-learn's predict on the row)")
    for m in report.mismatches:
        print(
            f"  row {m.row}: served {m.served}, scikit-learn {m.sklearn}, probability margin "
            f"{m.margin:.2e} (served {m.served_margin:.2e}): "
            + ("float rounding" if m.rounding else f"NOT rounding (>= {ROUNDING_MARGIN:g})")
        )
    print(
        f"served accuracy {report.served_accuracy:.4f} on the true labels  "
        f"(scikit-learn's own {report.sklearn_accuracy:.4f})"
    )
    print(f"probabilities: largest difference from predict_proba {report.max_probability_diff:.2e}")
    print(f"throughput {report.requests_per_s} req/s over {report.seconds} s")
    print(
        f"latency p50 {report.latency_p50_ms} ms  p99 {report.latency_p99_ms} ms  "
        f"(burst of {n}, send to result; worker p50 {report.worker_total_p50_ms} ms)"
    )
    hidden = "-".join(str(h) for h in report.hidden)
    print(
        f"model: MLPClassifier 64-{hidden}-10 trained in {report.train_seconds} s "
        f"(scikit-learn {report.sklearn_version}), ONNX {report.onnx_bytes} bytes, "
        f"{report.tensors} weight tensors in Redis, version {report.version}, "
        f"{report.cache_loads} loads from Redis"
    )
    rounded = len(report.mismatches)
    if report.passed and not rounded:
        print(f"PASS: all {n} served labels equal scikit-learn's predict")
    elif report.passed:
        print(
            f"PASS: {report.same} of {n} served labels equal scikit-learn's predict, "
            f"{rounded} differ within float rounding (margin < {ROUNDING_MARGIN:g})"
        )
    else:
        print("FAIL: see above")
    return 0 if report.passed else 1


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.dev.demo import Wave, run_demo, run_train_demo

    if args.onnx:
        return _demo_onnx(args, settings)
    if args.train:
        configure_logging(
            fmt=settings.log_format, level=args.log_level or "warning", dependencies="error"
        )
        print(
            "kvpipe demo --train: a worker serves an embedding scorer (2k users x 5k items) "
            "while the trainer learns it and publishes every 1000 steps",
            file=sys.stderr,
        )

        def show(wave: Wave) -> None:
            if not args.json:
                print(
                    f"wave {wave.index}: versions {wave.versions}  accuracy "
                    f"{wave.accuracy:.3f}  errors {wave.errors}",
                    flush=True,
                )

        trained = asyncio.run(run_train_demo(seed=args.seed, base=settings, emit=show))
        if args.json:
            print(json.dumps(trained.as_dict()))
        else:
            first, last = trained.waves[0].accuracy, trained.waves[-1].accuracy
            print(f"accuracy {first:.3f} -> {last:.3f} over {trained.publishes} publishes")
            print(
                "PASS: served accuracy rose as versions were published"
                if trained.passed
                else "FAIL: accuracy did not rise (or requests failed)"
            )
        return 0 if trained.passed else 1

    configure_logging(
        fmt=settings.log_format, level=args.log_level or "warning", dependencies="error"
    )
    print(
        f"kvpipe demo: starting local Redis and broker, publishing the {args.preset!r} model, "
        f"sending {args.requests} requests",
        file=sys.stderr,
    )
    with progress("results", args.requests, enabled=not args.json) as update:
        report = asyncio.run(
            run_demo(
                requests=args.requests,
                preset=args.preset,
                seed=args.seed,
                base=settings,
                progress=lambda done, total: update(done),
            )
        )
    if args.json:
        print(json.dumps(report.as_dict()))
    else:
        print(
            f"requests {report.requests}  correct {report.ok}  errors {report.errors}  "
            f"wrong {report.wrong}  missing {report.missing}  duplicates {report.duplicates}\n"
            f"throughput {report.requests_per_s} req/s over {report.seconds} s  "
            f"latency p50 {report.latency_p50_ms} ms  p99 {report.latency_p99_ms} ms "
            f"(burst of {report.requests}, send to result)\n"
            f"cache hit rate {report.cache_hit_rate:.4f} ({report.cache_loads} loads from Redis)"
            f"  results by cache {report.results_by_cache}  model version {report.version}"
        )
        print("PASS: every result matches numpy" if report.passed else "FAIL: see counts above")
    return 0 if report.passed else 1


def add_parsers(sub: Subparsers) -> None:
    """``demo``."""
    p = sub.add_parser(
        "demo",
        help="end to end on fresh local services; exits 0 when all correct",
        description="Start fresh local services, publish a model, serve and send requests, "
        "then check every answer against numpy; exit 0 only when all are correct.",
    )
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--preset", choices=["article", "mlp"], default="mlp")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--train",
        action="store_true",
        help="serve while training: accuracy of served results per wave",
    )
    mode.add_argument(
        "--onnx",
        action="store_true",
        help="scikit-learn's digits MLP as ONNX, served against its own predict (the onnx "
        "extra; --requests and --preset do not apply)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.add_argument("--log-level", choices=FLAGS["log_level"].choices)
    p.set_defaults(handler=cmd_demo)
