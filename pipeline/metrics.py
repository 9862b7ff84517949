"""Prometheus metrics of a worker, and the small HTTP server that exposes them.

Counters on the hot path are bumped once per batch; cache and queue figures are read from
the live objects when Prometheus scrapes, so serving pays nothing for them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter as Tally
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, Protocol

import structlog
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pipeline.resource import AsyncResource

log = structlog.get_logger("kvpipe.metrics")

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

#: Every metric name a worker exports (the dashboard test checks queries against it).
METRIC_NAMES = (
    "kvpipe_requests_total",
    "kvpipe_results_total",
    "kvpipe_dead_letters_total",
    "kvpipe_dedupe_skipped_total",
    "kvpipe_batch_rows",
    "kvpipe_request_seconds",
    "kvpipe_stage_seconds",
    "kvpipe_served_version",
    "kvpipe_consumer_lag",
    "kvpipe_in_flight",
    "kvpipe_assigned_partitions",
    "kvpipe_updates_applied_total",
    "kvpipe_consumer_restarts_total",
    "kvpipe_cache_hits_total",
    "kvpipe_cache_misses_total",
    "kvpipe_cache_loads_total",
    "kvpipe_cache_load_errors_total",
    "kvpipe_cache_evictions_total",
    "kvpipe_cache_stale_served_total",
    "kvpipe_cache_bytes",
    "kvpipe_cache_capacity_bytes",
    "kvpipe_cache_entries",
    "kvpipe_cache_hit_ratio",
    # the process and the Python runtime (prometheus_client's collectors, on Linux)
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_virtual_memory_bytes",
    "process_start_time_seconds",
    "process_open_fds",
    "process_max_fds",
    "python_info",
    "python_gc_objects_collected_total",
    "python_gc_objects_uncollectable_total",
    "python_gc_collections_total",
)


class CacheFigures(Protocol):
    """The cache counters a scrape reads (``pipeline.cache.CacheStats`` has them)."""

    @property
    def hits(self) -> int: ...
    @property
    def misses(self) -> int: ...
    @property
    def loads(self) -> int: ...
    @property
    def load_errors(self) -> int: ...
    @property
    def evictions(self) -> int: ...
    @property
    def stale_served(self) -> int: ...
    @property
    def bytes(self) -> int: ...
    @property
    def capacity_bytes(self) -> int: ...
    @property
    def entries(self) -> int: ...
    @property
    def hit_rate(self) -> float: ...


# The *_created series only double what a scrape needs. They are dropped from our exposition
# here, not with disable_created_metrics(), which flips a switch for the whole process.
class _WithoutCreated(Collector):
    """A registry's metrics without their ``*_created`` series."""

    _TYPES = ("counter", "histogram", "summary")

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        for metric in self._registry.collect():
            if metric.type in self._TYPES:
                created = metric.name + "_created"
                metric.samples = [s for s in metric.samples if s.name != created]
            yield metric


class _LiveCollector(Collector):
    """Reads cache stats and worker gauges at scrape time."""

    def __init__(self, read: Callable[[], dict[str, Any]]) -> None:
        self._read = read

    def collect(self) -> Iterable[Metric]:
        live = self._read()
        stats: CacheFigures | None = live.get("cache")
        if stats is not None:
            for name, value, text in (
                ("hits", stats.hits, "Cache lookups answered from memory"),
                ("misses", stats.misses, "Cache lookups that needed a load"),
                ("loads", stats.loads, "Values loaded from Redis"),
                ("load_errors", stats.load_errors, "Loads that failed"),
                ("evictions", stats.evictions, "Entries evicted for the byte budget"),
                ("stale_served", stats.stale_served, "Expired entries served, Redis down"),
            ):
                yield CounterMetricFamily(f"kvpipe_cache_{name}", text, value=value)
            yield GaugeMetricFamily("kvpipe_cache_bytes", "Bytes cached", value=stats.bytes)
            yield GaugeMetricFamily(
                "kvpipe_cache_capacity_bytes", "Cache budget in bytes", value=stats.capacity_bytes
            )
            yield GaugeMetricFamily("kvpipe_cache_entries", "Entries cached", value=stats.entries)
            yield GaugeMetricFamily(
                "kvpipe_cache_hit_ratio", "Hits over lookups so far", value=stats.hit_rate
            )
        for name, text in (
            ("in_flight", "Requests fetched and not yet answered"),
            ("assigned_partitions", "Request partitions this worker owns"),
        ):
            if name in live:
                yield GaugeMetricFamily(f"kvpipe_{name}", text, value=live[name])
        if "consumer_restarts" in live:
            yield CounterMetricFamily(
                "kvpipe_consumer_restarts",
                "Consumers the watchdog replaced (stuck behind, nothing fetched)",
                value=live["consumer_restarts"],
            )
        if "updates_applied" in live:
            yield CounterMetricFamily(
                "kvpipe_updates_applied", "Announcements applied", value=live["updates_applied"]
            )


MAX_MODEL_LABELS = 1000


class WorkerMetrics:
    """The metrics of one worker, in a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("kvpipe_requests", "Requests fetched from Kafka", registry=r)
        self.results = Counter(
            "kvpipe_results", "Results published", ["model", "status", "code"], registry=r
        )
        self.dead_letters = Counter("kvpipe_dead_letters", "Messages sent to the DLQ", registry=r)
        self.dedupe_skipped = Counter(
            "kvpipe_dedupe_skipped",
            "Redelivered requests skipped: their id was recorded as answered (KVPIPE_DEDUPE_TTL)",
            registry=r,
        )
        self.batch_rows = Histogram(
            "kvpipe_batch_rows", "Rows per computed micro-batch", buckets=BATCH_BUCKETS, registry=r
        )
        self.request_seconds = Histogram(
            "kvpipe_request_seconds",
            "Produced to answered, per request",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_seconds = Histogram(
            "kvpipe_stage_seconds",
            "Time per batch in a stage: queue, load, compute",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.served_version = Gauge(
            "kvpipe_served_version", "Version of the last batch", ["model"], registry=r
        )
        self.consumer_lag = Gauge(
            "kvpipe_consumer_lag", "Messages behind the partition end", ["partition"], registry=r
        )
        self.served_on: tuple[str, int] | None = None
        #: Model names that may be label values: ones answered ok here (so published), at
        #: most MAX_MODEL_LABELS; any other name a client sends is counted as "other".
        self._models: set[str] = set()
        self._live: Callable[[], dict[str, Any]] = dict
        r.register(_LiveCollector(lambda: self._live()))
        # CPU, memory, file descriptors, start time, the interpreter and its garbage
        # collector: in this registry, not prometheus_client's global one.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)

    def bind(self, live: Callable[[], dict[str, Any]]) -> None:
        """Where scrape-time figures come from (cache stats, in-flight, partitions)."""
        self._live = live

    def record_batch(
        self,
        model: str,
        version: int,
        rows: int,
        queue_s: float,
        load_s: float,
        compute_s: float,
    ) -> None:
        self.batch_rows.observe(rows)
        self.stage_seconds.labels("queue").observe(queue_s)
        self.stage_seconds.labels("load").observe(load_s)
        self.stage_seconds.labels("compute").observe(compute_s)
        self.served_version.labels(model).set(version)

    def record_results(
        self, outcomes: Tally[tuple[str, str, str]], totals_s: Iterable[float]
    ) -> None:
        models = self._models
        for (model, status, code), n in outcomes.items():
            if status == "ok" and model not in models and len(models) < MAX_MODEL_LABELS:
                models.add(model)
            self.results.labels(model if model in models else "other", status, code).inc(n)
        observe = self.request_seconds.observe
        for seconds in totals_s:
            observe(seconds)

    def forget_partition(self, partition: str) -> None:
        """Stop reporting lag for a partition this worker no longer owns."""
        with contextlib.suppress(KeyError):
            self.consumer_lag.remove(partition)

    def exposition(self) -> bytes:
        return generate_latest(_WithoutCreated(self.registry))


ReadyCheck = Callable[[], Awaitable[tuple[bool, str]]]


class StatusServer(AsyncResource):
    """``/metrics``, ``/healthz`` (the process answers) and ``/readyz`` (it can serve).

    ``render``, when given, makes the ``/metrics`` body instead of ``metrics`` (a supervisor
    aggregates its children's)."""

    def __init__(
        self,
        metrics: WorkerMetrics | None,
        ready: ReadyCheck,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        render: Callable[[], Awaitable[bytes]] | None = None,
    ) -> None:
        if metrics is None and render is None:
            raise ValueError("a status server needs metrics or a render function")
        self.metrics = metrics
        self.ready = ready
        self.render = render
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        if self.metrics is not None:
            self.metrics.served_on = (self.host, self.port)
        log.info("status_server_started", host=self.host, port=self.port)

    async def aclose(self) -> None:
        """Stop listening; safe to call twice."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 2.0)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
            parts = head.split(b" ", 2)
            path = parts[1].decode("latin-1") if len(parts) > 1 else "/"
            status, ctype, body = await self._route(path.split("?", 1)[0])
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}"
                "\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            TimeoutError,
            ConnectionError,
        ):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _route(self, path: str) -> tuple[str, str, bytes]:
        if path == "/metrics":
            if self.render is not None:
                body = await self.render()
            else:
                assert self.metrics is not None
                body = self.metrics.exposition()
            return "200 OK", "text/plain; version=0.0.4", body
        if path == "/healthz":
            return "200 OK", "text/plain", b"ok\n"
        if path == "/readyz":
            ok, why = await self.ready()
            status = "200 OK" if ok else "503 Service Unavailable"
            return status, "text/plain", (why + "\n").encode()
        return "404 Not Found", "text/plain", b"not found\n"


def iter_names(exposition: bytes) -> Iterator[str]:
    """Metric family names in a text exposition (for tests and the dashboard check)."""
    for line in exposition.decode().splitlines():
        if line.startswith("# TYPE "):
            yield line.split()[2]
