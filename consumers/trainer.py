"""The trainer process: online SGD that publishes versions and announces each publish.

``kvpipe train`` runs it. Examples come from PREFIX.training (JSON ``{"inputs": [...],
"target": [...]}`` for an MLP, ``{"ids": [user, item], "target": 0|1}`` for an embedding
scorer) or, with ``--synthetic``, from a seeded generator with a known target, so the loss
falls and the served model measurably improves.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
import structlog

from pipeline.config import Settings
from pipeline.errors import ConfigError, ModelNotFound
from pipeline.kafka import Consumer, Producer, ensure_topics
from pipeline.kv import open_kv
from pipeline.models import MLP, EmbeddingScorer, Model, build_model, preset
from pipeline.store import ParamStore
from pipeline.training import (
    EmbeddingTrainer,
    MLPTrainer,
    SyntheticClicks,
    SyntheticRegression,
)
from pipeline.updates import Announcement, announce

log = structlog.get_logger("kvpipe.trainer")


@dataclass(frozen=True, kw_only=True)
class TrainSettings:
    """What to train and how often to publish."""

    model: str
    preset: str | None = None
    synthetic: bool = True
    steps: int | None = None
    publish_every_steps: int = 100
    publish_every_s: float | None = None
    batch_size: int = 64
    lr: float | None = None
    seed: int = 0
    retention_s: float | None = 3600.0


@dataclass
class Publish:
    """One version the trainer published."""

    version: int
    step: int
    loss: float
    published_at: float
    seconds: float


@dataclass
class TrainReport:
    """What a training run did."""

    steps: int = 0
    publishes: list[Publish] = field(default_factory=list)
    last_loss: float = float("nan")


async def _load_or_init(
    store: ParamStore, cfg: TrainSettings
) -> tuple[Model, dict[str, Any], dict[str, Any] | None, bool]:
    """The model and its latest parameters from Redis, or a fresh seeded init."""
    try:
        version = await store.current_version(cfg.model)
    except ModelNotFound:
        if cfg.preset is None:
            raise ConfigError(
                f"model {cfg.model!r} is not published; pass --preset to start one"
            ) from None
        model = preset(cfg.preset)
        tables = model.init_tables(cfg.seed) if isinstance(model, EmbeddingScorer) else None
        return model, dict(model.init(cfg.seed)), tables, True
    manifest, params = await store.load(cfg.model, version)
    model = build_model(manifest.arch)
    tables = None
    if isinstance(model, EmbeddingScorer):
        tables = {}
        for name, (rows, width) in model.tables.items():
            found = await store.read_rows(cfg.model, name, range(rows), width)
            table = np.zeros((rows, width), dtype=np.float32)
            for i, row in found.items():
                table[i] = row
            tables[name] = table
    return model, {k: np.array(v) for k, v in params.items()}, tables, False


class _Examples:
    """Minibatches from the synthetic task or from the training topic."""

    def __init__(self, model: Model, cfg: TrainSettings, consumer: Consumer | None) -> None:
        self.cfg = cfg
        self.consumer = consumer
        self.task: SyntheticRegression | SyntheticClicks | None = None
        if cfg.synthetic:
            if isinstance(model, MLP):
                self.task = SyntheticRegression(model, seed=cfg.seed)
            elif isinstance(model, EmbeddingScorer):
                self.task = SyntheticClicks(model, seed=cfg.seed)
        self.skipped = 0

    async def next(self) -> tuple[Any, Any] | None:
        if self.task is not None:
            return self.task.batch(self.cfg.batch_size)
        assert self.consumer is not None
        messages = await self.consumer.getmany(timeout_ms=200, max_records=self.cfg.batch_size)
        xs, ys = [], []
        for m in messages:
            try:
                body = orjson.loads(m.value or b"")
                x = body["inputs"] if "inputs" in body else body["ids"]
                xs.append(np.asarray(x).reshape(-1))
                ys.append(np.asarray(body["target"], dtype=np.float32).reshape(-1))
            except (ValueError, KeyError, TypeError) as exc:
                self.skipped += 1
                log.warning("example_skipped", error=str(exc))
        if not xs:
            return None
        try:
            return np.stack(xs), np.stack(ys)
        except ValueError as exc:
            self.skipped += len(xs)
            log.warning("examples_skipped", error=str(exc), count=len(xs))
            return None


async def train(
    settings: Settings,
    cfg: TrainSettings,
    stop: asyncio.Event,
    *,
    on_publish: Callable[[Publish], None] | None = None,
) -> TrainReport:
    """Train until ``stop`` (or ``cfg.steps``), publishing and announcing as configured."""
    report = TrainReport()
    k = settings.kafka
    async with AsyncExitStack() as stack:
        kv = await stack.enter_async_context(open_kv(settings.redis))
        store = ParamStore(kv, prefix=settings.redis.key_prefix, retention_s=cfg.retention_s)
        await ensure_topics(k, [k.updates_topic, k.training_topic])
        producer = await stack.enter_async_context(Producer(k))
        consumer = None
        if not cfg.synthetic:
            consumer = await stack.enter_async_context(
                Consumer(k, [k.training_topic], group_id=f"{k.group_id}-trainer")
            )
        model, params, tables, fresh = await _load_or_init(store, cfg)
        examples = _Examples(model, cfg, consumer)
        trainer: MLPTrainer | EmbeddingTrainer
        if isinstance(model, MLP):
            trainer = MLPTrainer(model, params, lr=cfg.lr or 0.05)
        elif isinstance(model, EmbeddingScorer) and tables is not None:
            trainer = EmbeddingTrainer(model, tables, params["bias"], lr=cfg.lr or 0.5)
        else:
            raise ConfigError(f"cannot train a {model.arch.get('kind')!r} model")

        async def publish(first: bool) -> None:
            started = time.perf_counter()
            if isinstance(trainer, MLPTrainer):
                manifest = await store.publish(cfg.model, model.arch, trainer.params)
                await announce(producer, k, Announcement(cfg.model, "dense", manifest.version))
            else:
                updates = [] if first else trainer.take_updates()
                for update in updates:
                    await store.write_rows(
                        cfg.model, update.table, update.ids.tolist(), update.rows
                    )
                manifest = await store.publish(
                    cfg.model,
                    model.arch,
                    {"bias": trainer.bias},
                    tables=trainer.tables if first else None,
                )
                for update in updates:
                    await announce(
                        producer,
                        k,
                        Announcement(
                            cfg.model,
                            "embedding",
                            manifest.version,
                            update.table,
                            tuple(update.ids.tolist()),
                        ),
                    )
                if not updates:
                    await announce(
                        producer, k, Announcement(cfg.model, "embedding", manifest.version)
                    )
            pub = Publish(
                manifest.version,
                report.steps,
                report.last_loss,
                time.time(),
                time.perf_counter() - started,
            )
            report.publishes.append(pub)
            log.info(
                "version_published",
                model=cfg.model,
                version=pub.version,
                step=pub.step,
                loss=None if math.isnan(pub.loss) else round(pub.loss, 5),
                ms=round(pub.seconds * 1000, 1),
            )
            if on_publish is not None:
                on_publish(pub)

        if fresh:
            await publish(first=True)
        since = 0
        last_publish = time.monotonic()
        while not stop.is_set() and (cfg.steps is None or report.steps < cfg.steps):
            batch = await examples.next()
            if batch is None:
                continue
            report.last_loss = trainer.step(*batch)
            report.steps += 1
            since += 1
            due_time = (
                cfg.publish_every_s is not None
                and time.monotonic() - last_publish >= cfg.publish_every_s
            )
            if since >= cfg.publish_every_steps or due_time:
                await publish(first=False)
                since = 0
                last_publish = time.monotonic()
            else:
                await asyncio.sleep(0)
        if since:
            await publish(first=False)
    return report
