"""``kvpipe infer`` and ``generate``: one request sent and its answer waited for."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

import numpy as np

from pipeline.cli.flags import add_connection_flags
from pipeline.cli.program import Subparsers
from pipeline.config import Settings
from pipeline.errors import ConfigError


def _json_rows(text: str, flag: str, *, whole: bool = False) -> np.ndarray[Any, Any]:
    """``--input``/``--ids``: JSON rows of numbers as a 2-D array, or one line saying why not
    (``whole``: integers, as embedding ids are)."""
    try:
        rows = np.asarray(json.loads(text), dtype=np.float64)
    except ValueError as exc:
        raise ConfigError(f"{flag} is not JSON rows of numbers ({exc})") from None
    except TypeError:
        raise ConfigError(f"{flag} must be JSON rows of numbers, e.g. [[1, 2]]") from None
    if rows.ndim == 1:
        rows = rows.reshape(1, -1)
    if rows.ndim != 2 or rows.size == 0:
        raise ConfigError(f"{flag} must be a non-empty list of rows, e.g. [[1, 2]]")
    if not np.isfinite(rows).all():
        raise ConfigError(f"{flag} holds a null, NaN or infinity; give finite numbers")
    if not whole:
        return rows.astype(np.float32)
    if not (rows == np.round(rows)).all():
        raise ConfigError(f"{flag} must be whole numbers")
    return rows.astype(np.int64)


async def _infer(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.client import InferenceClient

    inputs = None if args.input is None else _json_rows(args.input, "--input")
    ids = None if args.ids is None else _json_rows(args.ids, "--ids", whole=True)
    async with InferenceClient(settings.kafka) as client:
        result = await client.infer(
            args.model, inputs, ids=ids, version=args.version, timeout=args.timeout
        )
    print(json.dumps(result.to_json(), separators=(",", ":")), flush=True)
    return 0 if result.ok else 1


async def _generate(args: argparse.Namespace, settings: Settings) -> int:
    """Print a generation's text as it arrives, then one summary line on stderr."""
    from pipeline.client import InferenceClient

    deadline = None if args.deadline is None else int((time.time() + args.deadline) * 1000)
    final = None
    async with InferenceClient(settings.kafka) as client:
        async for piece in client.generate(
            args.model,
            args.prompt,
            max_tokens=args.max_tokens,
            version=args.version,
            temperature=args.temperature,
            top_k=args.top_k,
            seed=args.seed,
            stop=args.stop or None,
            deadline_ms=deadline,
            timeout=args.timeout,
        ):
            if args.json:
                if piece.tokens:
                    print(json.dumps({"tokens": piece.tokens, "text": piece.text}), flush=True)
            else:
                print(piece.text, end="", flush=True)
            final = piece.final or final
    if final is None:  # pragma: no cover - generate ends only with a final message
        return 1
    if not args.json:
        print(flush=True)
    summary = {
        "id": final.id,
        "version": final.version,
        "status": final.status,
        "error": None if final.ok else {"code": final.error_code, "message": final.error_message},
        "finish_reason": final.finish_reason,
        "usage": final.usage,
        "prefix": final.prefix,
        "timings": final.timings,
    }
    print(json.dumps(summary, separators=(",", ":")), file=sys.stderr, flush=True)
    return 0 if final.ok else 1


def cmd_infer(args: argparse.Namespace, settings: Settings) -> int:
    """``kvpipe infer``."""
    return asyncio.run(_infer(args, settings))


def cmd_generate(args: argparse.Namespace, settings: Settings) -> int:
    """``kvpipe generate``."""
    return asyncio.run(_generate(args, settings))


def add_parsers(sub: Subparsers) -> None:
    """``infer`` and ``generate``."""
    p = sub.add_parser(
        "infer",
        help="send one request, wait for its result and print it as JSON",
        description="Send one request and print its result as one JSON line; exit 0 when the "
        "result is ok, 1 when it is an error result or no result came in time. Answers come "
        "on a reply topic of this command's own, deleted after (KVPIPE_REPLY_TOPIC: a shared "
        "one instead).",
    )
    add_connection_flags(p)
    p.add_argument("--model", required=True)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--input", metavar="JSON", help="input rows, e.g. '[[0.1, 0.2]]' (one row: '[0.1, 0.2]')"
    )
    what.add_argument(
        "--ids", metavar="JSON", help="id rows for an embedding model, e.g. '[[3, 7]]'"
    )
    p.add_argument("--version", type=int, help="pin a model version")
    p.add_argument(
        "--timeout", type=float, default=30.0, help="seconds to wait for the result (default 30)"
    )
    p.set_defaults(handler=cmd_infer)

    p = sub.add_parser(
        "generate",
        help="generate text from a transformer model, printed as it streams in",
        description="Send one generation request and print its text as the tokens arrive; "
        "a summary line (finish reason, usage, prefix-cache provenance, timings) goes to "
        "stderr. Exit 0 when the generation ended ok, 1 otherwise.",
    )
    add_connection_flags(p)
    p.add_argument("--model", required=True)
    p.add_argument("--prompt", required=True, help="the prompt text (UTF-8)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--version", type=int, help="pin a model version")
    p.add_argument("--temperature", type=float, help="0 (default): greedy")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    p.add_argument("--seed", type=int, help="seed of the sampling")
    p.add_argument("--stop", action="append", help="stop once the text ends with this")
    p.add_argument("--deadline", type=float, help="seconds from now the generation may run")
    p.add_argument("--json", action="store_true", help="one JSON line per piece")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each message")
    p.set_defaults(handler=cmd_generate)
