"""The ``kvpipe`` command: ``main`` and its parser, one module per command group.

Each command module owns its ``cmd_*`` functions and adds its subcommands with
``add_parsers(sub)``; :func:`build_parser` calls them in the order ``kvpipe --help`` lists.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping, Sequence

from pipeline.cli import bench, demo, local, publish, query, serve, traffic, train, versions
from pipeline.cli.flags import _FLAG_PATHS, build_settings
from pipeline.cli.program import EXIT_FAILURE, EXIT_USAGE, PROG
from pipeline.config import ENV_VARS, Settings
from pipeline.errors import ConfigError, KvpipeError
from pipeline.logging import configure_logging
from pipeline.names import check_name

__all__ = ["EXIT_FAILURE", "EXIT_USAGE", "_FLAG_PATHS", "build_parser", "build_settings", "main"]

#: Commands that build models from stored architectures, so load the model plugins first
#: (``serve`` loads them in its worker process, :func:`consumers.inference.run_until_signalled`).
_MODEL_COMMANDS = frozenset({"publish", "produce", "train"})
#: The command modules, each adding its subcommands in this order (the order of ``--help``).
_COMMAND_GROUPS = (serve, publish, traffic, query, local, demo, train, versions, bench)


def _version() -> str:
    """The installed kvpipe's version (its package metadata)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kvpipe")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    """The ``kvpipe`` parser: every subcommand, its flags, and the environment in the epilog."""
    width = max(len(v.name) for v in ENV_VARS)
    env_help = "\n".join(f"  {v.name:<{width}} {v.help}" for v in ENV_VARS)
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Streaming inference on Kafka with model parameters in Redis "
        "behind an async in-process cache.",
        epilog=f"environment:\n{env_help}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for group in _COMMAND_GROUPS:
        group.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run one command; errors become one line on stderr. Exit status: 0 done, 1 a failure
    at run time (a service down, an error result, a timeout), 2 a usage error (argparse's
    own, or settings and input that cannot work: :class:`ConfigError`), 130 interrupted."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace, Settings], int] = args.handler
    try:
        settings = build_settings(args, os.environ if environ is None else environ)
        if getattr(args, "model", None) is not None:
            check_name(args.model)
        configure_logging(
            fmt=settings.log_format,
            level=getattr(args, "log_level", None) or "warning",
            dependencies="critical",
        )
        if args.command in _MODEL_COMMANDS:
            from pipeline.params.plugins import load_model_plugins

            load_model_plugins(settings.model_plugins)
        return handler(args, settings)
    except KvpipeError as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, ConfigError) else EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
