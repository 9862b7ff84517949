"""``kvpipe publish``: a new version of a model into Redis, from a preset, an .npz or ONNX."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.cli.flags import add_connection_flags
from pipeline.cli.program import PROG, Subparsers
from pipeline.config import Settings
from pipeline.errors import ConfigError, KvpipeError

if TYPE_CHECKING:  # the store is imported when a command runs, not with the CLI
    from pipeline.io.kv import KeyValue
    from pipeline.params.store import ParamStore, Published


def _arch_from_tensors(
    names: Sequence[str], arrays: Mapping[str, np.ndarray[Any, Any]], activation: str
) -> dict[str, Any]:
    """Guess the architecture of an .npz: w0,b0,... is an MLP; weight1,bias1,... linear heads."""
    if "w0" in names:
        layers = [int(arrays["w0"].shape[0])]
        i = 0
        while f"w{i}" in names:
            layers.append(int(arrays[f"w{i}"].shape[1]))
            i += 1
        return {"kind": "mlp", "layers": layers, "activation": activation, "softmax": False}
    if "weight1" in names:
        heads = sum(1 for n in names if n.startswith("weight"))
        w = arrays["weight1"]
        return {
            "kind": "linear_heads",
            "dim_in": int(w.shape[0]),
            "dim_out": int(w.shape[1]),
            "heads": heads,
        }
    raise ConfigError(
        "cannot tell the architecture from the tensor names; pass --arch JSON "
        "(MLP tensors are w0,b0,w1,b1,...; linear heads weight1,bias1,...)"
    )


def _arch_json(text: str) -> dict[str, Any]:
    """``--arch``: a JSON object, or one line saying why not."""
    try:
        arch = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"--arch is not JSON: {exc}") from None
    if not isinstance(arch, dict):
        raise ConfigError('--arch must be a JSON object such as {"kind": "mlp", ...}')
    return arch


async def _publish(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.io.kv import open_kv
    from pipeline.params.models import EmbeddingScorer, build_model, preset
    from pipeline.params.store import check_model_name

    check_model_name(args.model)
    if args.onnx:
        return await _publish_onnx(args, settings)
    if args.from_file:
        from pipeline.io.npy import read_npz

        path = Path(args.from_file)
        try:
            arrays: Mapping[str, np.ndarray[Any, Any]] = read_npz(path)
        except ValueError as exc:
            raise ConfigError(f"cannot read {path} as a .npz of arrays: {exc}") from None
        try:
            arch = (
                _arch_json(args.arch)
                if args.arch
                else _arch_from_tensors(list(arrays), arrays, args.activation)
            )
        except (ValueError, IndexError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"cannot tell the architecture of {path} ({type(exc).__name__}: {exc}); "
                "check the tensor shapes or pass --arch JSON"
            ) from None
    else:
        model = preset(args.preset) if not args.arch else build_model(_arch_json(args.arch))
        arch = model.arch
        arrays = model.init(args.seed)
    built = build_model(arch)
    tables = built.init_tables(args.seed) if isinstance(built, EmbeddingScorer) else None
    async with open_kv(settings.redis) as kv:
        published = await _store(kv, args, settings).publish(
            args.model, arch, arrays, tables=tables
        )
    _print_published(args, published)
    return await _announce_published(args, settings, published, embedding=tables is not None)


def _store(kv: KeyValue, args: argparse.Namespace, settings: Settings) -> ParamStore:
    """The parameter store ``publish`` writes to (retention from ``--retention``)."""
    from pipeline.params.store import ParamStore

    return ParamStore(
        kv,
        prefix=settings.redis.key_prefix,
        emb_partitions=settings.redis.emb_partitions,
        retention_s=args.retention,
    )


def _print_published(args: argparse.Namespace, published: Published, **extra: Any) -> None:
    """The new version's number, or with ``--json`` one line of its figures."""
    if not args.json:
        print(published.version)
        return
    figures = {
        "model": args.model,
        "version": published.version,
        "bytes": published.nbytes,
        "current": published.current,
    }
    print(json.dumps({**figures, **extra}))


def _read_onnx(path: Path) -> bytes:
    """The bytes of an ONNX file, refused before reading when it is over the size limit."""
    from pipeline.params.onnx_graph import OnnxLimits

    limit = OnnxLimits().max_file_bytes
    try:
        size = path.stat().st_size
        if size > limit:
            raise ConfigError(f"{path} is {size} bytes, over the ONNX file limit of {limit}")
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None


async def _publish_onnx(args: argparse.Namespace, settings: Settings) -> int:
    """``kvpipe publish --onnx FILE.onnx``: the file checked before Redis is touched."""
    from pipeline.io.kv import open_kv
    from pipeline.params.onnx import check_session
    from pipeline.params.onnx_graph import prepare_onnx

    if args.arch:
        raise ConfigError("--arch does not go with --onnx: the graph says its architecture")
    data = await asyncio.to_thread(_read_onnx, Path(args.onnx))
    prepared = await asyncio.to_thread(prepare_onnx, data)
    await asyncio.to_thread(check_session, data)  # before Redis is touched, as the checks
    async with open_kv(settings.redis) as kv:
        published = await _store(kv, args, settings).publish_onnx(args.model, prepared)
    _print_published(args, published, tensors=len(published.manifest.tensors))
    return await _announce_published(args, settings, published, embedding=False)


async def _announce_published(
    args: argparse.Namespace, settings: Settings, published: Any, *, embedding: bool
) -> int:
    """Announce a publish, unless a newer version got there first or --no-announce."""
    from pipeline.params.updates import Announcement

    if not published.is_current:
        # A concurrent publish of a newer version won: never announce this one as serving.
        print(
            f"{PROG} publish: published {args.model} v{published.version}, but "
            f"v{published.current} is already current; v{published.version} is not served "
            f"(kvpipe rollback --to {published.version} would serve it) and was not announced",
            file=sys.stderr,
        )
        return 0
    if args.announce:
        ann = Announcement(args.model, "embedding" if embedding else "dense", published.version)
        try:
            await send_announcement(settings, ann)
        except KvpipeError as exc:
            raise KvpipeError(
                f"published {args.model} v{published.version}, but could not announce it "
                f"(workers will see it within KVPIPE_VERSION_TTL): {exc}",
                code=exc.code,
            ) from None
    return 0


async def send_announcement(settings: Settings, announcement: Any) -> None:
    from pipeline.io.kafka import Producer, ensure_topics
    from pipeline.params.updates import announce

    k = settings.kafka
    await ensure_topics(k, [k.updates_topic])
    async with Producer(k) as producer:
        await announce(producer, k, announcement)


def cmd_publish(args: argparse.Namespace, settings: Settings) -> int:
    """``kvpipe publish``."""
    return asyncio.run(_publish(args, settings))


def add_parsers(sub: Subparsers) -> None:
    """``publish``."""
    p = sub.add_parser(
        "publish",
        help="publish a new version of a model; prints the version",
        description="Write a new version of a model to Redis (every tensor, then the manifest, "
        "then the version pointer in one step), print its number and announce it on "
        "PREFIX.updates.",
    )
    add_connection_flags(p)
    p.add_argument("--model", required=True, help="model name")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--from",
        dest="from_file",
        metavar="FILE.npz",
        help="tensors from an .npz (w0,b0,... or weight1,bias1,...)",
    )
    src.add_argument(
        "--preset",
        choices=["article", "mlp", "embedding", "gen-tiny", "gen-small"],
        help="a seeded random init (gen-*: transformers for kvpipe generate)",
    )
    src.add_argument(
        "--onnx",
        metavar="FILE.onnx",
        help="an ONNX model: its initializers become tensors, its graph one more key "
        "(needs kvpipe[onnx])",
    )
    p.add_argument("--arch", help='architecture JSON, e.g. \'{"kind":"mlp","layers":[4,8,2]}\'')
    p.add_argument("--activation", default="relu", help="MLP activation when guessing the arch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--retention",
        type=float,
        help="seconds older versions are kept (never the current or previous)",
    )
    p.add_argument(
        "--no-announce",
        dest="announce",
        action="store_false",
        help="do not announce on PREFIX.updates (workers see it within the version TTL)",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=cmd_publish)
