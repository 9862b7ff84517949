"""``kvpipe produce`` and ``results``: requests sent without waiting, results read apart."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cli.flags import add_connection_flags
from pipeline.cli.program import Subparsers
from pipeline.config import Settings
from pipeline.errors import ConfigError
from pipeline.progress import progress


def _read_inputs(path: Path) -> list[tuple[str | None, Any, str | None]]:
    """Rows from a JSONL file ({"id"?, "model"?, "inputs"}) or a .npy matrix."""
    if path.suffix == ".npy":
        from pipeline.io.npy import from_npy

        try:
            arr = from_npy(path.read_bytes())
        except ValueError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        if arr.ndim == 1:
            arr = arr.reshape(1, -1)
        return [(None, arr[i : i + 1], None) for i in range(arr.shape[0])]
    rows: list[tuple[str | None, Any, str | None]] = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            rows.append((obj.get("id"), obj["inputs"], obj.get("model")))
        except (ValueError, KeyError, AttributeError) as exc:
            raise ConfigError(f"{path}:{n}: not a JSON request line ({exc})") from None
    return rows


async def _produce(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.client import InferenceClient
    from pipeline.io.kafka import ensure_topics
    from pipeline.io.wire import JSON, NPY

    if args.file:
        rows = _read_inputs(Path(args.file))
    else:
        dim = args.dim or await _input_dim(settings, args.model)
        rng = np.random.default_rng(args.seed)
        rows = [
            (None, rng.standard_normal((args.rows, dim)).astype(np.float32), None)
            for _ in range(args.count)
        ]
    await ensure_topics(settings.kafka, [settings.kafka.requests_topic])
    started = time.perf_counter()
    ids = []
    async with InferenceClient(settings.kafka, content_type=NPY if args.npy else JSON) as c:
        with progress("produce", len(rows), enabled=not args.json) as update:
            for n, (rid, inputs, model) in enumerate(rows, 1):
                rid = await c.submit(
                    model or args.model,
                    inputs,
                    id=rid or uuid.uuid4().hex,
                    version=args.version,
                    wait=False,
                )
                ids.append(rid)
                if n % 100 == 0 or n == len(rows):
                    update(n)
        await c.flush()
    seconds = time.perf_counter() - started
    if args.json:
        print(json.dumps({"produced": len(ids), "seconds": round(seconds, 3), "ids": ids}))
    else:
        print(f"produced {len(ids)} requests to {settings.kafka.requests_topic} in {seconds:.2f} s")
    return 0


async def _input_dim(settings: Settings, model: str) -> int:
    from pipeline.io.kv import open_kv
    from pipeline.params.models import build_model
    from pipeline.params.store import ParamStore

    async with open_kv(settings.redis) as kv:
        store = ParamStore(
            kv,
            prefix=settings.redis.key_prefix,
            emb_partitions=settings.redis.emb_partitions,
        )
        version = await store.current_version(model)
        manifest = await store.manifest(model, version)
    return build_model(manifest.arch).input_dim


async def _results(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.client import ResultStream

    seen = 0
    deadline = None if args.follow else time.monotonic() + args.timeout
    async with ResultStream(
        settings.kafka, settings.kafka.results_topic, from_beginning=not args.from_end
    ) as stream:
        while args.count is None or seen < args.count:
            batch = await stream.next_batch(0.5)
            for r in batch:
                print(json.dumps(r.to_json(), separators=(",", ":")), flush=True)
                seen += 1
                if args.count is not None and seen >= args.count:
                    break
            if not batch and deadline is not None and time.monotonic() > deadline:
                break
            if batch and deadline is not None:
                deadline = time.monotonic() + args.timeout
    if args.count is not None and seen < args.count:
        print(f"kvpipe results: only {seen} of {args.count} results arrived", file=sys.stderr)
        return 1
    return 0


def cmd_produce(args: argparse.Namespace, settings: Settings) -> int:
    """``kvpipe produce``."""
    return asyncio.run(_produce(args, settings))


def cmd_results(args: argparse.Namespace, settings: Settings) -> int:
    """``kvpipe results``."""
    return asyncio.run(_results(args, settings))


def add_parsers(sub: Subparsers) -> None:
    """``produce`` and ``results``."""
    p = sub.add_parser(
        "produce",
        help="produce requests from a file or generated ones",
        description="Send requests to PREFIX.requests without waiting for their answers "
        "(read them with kvpipe results).",
    )
    add_connection_flags(p)
    p.add_argument("--model", required=True)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--file", help='JSONL lines {"id"?, "inputs": [[...]]} or a .npy matrix')
    src.add_argument("--count", type=int, help="generate N random requests")
    p.add_argument("--rows", type=int, default=1, help="rows per generated request")
    p.add_argument("--dim", type=int, help="input width (read from the model when omitted)")
    p.add_argument("--version", type=int, help="pin a model version")
    p.add_argument("--npy", action="store_true", help="send application/x-npy instead of JSON")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_produce)

    p = sub.add_parser(
        "results",
        help="print results as JSON lines",
        description="Read PREFIX.results (every partition, no consumer group) and print each "
        "result as one JSON line.",
    )
    add_connection_flags(p)
    p.add_argument("--follow", action="store_true", help="keep waiting for new results")
    p.add_argument("--count", type=int, help="stop after N results")
    p.add_argument("--from-end", action="store_true", help="only results produced from now on")
    p.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="without --follow, stop after this many seconds without a new result",
    )
    p.set_defaults(handler=cmd_results)
