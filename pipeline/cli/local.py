"""``kvpipe local up|down``: a Redis (or a Redis Cluster) and a broker for development."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.cli.program import Subparsers
from pipeline.config import Settings
from pipeline.errors import ConfigError


def _count(raw: str) -> int:
    """A whole number, 0 or more (argparse type of --redis-cluster and --replicas)."""
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{raw!r} must be 0 or more")
    return value


def cmd_local(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.dev.daemon import local_down, local_up

    state = Path(args.state_dir)
    if args.action == "up":
        if args.replicas and not args.redis_cluster:
            raise ConfigError("--replicas needs --redis-cluster N")
        info = local_up(state, redis_cluster=args.redis_cluster, replicas=args.replicas)
        print(f"export KVPIPE_KAFKA={info['KVPIPE_KAFKA']}")
        print(f"export KVPIPE_REDIS={info['KVPIPE_REDIS']}")
        return 0
    stopped = local_down(state)
    print("stopped the local services" if stopped else "no local services were running")
    return 0


def add_parsers(sub: Subparsers) -> None:
    """``local``."""
    p = sub.add_parser(
        "local",
        help="start or stop a local Redis and Kafka-protocol broker",
        description="Start (up) or stop (down) a Redis and a Tansu broker in the background "
        "for development; up prints the KVPIPE_KAFKA and KVPIPE_REDIS to export.",
    )
    p.add_argument("action", choices=["up", "down"])
    p.add_argument("--state-dir", default=".kvpipe", help="where pids and logs are kept")
    p.add_argument(
        "--redis-cluster",
        type=_count,
        default=0,
        metavar="N",
        help="up: a Redis Cluster of N primaries instead of one Redis (KVPIPE_REDIS becomes "
        "redis+cluster://...)",
    )
    p.add_argument(
        "--replicas", type=_count, default=0, metavar="R", help="up: replicas of each primary"
    )
    p.set_defaults(handler=cmd_local)
