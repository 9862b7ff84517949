"""``kvpipe serve``: an inference worker until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio

from pipeline.cli.flags import add_connection_flags, add_serve_flags
from pipeline.cli.program import Subparsers
from pipeline.config import Settings
from pipeline.logging import configure_logging


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from consumers.inference import run_until_signalled

    configure_logging(fmt=settings.log_format, level=settings.log_level)
    return asyncio.run(run_until_signalled(settings))


def add_parsers(sub: Subparsers) -> None:
    """``serve``."""
    p = sub.add_parser(
        "serve",
        help="run an inference worker until SIGTERM",
        description="Run an inference worker: it joins the consumer group on PREFIX.requests, "
        "answers on PREFIX.results (or a request's reply-to topic) and drains on SIGTERM.",
    )
    add_connection_flags(p)
    add_serve_flags(p)
    p.set_defaults(handler=cmd_serve)
