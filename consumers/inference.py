"""The inference worker process: requests in, results out, parameters through the cache.

``kvpipe serve`` runs it; so does ``python -m consumers.inference`` (settings from env).
SIGTERM or SIGINT: stop fetching, answer what is in flight, commit, exit 0.

With ``KVPIPE_PROCESSES`` above 1 (``--processes N|auto``) this process is the supervisor of N
such workers (:mod:`pipeline.serving.supervisor`), each started as ``python -m
consumers.inference --child I --port-file PATH``; the supervisor's status server answers for
all of them (:mod:`pipeline.serving.fleet`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import structlog

from consumers.updates import start_listener
from pipeline.cache.cache import ENTRY_OVERHEAD_BYTES, ParamCache
from pipeline.config import Settings, settings_from_env, settings_to_env
from pipeline.errors import ConfigError, KvpipeError
from pipeline.io.kafka import Producer, ensure_topics
from pipeline.io.kv import KeyValue, open_kv
from pipeline.logging import configure_logging
from pipeline.metrics import ReadyCheck, StatusServer, WorkerMetrics
from pipeline.params.plugins import load_model_plugins
from pipeline.params.registry import ModelRegistry
from pipeline.params.store import ParamStore
from pipeline.serving.dedupe import Dedupe
from pipeline.serving.fleet import IDLE_REASON, FleetStatus
from pipeline.serving.supervisor import Supervisor
from pipeline.serving.tracing import Tracing, configure_tracing
from pipeline.serving.worker import Worker, WorkerStats, default_worker_id, tune_gc

log = structlog.get_logger("kvpipe.inference")


async def serve(
    settings: Settings,
    stop: asyncio.Event,
    *,
    on_ready: Callable[[Worker], None] | None = None,
    port_file: Path | None = None,
    tracing: Tracing | None = None,
) -> WorkerStats:
    """Run one worker until ``stop`` is set; returns its counters after the drain.
    ``port_file``: where the status server's port is written (for a supervisor); ``tracing``:
    the worker's tracing hooks (default: from the settings, on the global tracer provider)."""
    async with AsyncExitStack() as stack:
        kv = await stack.enter_async_context(open_kv(settings.redis))
        store = ParamStore(
            kv,
            prefix=settings.redis.key_prefix,
            emb_partitions=settings.redis.emb_partitions,
        )
        cache: ParamCache[object] = await stack.enter_async_context(
            ParamCache(
                capacity_bytes=settings.cache.capacity_bytes,
                ttl_s=settings.cache.ttl_s,
                policy=settings.cache.policy,
                jitter=0.1,
                refresh_ahead=0.2,
                entry_overhead_bytes=ENTRY_OVERHEAD_BYTES,
            )
        )
        registry = ModelRegistry(store, cache, version_ttl_s=settings.cache.version_ttl_s)
        k = settings.kafka
        await ensure_topics(k, [k.requests_topic, k.results_topic, k.dlq_topic, k.updates_topic])
        producer = await stack.enter_async_context(
            Producer(k, send_timeout_s=settings.worker.send_timeout_s)
        )
        listener = await start_listener(stack, settings, registry, stop)
        metrics = WorkerMetrics() if settings.worker.metrics_port is not None else None
        dedupe = None
        if settings.worker.dedupe_ttl_s > 0:
            # connections of its own: its records never hold up a parameter load, and back
            dedupe_kv = await stack.enter_async_context(open_kv(settings.redis))
            dedupe = Dedupe(
                dedupe_kv,
                key_prefix=settings.redis.key_prefix,
                topic=k.requests_topic,
                group=k.group_id,
                ttl_s=settings.worker.dedupe_ttl_s,
                timeout_s=settings.redis.timeout_s,
            )
        worker = await stack.enter_async_context(
            Worker(
                settings,
                registry=registry,
                producer=producer,
                listener=listener,
                metrics=metrics,
                dedupe=dedupe,
                tracing=tracing,
            )
        )
        if metrics is not None:
            assert settings.worker.metrics_port is not None
            server = await stack.enter_async_context(
                StatusServer(
                    metrics,
                    _ready_check(worker, kv),
                    host=settings.worker.metrics_host,
                    port=settings.worker.metrics_port,
                )
            )
            if port_file is not None:
                _write_port(port_file, server.port)
        structlog.contextvars.bind_contextvars(worker=worker.worker_id)
        if on_ready is not None:
            on_ready(worker)
        await worker.run(stop)
        return worker.stats


async def start_serving(
    settings: Settings,
    stop: asyncio.Event,
    *,
    timeout_s: float = 60.0,
    tracing: Tracing | None = None,
) -> tuple[Worker, asyncio.Task[WorkerStats]]:
    """Run :func:`serve` as a task; return once its worker owns partitions.

    Raises what stopped the worker if it stops first, and stops it if it is not ready in
    time. Setting ``stop`` and awaiting the task drains it.
    """
    ready: asyncio.Future[Worker] = asyncio.get_running_loop().create_future()

    def on_ready(worker: Worker) -> None:
        if not ready.done():
            ready.set_result(worker)

    task = asyncio.create_task(serve(settings, stop, on_ready=on_ready, tracing=tracing))
    try:
        worker = await _before(ready, task, timeout_s)
        await _before(worker.assigned.wait(), task, timeout_s)
    except BaseException:
        stop.set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise
    return worker, task


async def _before(step: Awaitable[Any], task: asyncio.Task[Any], timeout_s: float) -> Any:
    """``step``'s result, unless ``task`` ends first (its error is raised) or time runs out."""
    waiter = asyncio.ensure_future(step)
    done, _ = await asyncio.wait(
        {waiter, task}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
    )
    if waiter in done:
        return waiter.result()
    waiter.cancel()
    if task in done:
        task.result()
        raise KvpipeError("the worker stopped before it was ready")
    raise KvpipeError(f"the worker was not ready within {timeout_s:g} s")


def _ready_check(worker: Worker, kv: KeyValue) -> ReadyCheck:
    """Ready: the consumer owns partitions and Redis answers a PING."""

    async def check() -> tuple[bool, str]:
        if not worker.assigned.is_set():
            return False, f"{IDLE_REASON} yet"
        try:
            await asyncio.wait_for(kv.ping(), 2.0)
        except (KvpipeError, TimeoutError) as exc:
            return False, f"redis unreachable: {exc}"
        return True, "ready"

    return check


def install_stop_signals(stop: asyncio.Event) -> None:
    """SIGTERM and SIGINT set ``stop`` (a second signal exits at once)."""
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("second_signal_exit", signal=signum)
            os._exit(1)
        log.info("stop_requested", signal=signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)


def _write_port(path: Path, port: int) -> None:
    """Write ``port`` to ``path`` whole (a reader never sees half of it)."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(f"{port}\n")
    partial.replace(path)


def child_env(settings: Settings, index: int, worker_id: str) -> dict[str, str]:
    """Child ``index``'s environment: ours without ``KVPIPE_*``, then the settings' with one
    process, its own worker id and, when metrics are on, a loopback status port of its own."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("KVPIPE_")},
        **settings_to_env(settings),
        "KVPIPE_PROCESSES": "1",
        "KVPIPE_WORKER_ID": f"{worker_id}-{index}",
    }
    if settings.worker.metrics_port is not None:
        env.update(KVPIPE_METRICS_PORT="0", KVPIPE_METRICS_HOST="127.0.0.1")
    return env


async def supervise(settings: Settings, stop: asyncio.Event) -> int:
    """Run ``settings.worker.processes`` workers under one supervisor until ``stop``; its
    status server (when metrics are on) answers for all of them."""
    worker_id = settings.worker.worker_id or default_worker_id()
    async with AsyncExitStack() as stack:
        supervisor = await stack.enter_async_context(
            Supervisor(
                [sys.executable, "-m", "consumers.inference"],
                processes=settings.worker.processes,
                env=lambda i: child_env(settings, i, worker_id),
                stop_timeout_s=settings.worker.shutdown_timeout_s + 10.0,
            )
        )
        if settings.worker.metrics_port is not None:
            fleet = FleetStatus(supervisor.slots)
            await stack.enter_async_context(
                StatusServer(
                    None,
                    fleet.ready,
                    host=settings.worker.metrics_host,
                    port=settings.worker.metrics_port,
                    render=fleet.render,
                )
            )
        return await supervisor.run(stop)


async def run_until_signalled(settings: Settings, *, port_file: Path | None = None) -> int:
    """Serve until SIGTERM or SIGINT, as a process of its own (model plugins loaded, its
    garbage collector tuned), or supervise ``settings.worker.processes`` such processes.
    Returns the exit status."""
    stop = asyncio.Event()
    install_stop_signals(stop)
    if settings.worker.processes > 1:
        return await supervise(settings, stop)
    load_model_plugins(settings.model_plugins)
    tune_gc()
    configure_tracing(settings.tracing)
    await serve(settings, stop, port_file=port_file)
    return 0


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    """A supervisor's child gets ``--child I --port-file PATH``; nobody else passes any."""
    parser = argparse.ArgumentParser(prog="python -m consumers.inference")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port-file", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(settings: Settings | None = None, argv: Sequence[str] | None = None) -> int:
    """Entry point: 0 after a clean drain; with one line on stderr, 2 for settings it cannot
    use and 1 for a failure at run time (the exit statuses of ``kvpipe``)."""
    args = _arguments(argv)
    try:
        settings = settings or settings_from_env(os.environ)
        configure_logging(fmt=settings.log_format, level=settings.log_level)
        if args.child is not None:  # every line this child logs says which child it is
            structlog.contextvars.bind_contextvars(child=args.child, pid=os.getpid())
        return asyncio.run(run_until_signalled(settings, port_file=args.port_file))
    except ConfigError as exc:
        print(f"kvpipe serve: {exc}", file=sys.stderr)
        return 2
    except KvpipeError as exc:
        print(f"kvpipe serve: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
