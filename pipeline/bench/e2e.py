"""``kvpipe bench e2e``: open-loop latency and throughput of a worker process beside a bare echo.

Both run as processes of their own on the same local services: a worker (``python -m
consumers.inference``) serving the small MLP with a warm cache, and the bare consume -> produce
echo (``python -m pipeline.bench.echo``). This process is the load generator: for each offered rate
it sends requests on a fixed schedule (:mod:`pipeline.bench.loadgen`; it never waits for answers)
and reads the answers back, timing each from its send to its arrival on one monotonic clock.
Rates alternate the order of the sides (worker, echo / echo, worker, ...). After the sweep,
both sides run once more at half the worker's highest throughput: the latency goal is read
there. Every answer is checked (the worker's against numpy, the echo's byte for byte); a rate
with a wrong or missing answer has no figure.

With ``--processes N`` a third side joins the sweep: ``kvpipe serve --processes N`` (a
supervisor and N worker processes), warmed until every child answered; its max throughput is
set against the one-process worker's.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.bench.echo import echo_topic
from pipeline.bench.figures import MODEL, check_answer
from pipeline.bench.harness import prepare_side
from pipeline.bench.loadgen import SendLog, percentiles, run_open_loop, schedule
from pipeline.config import KafkaSettings, Settings
from pipeline.dev.procs import Children, child_env
from pipeline.errors import KvpipeError, UnreadableMessage
from pipeline.io.kafka import Consumer, Message, Producer
from pipeline.io.wire import JSON, decode_result, encode_request
from pipeline.params.models import preset
from pipeline.resource import AsyncResource

DEFAULT_RATES = (1000.0, 2000.0, 4000.0, 8000.0, 12000.0, 16000.0, 24000.0, 32000.0)
DEFAULT_DURATION_S = 4.0
LATENCY_GOAL = 3.0  # p99 of the worker at half its max throughput / p99 of the echo there
THROUGHPUT_GOAL = 0.5  # max throughput of the worker / max throughput of the echo
POOL_ROWS = 1000  # distinct input rows; request i carries row i % POOL_ROWS
WARMUP = 200
SATURATED_SHARE = 0.9  # answers/s below this share of the offered rate: the side is saturated
PROCS = "procs"  # the side of kvpipe serve --processes N

Array = npt.NDArray[np.float32]
Emit = Callable[[str], None]
Encoded = tuple[bytes, list[tuple[str, bytes]]]


# -- reading answers -----------------------------------------------------------------------------


class Reader(AsyncResource):
    """Reads a topic from its start in the background; notes when each distinct key arrived."""

    def __init__(self, kafka: KafkaSettings, topic: str) -> None:
        # A short fetch wait: the measuring side should add as little delay as it can.
        self._consumer = Consumer(
            kafka, [topic], group_id=None, assign_from="start", fetch_max_wait_ms=5
        )
        self.arrived: dict[bytes, tuple[float, Message]] = {}
        self.duplicates = 0
        self._want: set[bytes] = set()
        self._done = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._consumer.start()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            messages = await self._consumer.getmany(timeout_ms=100, max_records=10000)
            now = time.perf_counter()
            for m in messages:
                key = m.key or b""
                if key in self.arrived:
                    self.duplicates += 1
                    continue
                self.arrived[key] = (now, m)
                if key in self._want:
                    self._want.discard(key)
                    if not self._want:
                        self._done.set()

    def expect(self, keys: Sequence[bytes]) -> None:
        """Watch for ``keys`` (:meth:`wait` returns once each has arrived)."""
        self._want = {k for k in keys if k not in self.arrived}
        if self._want:
            self._done.clear()
        else:
            self._done.set()

    async def wait(self, timeout_s: float) -> bool:
        """True once every expected key arrived; False after ``timeout_s``; raises if the
        reader failed."""
        assert self._task is not None
        waiter = asyncio.create_task(self._done.wait())
        try:
            await asyncio.wait(
                {waiter, self._task}, timeout=timeout_s, return_when="FIRST_COMPLETED"
            )
        finally:
            waiter.cancel()
            await asyncio.gather(waiter, return_exceptions=True)
        if self._task.done() and not self._done.is_set():
            self._task.result()
            raise KvpipeError("the reader stopped")
        return self._done.is_set()

    @property
    def missing(self) -> int:
        """Expected keys not arrived yet."""
        return len(self._want)

    def take(self, keys: Sequence[bytes]) -> dict[bytes, tuple[float, Message]]:
        """Remove and return the arrivals of ``keys`` (those that came)."""
        return {k: self.arrived.pop(k) for k in keys if k in self.arrived}

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._consumer.aclose()


# -- figures --------------------------------------------------------------------------------------


@dataclass
class RatePoint:
    """One side at one offered rate: what was offered, what came back, how fast, how right."""

    side: str
    rate: float
    duration_s: float
    half: bool = False
    sent: int = 0
    offered_rate: float = 0.0
    on_schedule: bool = False
    lag_ms: dict[str, float | None] = field(default_factory=dict)
    ok: int = 0
    wrong: int = 0
    errors: int = 0
    missing: int = 0
    duplicates: int = 0
    error_codes: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    latency_ms: dict[str, float | None] = field(default_factory=dict)
    failure: str | None = None

    @property
    def passed(self) -> bool:
        """Every request answered, correctly, and nothing broke."""
        return (
            self.failure is None
            and self.sent > 0
            and self.ok == self.sent
            and not (self.wrong or self.errors or self.missing)
            and self.seconds > 0
        )

    @property
    def throughput(self) -> float | None:
        """Answers per second: first -> last answer, at least the sending time (None without a
        valid figure)."""
        return self.ok / self.seconds if self.passed else None

    @property
    def saturated(self) -> bool:
        """The side answered clearly slower than it was offered."""
        tp = self.throughput
        return tp is not None and tp < SATURATED_SHARE * self.offered_rate

    def problem(self) -> str:
        """Why the point has no figure (empty when it has one)."""
        if self.passed:
            return ""
        codes = f" {self.error_codes}" if self.error_codes else ""
        return self.failure or (
            f"ok {self.ok} of {self.sent}, errors {self.errors}{codes}, "
            f"wrong {self.wrong}, missing {self.missing}"
        )

    def as_dict(self) -> dict[str, Any]:
        """The point as JSON-able values."""
        tp = self.throughput

        def ms(d: dict[str, float | None]) -> dict[str, float | None]:
            return {k: None if v is None else round(v, 3) for k, v in d.items()}

        return {
            "side": self.side,
            "rate": self.rate,
            "half_of_max": self.half,
            "duration_s": self.duration_s,
            "sent": self.sent,
            "offered_rate": round(self.offered_rate, 1),
            "on_schedule": self.on_schedule,
            "send_lag_ms": ms(self.lag_ms),
            "throughput": None if tp is None else round(tp, 1),
            "saturated": self.saturated,
            "latency_ms": ms(self.latency_ms) if self.passed else None,
            "passed": self.passed,
            "ok": self.ok,
            "wrong": self.wrong,
            "errors": self.errors,
            "missing": self.missing,
            "duplicates": self.duplicates,
            "error_codes": self.error_codes,
            "seconds": round(self.seconds, 4),
            "failure": self.failure,
        }


@dataclass
class E2EResult:
    """Every point of both sides, and the figures the goals are read from."""

    points: list[RatePoint] = field(default_factory=list)
    half_rate: float | None = None
    failure: str | None = None
    pids: list[int] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)
    duration_s: float = 0.0
    processes: int = 1  # above 1: the "procs" side ran, kvpipe serve --processes N

    def side(self, name: str, *, half: bool | None = None) -> list[RatePoint]:
        """The points of one side (``half``: only the half-of-max run, or only the sweep)."""
        return [p for p in self.points if p.side == name and (half is None or p.half == half)]

    def max_throughput(self, name: str) -> float | None:
        """The highest valid throughput of a side over its sweep (None: no valid point)."""
        rates = [p.throughput for p in self.side(name, half=False) if p.throughput is not None]
        return max(rates) if rates else None

    def saturated(self, name: str) -> bool:
        """Whether the side fell clearly behind its offered rate at some point of the sweep."""
        return any(p.saturated for p in self.side(name, half=False))

    @property
    def passed(self) -> bool:
        """Every point of both sides answered every request correctly."""
        return self.failure is None and bool(self.points) and all(p.passed for p in self.points)

    @property
    def throughput_ratio(self) -> float | None:
        """Worker max / echo max."""
        w, e = self.max_throughput("worker"), self.max_throughput("echo")
        return None if w is None or not e else w / e

    @property
    def processes_ratio(self) -> float | None:
        """Max of ``--processes N`` / max of one worker process."""
        p, w = self.max_throughput(PROCS), self.max_throughput("worker")
        return None if p is None or not w else p / w

    @property
    def latency_ratio(self) -> float | None:
        """p99 of the worker / p99 of the echo, at half the worker's max throughput."""
        w = self.side("worker", half=True)
        e = self.side("echo", half=True)
        if not (w and e and w[0].passed and e[0].passed):
            return None
        pw, pe = w[0].latency_ms.get("p99"), e[0].latency_ms.get("p99")
        return None if pw is None or not pe else pw / pe

    def as_dict(self) -> dict[str, Any]:
        """The result as JSON-able values."""
        tr, lr = self.throughput_ratio, self.latency_ratio
        wmax, emax = self.max_throughput("worker"), self.max_throughput("echo")
        return {
            "points": [p.as_dict() for p in self.points],
            "max_throughput": {
                "worker": None if wmax is None else round(wmax, 1),
                "echo": None if emax is None else round(emax, 1),
            },
            "saturated": {"worker": self.saturated("worker"), "echo": self.saturated("echo")},
            "throughput_ratio": None if tr is None else round(tr, 4),
            "throughput_ratio_of": "worker max / echo max",
            "throughput_goal": THROUGHPUT_GOAL,
            "throughput_goal_met": tr is not None and tr >= THROUGHPUT_GOAL,
            "half_rate": None if self.half_rate is None else round(self.half_rate, 1),
            "latency_ratio": None if lr is None else round(lr, 4),
            "latency_ratio_of": "p99 worker / p99 echo at half the worker's max throughput",
            "latency_goal": LATENCY_GOAL,
            "latency_goal_met": lr is not None and lr <= LATENCY_GOAL,
            "passed": self.passed,
            "failure": self.failure,
            "pids": self.pids,
            "rates": self.rates,
            "duration_s": self.duration_s,
            "processes": self.processes,
            "processes_max_throughput": _round(self.max_throughput(PROCS)),
            "processes_ratio": _round(self.processes_ratio, 4),
            "processes_ratio_of": f"--processes {self.processes} max / one process max",
            "model": "mlp 32-64-8",
        }


def _round(v: float | None, digits: int = 1) -> float | None:
    return None if v is None else round(v, digits)


def point_line(p: RatePoint) -> str:
    """One printed row of the e2e table."""
    head = f"e2e     {p.side:<7}{'*' if p.half else ' '}{p.rate:>8.0f} {p.offered_rate:>9.0f}"
    if not p.passed:
        return f"{head}      FAIL  ({p.problem()})"
    lat = p.latency_ms
    tp = p.throughput or 0.0
    notes = []
    if not p.on_schedule:
        notes.append("offered rate NOT reached by the sender")
    if p.saturated:
        notes.append("saturated")
    return (
        f"{head} {tp:>10.0f} {lat['p50'] or 0:>8.2f} {lat['p95'] or 0:>8.2f} "
        f"{lat['p99'] or 0:>8.2f}  {', '.join(notes)}"
    ).rstrip()


TABLE_HEAD = (
    "e2e     side     asked/s offered/s  answers/s   p50 ms   p95 ms   p99 ms  notes\n"
    "e2e     (* = the run at half of the worker's max throughput)"
)


def summary_lines(result: E2EResult) -> list[str]:
    """Max throughputs and the two ratios against their goals."""
    out = []
    wmax, emax = result.max_throughput("worker"), result.max_throughput("echo")

    def fmt(name: str, v: float | None) -> str:
        if v is None:
            return f"{name} n/a"
        bound = "" if result.saturated(name) else " (never saturated: a lower bound)"
        return f"{name} {v:.0f}/s{bound}"

    out.append(f"e2e     max throughput: {fmt('worker', wmax)}, {fmt('echo', emax)}")
    tr = result.throughput_ratio
    if tr is None:
        out.append(f"e2e     throughput ratio worker/echo: n/a (goal >= {THROUGHPUT_GOAL:g}x)")
    else:
        verdict = "met" if tr >= THROUGHPUT_GOAL else "NOT met"
        out.append(
            f"e2e     throughput ratio worker/echo: {tr:.2f}x "
            f"(goal >= {THROUGHPUT_GOAL:g}x: {verdict})"
        )
    lr = result.latency_ratio
    if lr is None or result.half_rate is None:
        out.append(f"e2e     p99 ratio at half max: n/a (goal <= {LATENCY_GOAL:g}x)")
    else:
        w = result.side("worker", half=True)[0].latency_ms["p99"]
        e = result.side("echo", half=True)[0].latency_ms["p99"]
        verdict = "met" if lr <= LATENCY_GOAL else "NOT met"
        out.append(
            f"e2e     p99 at half the worker max ({result.half_rate:.0f}/s): worker {w:.2f} ms / "
            f"echo {e:.2f} ms = {lr:.2f}x (goal <= {LATENCY_GOAL:g}x: {verdict})"
        )
    if result.processes > 1:
        pmax, pr = result.max_throughput(PROCS), result.processes_ratio
        out.append(
            f"e2e     --processes {result.processes}: max throughput {fmt(PROCS, pmax)} against "
            f"one process {fmt('worker', wmax)}" + ("" if pr is None else f" = {pr:.2f}x")
        )
    return out


# -- the sides ------------------------------------------------------------------------------------


class LiveSide(AsyncResource):
    """A running process (worker or echo) fed through its requests topic, read on its sink."""

    def __init__(
        self,
        name: str,
        settings: Settings,
        sink: str,
        check: Callable[[bytes, Message, Encoded, int], str],
        rows: Array,
        wire: str = JSON,
    ) -> None:
        self.name = name
        self.settings = settings
        self.sink = sink
        self.check = check
        self.rows = rows
        self.wire = wire
        k = settings.kafka
        # No linger: a send goes out when the loop next runs the producer, so the generator
        # adds no waiting of its own to the latency (both sides alike).
        self.producer = Producer(k, linger_ms=0, send_timeout_s=120.0)
        self.reader = Reader(k, sink)

    async def start(self) -> None:
        await self.producer.start()
        await self.reader.start()

    async def aclose(self) -> None:
        try:
            await self.producer.aclose()
        finally:
            await self.reader.aclose()

    def encode(self, key: bytes, row: int) -> Encoded:
        """The request message for ``key`` carrying input row ``row``."""
        return encode_request(
            id=key.decode(),
            model=MODEL,
            inputs=self.rows[row].reshape(1, -1),
            content_type=self.wire,
        )

    async def warm(
        self, count: int, timeout_s: float, alive: Callable[[], None], tag: str = "warm"
    ) -> dict[bytes, tuple[float, Message]]:
        """Send ``count`` requests and wait for every answer (the process is up and warm);
        returns the answers."""
        keys = [f"{tag}-{self.name}-{i}".encode() for i in range(count)]
        self.reader.expect(keys)
        futures = []
        for i, key in enumerate(keys):
            value, headers = self.encode(key, i % len(self.rows))
            futures.append(
                await self.producer.enqueue(
                    self.settings.kafka.requests_topic, value, key=key, headers=headers
                )
            )
        await self.producer.wait_acked(futures)
        deadline = time.perf_counter() + timeout_s
        while not await self.reader.wait(1.0):
            alive()
            if time.perf_counter() > deadline:
                raise KvpipeError(
                    f"{self.name}: {self.reader.missing} of {count} warm-up answers missing "
                    f"after {timeout_s:g} s"
                )
        return self.reader.take(keys)

    async def warm_all(self, workers: int, timeout_s: float, alive: Callable[[], None]) -> None:
        """Warm until answers came from ``workers`` distinct worker ids (every child of a
        supervisor has joined the group and owns partitions)."""
        seen: set[str] = set()
        deadline = time.perf_counter() + timeout_s
        wave = 0
        while len(seen) < workers:
            if time.perf_counter() > deadline:
                raise KvpipeError(f"{self.name}: only {len(seen)} of {workers} workers answered")
            for _, msg in (await self.warm(WARMUP, timeout_s, alive, f"w{wave}")).values():
                with contextlib.suppress(UnreadableMessage):
                    seen.add(decode_result(msg.value or b"", msg.headers).worker)
            wave += 1

    async def run_rate(
        self, rate: float, duration_s: float, tag: str, *, half: bool, alive: Callable[[], None]
    ) -> RatePoint:
        """Offer ``rate`` requests/s for ``duration_s`` (open loop), then collect every answer."""
        point = RatePoint(self.name, rate, duration_s, half=half)
        offsets = schedule(rate, duration_s)
        n = int(offsets.size)
        keys = [f"{tag}-{i}".encode() for i in range(n)]
        sent = [self.encode(key, i % len(self.rows)) for i, key in enumerate(keys)]
        topic = self.settings.kafka.requests_topic
        futures: list[asyncio.Future[Any]] = []
        enqueue = self.producer.enqueue

        async def send(i: int) -> None:
            value, headers = sent[i]
            futures.append(await enqueue(topic, value, key=keys[i], headers=headers))

        self.reader.expect(keys)
        log: SendLog = await run_open_loop(rate, offsets, send)
        point.sent = n
        point.offered_rate = log.offered_rate
        point.on_schedule = log.on_schedule
        point.lag_ms = {k: None if v is None else v * 1e3 for k, v in percentiles(log.lag).items()}
        point.lag_ms["max"] = float(log.lag.max()) * 1e3
        await self.producer.wait_acked(futures)
        drain_s = 30.0 + 4 * duration_s
        deadline = time.perf_counter() + drain_s
        while not await self.reader.wait(1.0):
            alive()
            if time.perf_counter() > deadline:
                point.failure = f"{self.reader.missing} of {n} answers missing {drain_s:g} s after"
                break
        arrivals = self.reader.take(keys)
        point.duplicates = self.reader.duplicates
        latencies: list[float] = []
        codes: Counter[str] = Counter()
        first, last = float("inf"), float("-inf")
        for i, key in enumerate(keys):
            got = arrivals.get(key)
            if got is None:
                point.missing += 1
                continue
            at, msg = got
            verdict = self.check(key, msg, sent[i], i % len(self.rows))
            if verdict == "ok":
                point.ok += 1
                latencies.append(at - log.sent_at[i])
                first, last = min(first, at), max(last, at)
            elif verdict == "wrong":
                point.wrong += 1
            else:
                point.errors += 1
                codes[verdict] += 1
        point.error_codes = dict(codes)
        # Answers over the time they took to arrive, but never faster than they were offered.
        point.seconds = max(last - first, log.span_s) if latencies else 0.0
        point.latency_ms = {
            k: None if v is None else v * 1e3 for k, v in percentiles(latencies).items()
        }
        return point


def worker_check(expected: Array, version: int) -> Callable[[bytes, Message, Encoded, int], str]:
    """Check a worker's answer against numpy: "ok", "wrong" or the error code."""

    def check(key: bytes, msg: Message, sent: Encoded, row: int) -> str:
        return check_answer(msg, key.decode(), expected[row], version)[0]

    return check


def echo_check(key: bytes, msg: Message, sent: Encoded, row: int) -> str:
    """The echo must hand back exactly the bytes it was given."""
    return "ok" if msg.value == sent[0] else "wrong"


# -- the suite ------------------------------------------------------------------------------------


async def bench_e2e(
    worker_settings: Settings,
    echo_settings: Settings,
    *,
    rates: Sequence[float] = DEFAULT_RATES,
    duration_s: float = DEFAULT_DURATION_S,
    half_duration_s: float | None = None,
    emit: Emit = print,
    wire: str = JSON,
    processes: int = 1,
    processes_settings: Settings | None = None,
) -> E2EResult:
    """Sweep ``rates`` on both sides (alternating their order), then run both at half the
    worker's max; every process started here is stopped on the way out. With ``processes``
    above 1, ``kvpipe serve --processes N`` on ``processes_settings`` joins the sweep."""
    model = preset("mlp")
    params = model.init(0)
    rng = np.random.default_rng(5)
    rows: Array = rng.standard_normal((POOL_ROWS, model.input_dim)).astype(np.float32)
    expected = model.forward(params, rows)
    result = E2EResult(rates=list(rates), duration_s=duration_s, processes=processes)
    manifest = await prepare_side(
        worker_settings, model, params, [echo_topic(worker_settings.kafka)]
    )
    await prepare_side(echo_settings, model, params, [echo_topic(echo_settings.kafka)])
    procs_settings = processes_settings if processes > 1 else None
    if procs_settings is not None:
        procs_manifest = await prepare_side(procs_settings, model, params)
    emit(TABLE_HEAD)
    try:
        async with Children() as children:
            for name, module, settings in (
                ("e2e-worker", "consumers.inference", worker_settings),
                ("e2e-echo", "pipeline.bench.echo", echo_settings),
            ):
                child = await children.spawn(name, module, child_env(settings, name))
                result.pids.append(child.proc.pid)
            sides: list[LiveSide] = []
            if procs_settings is not None:
                env = child_env(procs_settings, "e2e-procs", {"KVPIPE_PROCESSES": str(processes)})
                child = await children.spawn("e2e-procs", "consumers.inference", env)
                result.pids.append(child.proc.pid)
                check = worker_check(expected, procs_manifest.version)
                k = procs_settings.kafka
                sides.append(LiveSide(PROCS, procs_settings, k.results_topic, check, rows, wire))
            worker = LiveSide(
                "worker",
                worker_settings,
                worker_settings.kafka.results_topic,
                worker_check(expected, manifest.version),
                rows,
                wire,
            )
            echo = LiveSide(
                "echo", echo_settings, echo_topic(echo_settings.kafka), echo_check, rows, wire
            )
            async with contextlib.AsyncExitStack() as stack:
                for side in (worker, echo, *sides):
                    await stack.enter_async_context(side)
                await worker.warm(WARMUP, 90.0, children.check_alive)
                await echo.warm(WARMUP, 90.0, children.check_alive)
                for side in sides:
                    await side.warm_all(processes, 120.0, children.check_alive)

                async def both(
                    i: int, rate: float, seconds: float, half: bool, extra: Sequence[LiveSide]
                ) -> None:
                    ring = [worker, echo, *extra]
                    order = ring[i % len(ring) :] + ring[: i % len(ring)]
                    for side in order:
                        tag = f"{'h' if half else 'r'}{i}"
                        point = await side.run_rate(
                            rate, seconds, tag, half=half, alive=children.check_alive
                        )
                        result.points.append(point)
                        emit(point_line(point))

                for i, rate in enumerate(rates):
                    await both(i, rate, duration_s, False, sides)
                wmax = result.max_throughput("worker")
                if wmax is not None:
                    result.half_rate = wmax / 2
                    await both(len(rates), wmax / 2, half_duration_s or duration_s, True, ())
    except Exception as exc:  # recorded (the JSON still says what ran), not raised
        result.failure = f"{type(exc).__name__}: {exc}"
        emit(f"e2e     FAIL  ({result.failure})")
    for line in summary_lines(result):
        emit(line)
    return result


# -- batching at light load ------------------------------------------------------------------------

LIGHT_RATE = 200.0  # requests/s: far below either side's ceiling
LIGHT_SECONDS = 5.0
LIGHT_GOAL = 1.5  # p99 with the batcher / p99 at batch size 1


@dataclass
class LightResult:
    """p99 latency of the batcher and of batch size 1 at a light open-loop rate."""

    rate: float
    duration_s: float
    points: list[RatePoint] = field(default_factory=list)
    failure: str | None = None

    def p99(self, side: str) -> float | None:
        """The mean p99 (ms) of the side's runs; None unless every run has a figure."""
        runs = [p for p in self.points if p.side == side]
        values = [p.latency_ms.get("p99") for p in runs if p.passed]
        if not runs or len(values) != len(runs) or any(v is None for v in values):
            return None
        return float(np.mean([v for v in values if v is not None]))

    @property
    def ratio(self) -> float | None:
        batched, single = self.p99("batched"), self.p99("single")
        return None if batched is None or not single else batched / single

    @property
    def passed(self) -> bool:
        return self.failure is None and bool(self.points) and all(p.passed for p in self.points)

    def as_dict(self) -> dict[str, Any]:
        ratio = self.ratio
        return {
            "rate": self.rate,
            "duration_s": self.duration_s,
            "p99_ms": {"batched": self.p99("batched"), "single": self.p99("single")},
            "ratio": None if ratio is None else round(ratio, 3),
            "goal": LIGHT_GOAL,
            "goal_met": ratio is not None and ratio <= LIGHT_GOAL,
            "passed": self.passed,
            "runs": [p.as_dict() for p in self.points],
            "failure": self.failure,
        }


async def bench_light_latency(
    batched: Settings,
    single: Settings,
    *,
    model_name: str = "article",
    rate: float = LIGHT_RATE,
    duration_s: float = LIGHT_SECONDS,
    rounds: int = 2,
    wire: str = JSON,
    emit: Emit = print,
) -> LightResult:
    """Two worker processes, one with the batcher and one at batch size 1, each offered
    ``rate`` requests/s in turn; every answer checked."""
    model = preset(model_name)
    params = model.init(0)
    rows: Array = (
        np.random.default_rng(8).standard_normal((POOL_ROWS, model.input_dim)).astype(np.float32)
    )
    expected = model.forward(params, rows)
    result = LightResult(rate, duration_s)
    try:
        async with Children() as children:
            sides: list[LiveSide] = []
            for name, settings in (("batched", batched), ("single", single)):
                k = settings.kafka
                manifest = await prepare_side(settings, model, params)
                await children.spawn(
                    f"light-{name}", "consumers.inference", child_env(settings, name)
                )
                check = worker_check(expected, manifest.version)
                sides.append(LiveSide(name, settings, k.results_topic, check, rows, wire))
            async with sides[0], sides[1]:
                for side in sides:
                    await side.warm(WARMUP, 90.0, children.check_alive)
                for i in range(rounds):
                    for side in sides if i % 2 == 0 else sides[::-1]:
                        point = await side.run_rate(
                            rate, duration_s, f"l{i}", half=False, alive=children.check_alive
                        )
                        result.points.append(point)
    except Exception as exc:  # recorded, not raised, like the other suites
        result.failure = f"{type(exc).__name__}: {exc}"
    batched_p99, single_p99, ratio = result.p99("batched"), result.p99("single"), result.ratio
    if ratio is None or batched_p99 is None or single_p99 is None:
        emit(f"batching light load: no figure ({result.failure or 'a run failed'})")
    else:
        verdict = "met" if ratio <= LIGHT_GOAL else "NOT met"
        emit(
            f"batching p99 at {rate:g} req/s: micro-batches {batched_p99:.2f} ms, batch size 1 "
            f"{single_p99:.2f} ms, ratio {ratio:.2f}x (goal <= {LIGHT_GOAL:g}x: {verdict})"
        )
    return result
