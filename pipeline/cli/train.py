"""``kvpipe train``: online SGD that publishes and announces versions."""

from __future__ import annotations

import argparse
import asyncio
import json

from pipeline.cli.flags import add_connection_flags
from pipeline.cli.program import Subparsers
from pipeline.config import Settings
from pipeline.logging import configure_logging


def cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    from consumers.inference import install_stop_signals
    from consumers.trainer import Publish, TrainSettings, train

    configure_logging(fmt=settings.log_format, level=settings.log_level)
    every_steps = args.every_steps
    if every_steps is None:
        every_steps = 10**12 if args.every_seconds is not None else 100
    cfg = TrainSettings(
        model=args.model,
        preset=args.preset,
        synthetic=args.synthetic,
        steps=args.steps,
        publish_every_steps=every_steps,
        publish_every_s=args.every_seconds,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        retention_s=args.retention,
    )

    def show(pub: Publish) -> None:
        if args.json:
            print(
                json.dumps({"version": pub.version, "step": pub.step, "loss": pub.loss}), flush=True
            )

    async def run() -> int:
        stop = asyncio.Event()
        install_stop_signals(stop)
        report = await train(settings, cfg, stop, on_publish=show)
        if not args.json:
            last = report.publishes[-1].version if report.publishes else None
            print(
                f"trained {report.steps} steps, published {len(report.publishes)} versions "
                f"(last v{last}), final loss {report.last_loss:.5f}"
            )
        return 0

    return asyncio.run(run())


def add_parsers(sub: Subparsers) -> None:
    """``train``."""
    p = sub.add_parser(
        "train",
        help="online SGD that publishes and announces versions",
        description="Train a model online (SGD on PREFIX.training or a synthetic task) and "
        "publish and announce a new version every N steps or T seconds, until SIGTERM.",
    )
    add_connection_flags(p)
    p.add_argument("--model", required=True)
    p.add_argument(
        "--preset",
        choices=["mlp", "embedding"],
        help="start a new model from this preset when none is published",
    )
    p.add_argument(
        "--synthetic",
        action="store_true",
        help="learn a seeded synthetic task instead of reading PREFIX.training",
    )
    p.add_argument("--steps", type=int, help="stop after N steps (default: until SIGTERM)")
    p.add_argument("--every-steps", type=int, help="publish every N steps (default 100)")
    p.add_argument("--every-seconds", type=float, help="publish every T seconds")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, help="learning rate (0.05 MLP, 0.5 embedding)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--retention",
        type=float,
        default=3600.0,
        help="seconds old versions are kept (never the current or previous)",
    )
    p.add_argument("--json", action="store_true", help="print each publish as JSON")
    p.set_defaults(handler=cmd_train)
