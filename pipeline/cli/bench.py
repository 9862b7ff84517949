"""``kvpipe bench SUITE``: the benchmark suites (:mod:`pipeline.bench`), run on fresh services."""

from __future__ import annotations

import argparse

from pipeline.cli.flags import FLAGS
from pipeline.cli.program import Subparsers
from pipeline.config import Settings

#: ``kvpipe bench SUITE``: every suite (``all`` runs those of ``pipeline.bench.runner.ALL_SUITES``).
BENCH_SUITES = (
    "naive", "echo", "batching", "memo", "cache", "e2e", "scale", "onnx", "dedupe", "prefix",
    "cluster", "tracing",
)  # fmt: skip


def cmd_bench(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.bench.runner import main as bench_main

    return bench_main(args, settings)


def add_parsers(sub: Subparsers) -> None:
    """``bench``."""
    p = sub.add_parser(
        "bench",
        help="benchmarks: each prints figures and ratios, writes DIR/SUITE.json and .png",
        description="Run a benchmark suite on fresh local services; each prints its figures "
        "and the ratios of its sides measured in the same run.",
    )
    p.add_argument(
        "suite",
        choices=[*BENCH_SUITES, "all"],
        nargs="?",
        default="all",
    )
    p.add_argument(
        "--accesses",
        type=int,
        metavar="N",
        help="accesses per trace of the cache simulation (default 1000000)",
    )
    p.add_argument(
        "--requests",
        type=int,
        metavar="N",
        help="requests per run of each side (default 2000 for naive's cached side, 50000 for "
        "echo, 3000 for batching and memo, 20000 for batching's small MLP and onnx, 8000 for "
        "scale, 30000 for dedupe)",
    )
    p.add_argument(
        "--naive-requests",
        type=int,
        default=200,
        metavar="N",
        help="requests per run of the article-method side (slow: MBs from Redis each)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=2,
        metavar="R",
        help="runs of each side, order A B, B A, ... (default 2)",
    )
    p.add_argument(
        "--rates",
        metavar="R1,R2,...",
        help="e2e: offered rates in requests/s "
        "(default 1000,2000,4000,8000,12000,16000,24000,32000); onnx: the first is the rate "
        "of the p99 runs (default 1000)",
    )
    p.add_argument(
        "--duration",
        type=float,
        metavar="S",
        help="e2e: seconds of load at each rate (default 4); onnx: of each p99 run (default 3)",
    )
    p.add_argument(
        "--layers",
        metavar="N,N,...",
        help="scale: the MLP's layer sizes (default 64,4096,4096,4096,16)",
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        default="bench-results",
        help="where SUITE.json and SUITE.png go (default bench-results/)",
    )
    p.add_argument(
        "--wire",
        choices=["auto", "npy", "json"],
        default="auto",
        help="content type of the requests (auto: JSON for the small MLP, where it is cheaper, "
        "npy for the article's and the scale model, where it is much cheaper)",
    )
    p.add_argument(
        "--processes",
        dest="bench_processes",  # not the serve setting of the same flag
        type=int,
        metavar="N",
        help="echo and e2e: also run kvpipe serve --processes N against one worker process "
        "(echo: a backlog comparison of its own; e2e: a third side in the sweep)",
    )
    p.add_argument("--json", metavar="FILE", help="also write every figure as one JSON file")
    p.add_argument("--log-level", choices=FLAGS["log_level"].choices)
    p.set_defaults(handler=cmd_bench)
