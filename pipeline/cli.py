"""The ``kvpipe`` command: serve, publish, produce, results, local up|down, demo, bench."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import (
    ENV_VARS,
    EnvVar,
    Settings,
    settings_from_env,
    validate,
    with_values,
)
from pipeline.errors import ConfigError, KvpipeError
from pipeline.logging import configure_logging
from pipeline.names import check_name
from pipeline.progress import progress

PROG = "kvpipe"
#: ``kvpipe bench SUITE``: every suite (``all`` runs those of ``pipeline.bench.runner.ALL_SUITES``).
BENCH_SUITES = (
    "naive", "echo", "batching", "memo", "cache", "e2e", "scale", "onnx", "dedupe", "prefix",
    "cluster", "tracing",
)  # fmt: skip
#: Exit statuses: a failure at run time (a service down, an error result) and a usage error
#: (argparse's own status for a bad command line, and settings or input that cannot work).
EXIT_FAILURE = 1
EXIT_USAGE = 2


#: Settings flags by argparse ``dest`` (``--cache-bytes`` is ``cache_bytes``), from the settings.
_FLAGS: dict[str, EnvVar] = {v.flag[2:].replace("-", "_"): v for v in ENV_VARS if v.flag}
#: The setting each flag fills, by argparse ``dest``.
_FLAG_PATHS = {dest: var.path for dest, var in _FLAGS.items()}
#: Commands that build models from stored architectures, so load the model plugins first
#: (``serve`` loads them in its worker process, :func:`consumers.inference.run_until_signalled`).
_MODEL_COMMANDS = frozenset({"publish", "produce", "train"})


def _flag_type(var: EnvVar) -> Callable[[str], Any]:
    """The setting's own parser, its complaint shown by argparse without the value."""

    def parse(raw: str) -> Any:
        try:
            return var.parse(raw)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = var.flag or var.name
    return parse


def _add_setting_flag(g: argparse._ActionsContainer, var: EnvVar) -> None:
    """One settings flag: its name, choices, metavar and help all come from the setting."""
    assert var.flag is not None
    text = f"{var.help} ({var.name})".replace("%", "%%")
    if var.choices:
        g.add_argument(var.flag, choices=var.choices, help=text)
    else:
        g.add_argument(var.flag, type=_flag_type(var), metavar=var.metavar, help=text)


def _add_connection_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("connections (flags override the environment)")
    for var in _FLAGS.values():
        if var.flag_scope == "common":
            _add_setting_flag(g, var)


def _add_serve_flags(p: argparse.ArgumentParser) -> None:
    for var in _FLAGS.values():
        if var.flag_scope == "serve":
            _add_setting_flag(p, var)


def build_settings(args: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
    """Settings from the environment, then the command's flags on top."""
    settings = settings_from_env(environ)
    values = {path: getattr(args, name, None) for name, path in _FLAG_PATHS.items()}
    return validate(with_values(settings, values))


def _version() -> str:
    """The installed kvpipe's version (its package metadata)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kvpipe")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _run(coro: Coroutine[Any, Any, int]) -> int:
    return asyncio.run(coro)


# -- commands --------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from consumers.inference import run_until_signalled

    configure_logging(fmt=settings.log_format, level=settings.log_level)
    return asyncio.run(run_until_signalled(settings))


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
    from pipeline.params.store import ParamStore, check_model_name

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
        store = ParamStore(
            kv,
            prefix=settings.redis.key_prefix,
            emb_partitions=settings.redis.emb_partitions,
            retention_s=args.retention,
        )
        published = await store.publish(args.model, arch, arrays, tables=tables)
    if args.json:
        print(
            json.dumps(
                {
                    "model": args.model,
                    "version": published.version,
                    "bytes": published.nbytes,
                    "current": published.current,
                }
            )
        )
    else:
        print(published.version)
    return await _announce_published(args, settings, published, embedding=tables is not None)


def _read_onnx(path: Path) -> bytes:
    """The bytes of an ONNX file, refused before reading when it is over the size limit."""
    from pipeline.params.onnx import OnnxLimits

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
    from pipeline.params.onnx import prepare_onnx
    from pipeline.params.store import ParamStore

    if args.arch:
        raise ConfigError("--arch does not go with --onnx: the graph says its architecture")
    data = await asyncio.to_thread(_read_onnx, Path(args.onnx))
    prepared = await asyncio.to_thread(prepare_onnx, data)
    async with open_kv(settings.redis) as kv:
        store = ParamStore(
            kv,
            prefix=settings.redis.key_prefix,
            emb_partitions=settings.redis.emb_partitions,
            retention_s=args.retention,
        )
        published = await store.publish_onnx(args.model, prepared)
    if args.json:
        print(
            json.dumps(
                {
                    "model": args.model,
                    "version": published.version,
                    "bytes": published.nbytes,
                    "current": published.current,
                    "tensors": len(published.manifest.tensors),
                }
            )
        )
    else:
        print(published.version)
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
            await _announce(settings, ann)
        except KvpipeError as exc:
            raise KvpipeError(
                f"published {args.model} v{published.version}, but could not announce it "
                f"(workers will see it within KVPIPE_VERSION_TTL): {exc}",
                code=exc.code,
            ) from None
    return 0


async def _announce(settings: Settings, announcement: Any) -> None:
    from pipeline.io.kafka import Producer, ensure_topics
    from pipeline.params.updates import announce

    k = settings.kafka
    await ensure_topics(k, [k.updates_topic])
    async with Producer(k) as producer:
        await announce(producer, k, announcement)


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
    await _announce(settings, Announcement(args.model, "rollback", args.to))
    print(f"{args.model} now serves v{args.to}; announced on {settings.kafka.updates_topic}")
    return 0


def cmd_bench(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.bench.runner import main as bench_main

    return bench_main(args, settings)


# -- parser ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
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

    p = sub.add_parser(
        "serve",
        help="run an inference worker until SIGTERM",
        description="Run an inference worker: it joins the consumer group on PREFIX.requests, "
        "answers on PREFIX.results (or a request's reply-to topic) and drains on SIGTERM.",
    )
    _add_connection_flags(p)
    _add_serve_flags(p)
    p.set_defaults(handler=cmd_serve)

    p = sub.add_parser(
        "publish",
        help="publish a new version of a model; prints the version",
        description="Write a new version of a model to Redis (every tensor, then the manifest, "
        "then the version pointer in one step), print its number and announce it on "
        "PREFIX.updates.",
    )
    _add_connection_flags(p)
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
    p.set_defaults(handler=lambda a, s: _run(_publish(a, s)))

    p = sub.add_parser(
        "produce",
        help="produce requests from a file or generated ones",
        description="Send requests to PREFIX.requests without waiting for their answers "
        "(read them with kvpipe results).",
    )
    _add_connection_flags(p)
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
    p.set_defaults(handler=lambda a, s: _run(_produce(a, s)))

    p = sub.add_parser(
        "results",
        help="print results as JSON lines",
        description="Read PREFIX.results (every partition, no consumer group) and print each "
        "result as one JSON line.",
    )
    _add_connection_flags(p)
    p.add_argument("--follow", action="store_true", help="keep waiting for new results")
    p.add_argument("--count", type=int, help="stop after N results")
    p.add_argument("--from-end", action="store_true", help="only results produced from now on")
    p.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="without --follow, stop after this many seconds without a new result",
    )
    p.set_defaults(handler=lambda a, s: _run(_results(a, s)))

    p = sub.add_parser(
        "infer",
        help="send one request, wait for its result and print it as JSON",
        description="Send one request and print its result as one JSON line; exit 0 when the "
        "result is ok, 1 when it is an error result or no result came in time. Answers come "
        "on a reply topic of this command's own, deleted after (KVPIPE_REPLY_TOPIC: a shared "
        "one instead).",
    )
    _add_connection_flags(p)
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
    p.set_defaults(handler=lambda a, s: _run(_infer(a, s)))

    p = sub.add_parser(
        "generate",
        help="generate text from a transformer model, printed as it streams in",
        description="Send one generation request and print its text as the tokens arrive; "
        "a summary line (finish reason, usage, prefix-cache provenance, timings) goes to "
        "stderr. Exit 0 when the generation ended ok, 1 otherwise.",
    )
    _add_connection_flags(p)
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
    p.set_defaults(handler=lambda a, s: _run(_generate(a, s)))

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
    p.add_argument("--log-level", choices=_FLAGS["log_level"].choices)
    p.set_defaults(handler=cmd_demo)

    p = sub.add_parser(
        "train",
        help="online SGD that publishes and announces versions",
        description="Train a model online (SGD on PREFIX.training or a synthetic task) and "
        "publish and announce a new version every N steps or T seconds, until SIGTERM.",
    )
    _add_connection_flags(p)
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

    p = sub.add_parser(
        "versions",
        help="list a model's versions, the serving one marked *",
        description="List the versions of a model stored in Redis: creation time, size, "
        "expiry, and the one being served marked *.",
    )
    _add_connection_flags(p)
    p.add_argument("--model", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=lambda a, s: _run(_versions(a, s)))

    p = sub.add_parser(
        "rollback",
        help="serve an earlier version again and announce it",
        description="Move a model's version pointer back to an earlier version that is still "
        "stored, and announce it so the workers switch at once.",
    )
    _add_connection_flags(p)
    p.add_argument("--model", required=True)
    p.add_argument("--to", type=int, required=True, metavar="N", help="the version to serve")
    p.add_argument(
        "--retention", type=float, default=3600.0, help="seconds the replaced versions are kept"
    )
    p.set_defaults(handler=lambda a, s: _run(_rollback(a, s)))

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
    p.add_argument("--log-level", choices=_FLAGS["log_level"].choices)
    p.set_defaults(handler=cmd_bench)
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


if __name__ == "__main__":
    sys.exit(main())
