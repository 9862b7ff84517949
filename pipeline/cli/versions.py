"""``kvpipe versions`` and ``rollback``: the stored versions of a model, and which is served."""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from pipeline.cli.flags import add_connection_flags
from pipeline.cli.program import Subparsers
from pipeline.cli.publish import send_announcement
from pipeline.config import Settings
from pipeline.errors import ConfigError


async def _versions(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.io.kv import open_kv
    from pipeline.params.store import ParamStore

    async with open_kv(settings.redis) as kv:
        rows = await ParamStore(
            kv,
            prefix=settings.redis.key_prefix,
            emb_partitions=settings.redis.emb_partitions,
        ).versions(args.model)
    if not rows:
        raise ConfigError(f"model {args.model!r} has no versions; publish one first")
    if args.json:
        print(json.dumps([r.__dict__ for r in rows]))
        return 0
    print(f"{'':2}{'version':>8}  {'created (UTC)':<20} {'MB':>8}  state")
    for r in rows:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r.created_at))
        if not r.available:
            state = "expired"
        elif r.expires_at is not None:
            state = f"expires in {max(0, r.expires_at - time.time()):.0f} s"
        else:
            state = "kept"
        mark = "* " if r.current else "  "
        print(f"{mark}{r.version:>8}  {created:<20} {r.nbytes / 1e6:>8.2f}  {state}")
    return 0


async def _rollback(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.io.kv import open_kv
    from pipeline.params.store import ParamStore
    from pipeline.params.updates import Announcement

    async with open_kv(settings.redis) as kv:
        store = ParamStore(
            kv,
            prefix=settings.redis.key_prefix,
            emb_partitions=settings.redis.emb_partitions,
            retention_s=args.retention,
        )
        await store.set_current(args.model, args.to)
    await send_announcement(settings, Announcement(args.model, "rollback", args.to))
    print(f"{args.model} now serves v{args.to}; announced on {settings.kafka.updates_topic}")
    return 0


def cmd_versions(args: argparse.Namespace, settings: Settings) -> int:
    """``kvpipe versions``."""
    return asyncio.run(_versions(args, settings))


def cmd_rollback(args: argparse.Namespace, settings: Settings) -> int:
    """``kvpipe rollback``."""
    return asyncio.run(_rollback(args, settings))


def add_parsers(sub: Subparsers) -> None:
    """``versions`` and ``rollback``."""
    p = sub.add_parser(
        "versions",
        help="list a model's versions, the serving one marked *",
        description="List the versions of a model stored in Redis: creation time, size, "
        "expiry, and the one being served marked *.",
    )
    add_connection_flags(p)
    p.add_argument("--model", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_versions)

    p = sub.add_parser(
        "rollback",
        help="serve an earlier version again and announce it",
        description="Move a model's version pointer back to an earlier version that is still "
        "stored, and announce it so the workers switch at once.",
    )
    add_connection_flags(p)
    p.add_argument("--model", required=True)
    p.add_argument("--to", type=int, required=True, metavar="N", help="the version to serve")
    p.add_argument(
        "--retention", type=float, default=3600.0, help="seconds the replaced versions are kept"
    )
    p.set_defaults(handler=cmd_rollback)
