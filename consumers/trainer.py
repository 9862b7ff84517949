"""The trainer process: online SGD that publishes versions and announces each publish.

``kvpipe train`` runs it. Examples come from PREFIX.training (JSON ``{"inputs": [...],
"target": [...]}`` for an MLP, ``{"ids": [user, item], "target": 0|1}`` for an embedding
scorer) or, with ``--synthetic``, from a seeded generator with a known target, so the loss
falls and the served model measurably improves.

Nothing on the topic stops it: each example is validated whole before it joins a batch (bad
ones are skipped and counted by reason), a step that makes a weight non-finite is undone, and
a publish of non-finite weights is refused (back to the last published weights).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog

from pipeline.config import Settings
from pipeline.errors import ConfigError, ModelNotFound
from pipeline.io.kafka import Consumer, Message, Producer, ensure_topics
from pipeline.io.kv import open_kv
from pipeline.params.models import MLP, EmbeddingScorer, Model, build_model, preset
from pipeline.params.store import ParamStore
from pipeline.params.training import (
    BadExample,
    Diverged,
    EmbeddingTrainer,
    MLPTrainer,
    SyntheticClicks,
    SyntheticRegression,
    parse_example,
)
from pipeline.params.updates import Announcement, announce

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
    #: examples from the topic skipped, by reason (``BadExample`` codes, ``internal_error``)
    skipped: Counter[str] = field(default_factory=Counter)
    #: steps undone because the loss or a weight went non-finite
    diverged: int = 0
    #: steps that raised something unexpected (logged, undone, survived)
    failed_steps: int = 0
    #: publishes refused because a weight to publish was non-finite
    refused: int = 0


#: Seconds between two summary lines of a repeated warning (the first of each reason is
#: logged in full at once).
LOG_EVERY_S = 10.0
#: Characters of a bad message quoted in the log, at most (bytes shown as ``\xNN``).
PREVIEW_BYTES = 80


class _Tally:
    """Counts a warning by reason: the first of each reason is logged in full, the rest as
    one summary line per ``interval_s`` (and at :meth:`flush`), so junk never floods the log."""

    def __init__(
        self,
        counts: Counter[str],
        event: str,
        summary: str,
        *,
        interval_s: float = LOG_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.counts = counts
        self.event, self.summary = event, summary
        self.interval_s = interval_s
        self.clock = clock
        self.pending: Counter[str] = Counter()
        self.last = clock()

    def add(self, reason: str, **fields: Any) -> None:
        self.counts[reason] += 1
        if self.counts[reason] == 1:
            log.warning(self.event, reason=reason, **fields)
        else:
            self.pending[reason] += 1
        if self.pending and self.clock() - self.last >= self.interval_s:
            self.flush()

    def flush(self) -> None:
        """Log what was counted and not yet logged, in one line."""
        if self.pending:
            log.warning(self.summary, counts=dict(self.pending), total=sum(self.counts.values()))
            self.pending.clear()
        self.last = self.clock()


def _preview(raw: bytes | None) -> str | None:
    """The start of a message for the log, never all of it."""
    if raw is None:
        return None
    text = raw[:PREVIEW_BYTES].decode("utf-8", "backslashreplace")
    cut = len(text) > PREVIEW_BYTES or len(raw) > PREVIEW_BYTES
    return text[:PREVIEW_BYTES] + "..." if cut else text


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
    loaded = [*params.values(), *(tables or {}).values()]
    if not all(np.isfinite(np.asarray(a, dtype=np.float64)).all() for a in loaded):
        raise ConfigError(
            f"model {cfg.model!r} v{version} holds non-finite weights; "
            "roll it back to a finite version (kvpipe rollback) before training it"
        )
    return model, {k: np.array(v) for k, v in params.items()}, tables, False


class _Examples:
    """Minibatches from the synthetic task or from the training topic."""

    def __init__(
        self,
        model: Model,
        cfg: TrainSettings,
        consumer: Consumer | None,
        *,
        skipped: Counter[str] | None = None,
    ) -> None:
        if not isinstance(model, MLP | EmbeddingScorer):
            raise ConfigError(f"cannot train a {model.arch.get('kind')!r} model")
        self.model = model
        self.cfg = cfg
        self.consumer = consumer
        self.task: SyntheticRegression | SyntheticClicks | None = None
        if cfg.synthetic:
            if isinstance(model, MLP):
                self.task = SyntheticRegression(model, seed=cfg.seed)
            else:
                self.task = SyntheticClicks(model, seed=cfg.seed)
        #: examples skipped, by reason (the report's counter when ``skipped`` is given)
        self.skipped: Counter[str] = Counter() if skipped is None else skipped
        self.tally = _Tally(self.skipped, "example_skipped", "examples_skipped")

    async def next(self) -> tuple[Any, Any] | None:
        """A minibatch of valid examples only, or None when none came."""
        if self.task is not None:
            return self.task.batch(self.cfg.batch_size)
        assert self.consumer is not None
        messages = await self.consumer.getmany(timeout_ms=200, max_records=self.cfg.batch_size)
        xs, ys = [], []
        for m in messages:
            try:
                x, y = parse_example(m.value, self.model)
            except BadExample as exc:
                self._skip(exc.code, str(exc), m)
                continue
            except Exception as exc:
                self._skip("internal_error", f"{type(exc).__name__}: {exc}", m)
                continue
            xs.append(x)
            ys.append(y)
        if not xs:
            return None
        return np.stack(xs), np.stack(ys)

    def _skip(self, reason: str, detail: str, m: Message) -> None:
        self.tally.add(
            reason,
            detail=detail[:200],
            partition=str(m.partition),
            offset=m.offset,
            bytes=None if m.value is None else len(m.value),
            preview=_preview(m.value),
        )


class TrainingRun:
    """One trainer's state: guarded SGD steps and checked publishes, each announced.

    ``send`` announces one publish (on PREFIX.updates in :func:`train`); a publish whose
    weights are not all finite is refused and the trainer goes back to the last published
    weights, and a step that diverges is undone the same way, so training goes on.
    """

    def __init__(
        self,
        cfg: TrainSettings,
        model: Model,
        trainer: MLPTrainer | EmbeddingTrainer,
        store: ParamStore,
        send: Callable[[Announcement], Awaitable[None]],
        *,
        report: TrainReport | None = None,
        on_publish: Callable[[Publish], None] | None = None,
    ) -> None:
        self.cfg, self.model, self.trainer, self.store = cfg, model, trainer, store
        self.send = send
        self.report = TrainReport() if report is None else report
        self.on_publish = on_publish
        self._bad_steps: Counter[str] = Counter()
        self.tally = _Tally(self._bad_steps, "step_undone", "steps_undone")

    def step(self, x: Any, y: Any) -> bool:
        """One SGD step; False (logged, counted, weights at the last publish) if undone."""
        try:
            loss = self.trainer.step(x, y)
        except Diverged as exc:
            self.report.diverged += 1
            self.tally.add("non_finite_step", step=self.report.steps, error=str(exc))
            return False
        except Exception as exc:
            self.trainer.restore()
            self.report.failed_steps += 1
            self.tally.add(
                "internal_error", step=self.report.steps, error=f"{type(exc).__name__}: {exc}"
            )
            return False
        self.report.last_loss = loss
        self.report.steps += 1
        return True

    def _finite(self, first: bool) -> bool:
        if isinstance(self.trainer, EmbeddingTrainer):
            return self.trainer.finite(whole=first)
        return self.trainer.finite()

    async def publish(self, *, first: bool = False) -> Publish | None:
        """Publish and announce the weights; None (refused, logged) if any is non-finite."""
        cfg, model, trainer, report = self.cfg, self.model, self.trainer, self.report
        if not self._finite(first):
            report.refused += 1
            trainer.restore()
            log.error(
                "publish_refused",
                model=cfg.model,
                reason="non_finite_weights",
                step=report.steps,
                last_version=report.publishes[-1].version if report.publishes else None,
                refused=report.refused,
            )
            return None
        trainer.checkpoint()
        started = time.perf_counter()
        if isinstance(trainer, MLPTrainer):
            manifest = await self.store.publish(cfg.model, model.arch, trainer.params)
            if manifest.is_current:  # else a newer publish won: never announce an older one
                await self.send(Announcement(cfg.model, "dense", manifest.version))
        else:
            updates = [] if first else trainer.take_updates()
            for update in updates:
                await self.store.write_rows(
                    cfg.model, update.table, update.ids.tolist(), update.rows
                )
            manifest = await self.store.publish(
                cfg.model,
                model.arch,
                {"bias": trainer.bias},
                tables=trainer.tables if first else None,
            )
            for update in updates:
                await self.send(
                    Announcement(
                        cfg.model,
                        "embedding",
                        manifest.current,  # the serving version (a newer publish may have won)
                        update.table,
                        tuple(update.ids.tolist()),
                    )
                )
            if not updates:
                await self.send(Announcement(cfg.model, "embedding", manifest.current))
        if not manifest.is_current:
            log.warning(
                "version_not_current",
                model=cfg.model,
                version=manifest.version,
                current=manifest.current,
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
        if self.on_publish is not None:
            self.on_publish(pub)
        return pub


def make_trainer(
    model: Model,
    params: dict[str, Any],
    tables: dict[str, Any] | None,
    cfg: TrainSettings,
) -> MLPTrainer | EmbeddingTrainer:
    """The SGD trainer for ``model`` (ConfigError for a kind it cannot train)."""
    if isinstance(model, MLP):
        return MLPTrainer(model, params, lr=cfg.lr or 0.05)
    if isinstance(model, EmbeddingScorer) and tables is not None:
        return EmbeddingTrainer(model, tables, params["bias"], lr=cfg.lr or 0.5)
    raise ConfigError(f"cannot train a {model.arch.get('kind')!r} model")


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
        store = ParamStore(
            kv,
            prefix=settings.redis.key_prefix,
            emb_partitions=settings.redis.emb_partitions,
            retention_s=cfg.retention_s,
        )
        await ensure_topics(k, [k.updates_topic, k.training_topic])
        producer = await stack.enter_async_context(Producer(k))
        consumer = None
        if not cfg.synthetic:
            consumer = await stack.enter_async_context(
                Consumer(k, [k.training_topic], group_id=f"{k.group_id}-trainer")
            )
        model, params, tables, fresh = await _load_or_init(store, cfg)
        trainer = make_trainer(model, params, tables, cfg)
        examples = _Examples(model, cfg, consumer, skipped=report.skipped)

        async def send(a: Announcement) -> None:
            await announce(producer, k, a)

        run = TrainingRun(cfg, model, trainer, store, send, report=report, on_publish=on_publish)
        if fresh:
            await run.publish(first=True)
        since = 0
        last_publish = time.monotonic()
        while not stop.is_set() and (cfg.steps is None or report.steps < cfg.steps):
            batch = await examples.next()
            if batch is None or not run.step(*batch):
                await asyncio.sleep(0)  # a synthetic run that keeps diverging still sees stop
                continue
            since += 1
            due_time = (
                cfg.publish_every_s is not None
                and time.monotonic() - last_publish >= cfg.publish_every_s
            )
            if since >= cfg.publish_every_steps or due_time:
                await run.publish()
                since = 0
                last_publish = time.monotonic()
            else:
                await asyncio.sleep(0)
        if since:
            await run.publish()
        examples.tally.flush()
        run.tally.flush()
        log.info(
            "training_stopped",
            model=cfg.model,
            steps=report.steps,
            published=len(report.publishes),
            skipped=dict(report.skipped),
            diverged=report.diverged,
            failed_steps=report.failed_steps,
            refused=report.refused,
        )
    return report
