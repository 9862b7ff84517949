"""One micro-batch, from its model's parameters to its answers.

Resolve the (model, version) to one version's parameters (so a batch never mixes versions),
turn away the requests that do not fit the model, take what the result memo already knows,
compute the rest as one numpy call in a compute thread, and answer every request: ok, or an
error with its stable code (non-finite outputs included).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog

from pipeline.cache.cache import Source
from pipeline.errors import KvpipeError, RequestError
from pipeline.io.wire import CacheSource, Request, Result, Status, error_result, unknown_outputs
from pipeline.metrics import WorkerMetrics
from pipeline.params.models import Model, PluginModel
from pipeline.params.registry import ModelRegistry, Resolved, worst
from pipeline.serving.item import Item
from pipeline.serving.memo import MemoSplit, ResultMemo
from pipeline.serving.stats import WorkerStats
from pipeline.serving.tracing import BatchTrace, Tracing

log = structlog.get_logger("kvpipe.worker")

Answers = list[tuple[Item, Result]]
Reply = Callable[[Answers], Awaitable[None]]


def _stack(requests: list[Request]) -> npt.NDArray[Any]:
    arrays = [r.inputs for r in requests if r.inputs is not None]
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def input_problem(model: Model, request: Request) -> KvpipeError | None:
    """Why ``request`` cannot run on ``model`` (width, dtype, id range), or None."""
    if request.named is not None or (isinstance(model, PluginModel) and len(model.input_names) > 1):
        if not isinstance(model, PluginModel) or not model.input_names:
            return RequestError(
                'this model takes one unnamed input: send "inputs" as a list of rows',
                code="bad_request",
            )
        if request.named is None:
            return RequestError(
                f"this model's inputs are {', '.join(model.input_names)}: send them by name, "
                '"inputs": {"name": rows, ...}',
                code="bad_request",
            )
        try:
            request.inputs = model.pack_inputs(request.named)
        except RequestError as exc:
            return exc
        return None
    x = request.inputs
    assert x is not None
    if model.kind == "embedding":
        if x.dtype.kind not in "iu":
            return RequestError('this model scores integer ids: send "ids"', code="bad_dtype")
        why = model.check_ids(x)
        return None if why is None else RequestError(why, code="bad_ids")
    if x.shape[1] != model.input_dim:
        return RequestError(
            f"inputs have {x.shape[1]} columns; the model takes {model.input_dim}",
            code="bad_shape",
        )
    return None


def _forward(model: Model, params: Mapping[str, Any], x: Any) -> tuple[Any, bool]:
    """The model's outputs, and whether every one is finite (checked in the compute thread)."""
    with np.errstate(over="ignore", invalid="ignore"):  # non-finite outputs are answered
        y = model.forward(params, x)
    return y, bool(np.isfinite(y).all())


def _failure(
    resolved: Resolved, exc: Exception, *, requests: int, alone: bool = False
) -> KvpipeError:
    """The error a failed compute answers with: the model's own (with its stable code), or
    ``internal``; logged once per failure (a traceback only for a whole batch's)."""
    event = "compute_failed_alone" if alone else "compute_failed"
    if isinstance(exc, KvpipeError):  # the model said why, with a stable code
        log.warning(
            event,
            model=resolved.name,
            version=resolved.version,
            code=exc.code,
            error=str(exc),
            requests=requests,
        )
        return exc
    if alone:
        log.warning(event, model=resolved.name, version=resolved.version, error=repr(exc))
    else:
        log.exception(event, model=resolved.name, version=resolved.version, requests=requests)
    return KvpipeError(f"compute failed: {type(exc).__name__}: {exc}")


@dataclass(slots=True)
class _Run:
    """One batch in progress: what it runs on, when its stages began, its answers so far."""

    resolved: Resolved
    params: Mapping[str, Any]
    source: Source
    started: float  # perf_counter at the start
    started_wall: float  # epoch ms at the start
    loaded: float = 0.0  # perf_counter when the parameters were in hand
    answers: Answers = field(default_factory=list)
    trace: BatchTrace | None = None  # its stage times, for spans

    @property
    def cache_source(self) -> CacheSource:
        return CacheSource(self.source.value)

    @property
    def stale(self) -> bool:
        return self.source is Source.STALE

    def load_ms(self) -> float:
        return round((self.loaded - self.started) * 1000, 3)


class BatchRunner:
    """Runs batches for one worker; ``executor`` (set when the worker starts) computes."""

    def __init__(
        self,
        registry: ModelRegistry,
        reply: Reply,
        stats: WorkerStats,
        *,
        worker_id: str,
        memo: ResultMemo | None = None,
        metrics: WorkerMetrics | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.registry = registry
        self.tracing = tracing or Tracing.off()
        self._reply = reply
        self.stats = stats
        self.worker_id = worker_id
        self.memo = memo
        self.metrics = metrics
        self.executor: Executor | None = None
        self._corrupt_logged: set[tuple[str, str]] = set()

    async def prefetch(self, model: str, version: int | None) -> None:
        """While a batch fills, load what it will need (single-flight: the batch joins it)."""
        with contextlib.suppress(KvpipeError):  # the batch meets the same error, answers it
            await self.registry.resolve(model, version)

    async def run(self, model: str, version: int | None, items: list[Item]) -> None:
        """Answer every item of one batch."""
        started, started_wall = time.perf_counter(), time.time() * 1000
        batch_trace = self.tracing.batch(model)
        refused: Answers = []
        try:
            resolved = await self.registry.resolve(model, version)
            if resolved.source is not Source.HIT:
                self.stats.batches_waited_on_load += 1
            good = self._admit(resolved, items, refused)
            run = _Run(resolved, resolved.params, resolved.source, started, started_wall)
            if good and resolved.model.kind == "embedding":
                ids = _stack([it.request for it in good])
                rows, rows_source = await self.registry.rows(resolved, ids)
                run.params = {**run.params, **rows}
                run.source = worst([run.source, rows_source])
        except KvpipeError as exc:
            self._log_params_failure(model, version, exc, len(items))
            answered = {id(it) for it, _ in refused}
            refused += [
                (it, error_result(it.request, exc, worker=self.worker_id))
                for it in items
                if id(it) not in answered
            ]
            batch_trace.end(refused, exc)
            await self._reply(refused)
            return
        run.loaded = time.perf_counter()
        run.trace = batch_trace
        batch_trace.loaded()
        run.answers = refused
        memo_timings = {"load_ms": run.load_ms(), "compute_ms": 0.0}
        memo = await self.memo.split(resolved, good) if self.memo is not None else None
        try:
            if memo is not None:
                good = memo.misses
                hits = self._results(run, memo.hits, CacheSource.MEMO, memo_timings, stale=False)
                run.answers += hits
            await self._compute_batch(run, good, memo, memo_timings)
        finally:
            if memo is not None and self.memo is not None:
                self.memo.release(memo)
        if memo is not None and memo.borrowed and self.memo is not None:
            borrowed = await self.memo.borrowed(memo)
            run.answers += self._results(run, borrowed, CacheSource.MEMO, memo_timings, stale=False)
        for _, res in run.answers:
            if res.version is None:
                res.version = resolved.version
        batch_trace.end(run.answers)
        await self._reply(run.answers)

    async def _compute_batch(
        self, run: _Run, good: list[Item], memo: MemoSplit | None, memo_timings: dict[str, float]
    ) -> None:
        """Compute ``good`` as one batch; add its answers (and its in-batch repeats')."""
        if not good:
            return
        resolved = run.resolved
        requests = [it.request for it in good]
        try:
            outputs = await self._compute(resolved.model, run.params, requests)
        except Exception as exc:
            failure = _failure(resolved, exc, requests=len(requests))
            if len(requests) == 1:
                failed = good + ([it for it, _ in memo.repeats] if memo is not None else [])
                run.answers += [
                    (it, error_result(it.request, failure, worker=self.worker_id)) for it in failed
                ]
                return
            # One request's data can fail a whole batch (an index out of a graph's range): each
            # is computed alone, so only the requests that fail are answered with an error.
            outputs = [await self._alone(resolved, run.params, r) for r in requests]
        computed = time.perf_counter()
        if run.trace is not None:
            run.trace.computed()
        n_rows = sum(it.request.rows for it in good)
        self.stats.batches += 1
        self.stats.batched_rows += n_rows
        if self.metrics is not None:
            queue_s = max(0.0, run.started_wall - good[0].message.timestamp_ms) / 1000
            self.metrics.record_batch(
                resolved.name,
                resolved.version,
                n_rows,
                queue_s,
                run.loaded - run.started,
                computed - run.loaded,
            )
        if memo is not None and self.memo is not None:
            self.memo.keep(memo, outputs)
            repeats = [(it, outputs[j]) for it, j in memo.repeats]
            memo_source, stale = CacheSource.MEMO, run.stale
            run.answers += self._results(run, repeats, memo_source, memo_timings, stale=stale)
        timings = {"load_ms": run.load_ms(), "compute_ms": round((computed - run.loaded) * 1000, 3)}
        pairs = list(zip(good, outputs, strict=True))
        run.answers += self._results(run, pairs, run.cache_source, timings, stale=run.stale)

    async def _alone(self, resolved: Resolved, params: Mapping[str, Any], request: Request) -> Any:
        """One request's outputs computed alone, or the error it fails with."""
        try:
            return (await self._compute(resolved.model, params, [request]))[0]
        except Exception as exc:
            return _failure(resolved, exc, requests=1, alone=True)

    def _results(
        self,
        run: _Run,
        pairs: list[tuple[Item, Any]],
        cache: CacheSource,
        timings: dict[str, float],
        *,
        stale: bool,
    ) -> Answers:
        """Results for (item, outputs) pairs, with queue and total times per request; an
        output that is an error (non-finite) answers as that error."""
        done_wall = time.time() * 1000
        version = run.resolved.version
        model = run.resolved.model
        split = model.named_outputs if isinstance(model, PluginModel) else None
        out: Answers = []
        for it, outputs in pairs:
            if isinstance(outputs, KvpipeError):
                bad = error_result(it.request, outputs, worker=self.worker_id)
                bad.version = version
                out.append((it, bad))
                continue
            sent = it.message.timestamp_ms
            result = Result(
                id=it.request.id,
                model=it.request.model,
                status=Status.OK,
                version=version,
                outputs=outputs,
                cache=cache,
                stale=stale,
                worker=self.worker_id,
                timings={
                    "queue_ms": round(max(0.0, run.started_wall - sent), 3),
                    **timings,
                    "total_ms": round(max(0.0, done_wall - sent), 3),
                },
            )
            if split is not None:
                result.named = split(outputs)
            missing = unknown_outputs(it.request, result)
            if missing is not None:  # a V2 request asked for an output the model lacks
                result = error_result(it.request, missing, worker=self.worker_id)
                result.version = version
            out.append((it, result))
        return out

    def _admit(self, resolved: Resolved, items: list[Item], refused: Answers) -> list[Item]:
        """The items this model can run; the others get their error result in ``refused``."""
        good: list[Item] = []
        for it in items:
            problem = input_problem(resolved.model, it.request)
            if problem is None:
                good.append(it)
            else:
                refused.append((it, error_result(it.request, problem, worker=self.worker_id)))
        return good

    async def _compute(
        self, model: Model, params: Mapping[str, Any], requests: list[Request]
    ) -> list[Any]:
        """Outputs per request (an error in place of one that is not finite)."""
        x = _stack(requests)
        want = model.packed_dtype if isinstance(model, PluginModel) else np.float32
        if model.kind == "dense" and x.dtype != want:
            x = x.astype(want)
        loop = asyncio.get_running_loop()
        y, finite = await loop.run_in_executor(self.executor, _forward, model, params, x)
        bounds = np.cumsum([r.rows for r in requests])[:-1]
        outputs: list[Any] = np.split(y, bounds)
        if not finite:
            for i, out in enumerate(outputs):
                if not np.isfinite(out).all():
                    outputs[i] = KvpipeError(
                        "the model's output is NaN or infinite for these inputs",
                        code="non_finite_output",
                    )
        return outputs

    def _log_params_failure(
        self, model: str, version: int | None, exc: KvpipeError, requests: int
    ) -> None:
        """A warning per failed batch, except corrupt parameters: once per message."""
        if exc.code == "params_corrupt":
            key = (model, str(exc))
            if key in self._corrupt_logged:
                return
            if len(self._corrupt_logged) >= 1000:  # bounded: start over, each logged once more
                self._corrupt_logged.clear()
            self._corrupt_logged.add(key)
            log.error("params_corrupt", model=model, version=version, error=str(exc))
            return
        # a model nobody published is the client's mistake, answered in its results
        level = log.debug if exc.code in ("unknown_model", "unknown_version") else log.warning
        level(
            "params_failed",
            model=model,
            version=version,
            code=exc.code,
            error=str(exc),
            requests=requests,
        )
