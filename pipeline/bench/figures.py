"""Shared figures of the benchmark: runs, sides, comparisons, their printed lines, answer checks."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from pipeline.errors import UnreadableMessage
from pipeline.io.kafka import Message
from pipeline.io.wire import JSON, decode_result, encode_request
from pipeline.io.wire import Result as Answer

MODEL = "bench"
RTOL, ATOL = 1e-4, 1e-5

Array = npt.NDArray[np.float32]
Backlog = list[tuple[bytes, bytes, list[tuple[str, bytes]]]]
Emit = Callable[[str], None]


# -- figures -----------------------------------------------------------------------------------


@dataclass
class RunFigures:
    """One timed run of one side: how many, how long, and whether every answer was right."""

    requests: int
    seconds: float = 0.0
    backlog_s: float = 0.0
    ok: int = 0
    errors: int = 0
    wrong: int = 0
    missing: int = 0
    duplicates: int = 0
    failure: str | None = None
    error_codes: dict[str, int] = field(default_factory=dict)
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """Every request answered, correctly, and nothing broke."""
        return (
            self.failure is None
            and self.ok == self.requests
            and not (self.errors or self.wrong or self.missing)
            and self.seconds > 0
        )

    @property
    def rate(self) -> float | None:
        """Answers per second, or None when the run has no valid figure."""
        return self.requests / self.seconds if self.passed else None

    def problem(self) -> str:
        """Why the run has no figure (empty when it has one)."""
        if self.passed:
            return ""
        codes = f" {self.error_codes}" if self.error_codes else ""
        return self.failure or (
            f"ok {self.ok} of {self.requests}, errors {self.errors}{codes}, "
            f"wrong {self.wrong}, missing {self.missing}"
        )

    def as_dict(self) -> dict[str, Any]:
        """The figures as JSON-able values."""
        rate = self.rate
        return {
            "requests": self.requests,
            "seconds": round(self.seconds, 4),
            "rate": None if rate is None else round(rate, 2),
            "backlog_produce_s": round(self.backlog_s, 3),
            "passed": self.passed,
            "ok": self.ok,
            "errors": self.errors,
            "wrong": self.wrong,
            "missing": self.missing,
            "duplicates": self.duplicates,
            "failure": self.failure,
            "error_codes": self.error_codes,
            "detail": self.detail,
        }


@dataclass
class Side:
    """One side of a comparison over its runs; its rate is all answers over all timed seconds."""

    suite: str
    name: str
    label: str
    unit: str
    requests: int
    runs: list[RunFigures] = field(default_factory=list)

    def new_run(self) -> RunFigures:
        """Start the figures of one more run."""
        run = RunFigures(self.requests)
        self.runs.append(run)
        return run

    @property
    def passed(self) -> bool:
        """Every run of the side answered every request correctly."""
        return bool(self.runs) and all(r.passed for r in self.runs)

    @property
    def rate(self) -> float | None:
        """Answers per second over every run, or None when a run has no valid figure."""
        if not self.passed:
            return None
        return sum(r.requests for r in self.runs) / sum(r.seconds for r in self.runs)

    def as_dict(self) -> dict[str, Any]:
        """The side and its runs as JSON-able values."""
        rate = self.rate
        return {
            "side": self.name,
            "label": self.label,
            "unit": self.unit,
            "requests_per_run": self.requests,
            "rate": None if rate is None else round(rate, 2),
            "passed": self.passed,
            "runs": [r.as_dict() for r in self.runs],
        }


@dataclass
class Comparison:
    """Two sides measured on the same services; ``ratio`` is first.rate / second.rate."""

    suite: str
    first: Side
    second: Side
    goal: float

    @property
    def ratio(self) -> float | None:
        """The first side's rate over the second's, None when either has no figure."""
        a, b = self.first.rate, self.second.rate
        if a is None or b is None or b == 0:
            return None
        return a / b

    @property
    def passed(self) -> bool:
        """Both sides answered every request correctly (the goal is reported, not required)."""
        return self.first.passed and self.second.passed

    def as_dict(self) -> dict[str, Any]:
        """The comparison as JSON-able values."""
        ratio = self.ratio
        return {
            "sides": [self.first.as_dict(), self.second.as_dict()],
            "ratio": None if ratio is None else round(ratio, 4),
            "ratio_of": f"{self.first.name}/{self.second.name}",
            "goal": self.goal,
            "goal_met": ratio is not None and ratio >= self.goal,
            "passed": self.passed,
        }


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count() or 0
    return {
        "nproc": usable,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "aiokafka": _version("aiokafka"),
        "redis_py": _version("redis"),
    }


def side_line(side: Side) -> str:
    """One printed line for one side: its rate, then each run's."""
    noun = {"msg/s": "messages", "rows/s": "rows"}.get(side.unit, "requests")
    head = f"{side.suite:<7} {side.label:<18}"
    rate = side.rate
    if rate is None:
        why = (
            "; ".join(f"run {i + 1}: {r.problem()}" for i, r in enumerate(side.runs) if r.problem())
            or "no run"
        )
        return f"{head}      FAIL  ({why})"
    if len(side.runs) == 1:
        return (
            f"{head} {rate:>9.1f} {side.unit} ({side.requests} {noun} "
            f"in {side.runs[0].seconds:.3f} s)"
        )
    each = ", ".join(f"{r.requests / r.seconds:.1f}" for r in side.runs)
    return (
        f"{head} {rate:>9.1f} {side.unit} ({side.requests} {noun} x {len(side.runs)} runs: {each})"
    )


def ratio_line(cmp: Comparison) -> str:
    """The printed ratio of a comparison against its goal."""
    head = f"{cmp.suite:<7} {'ratio':<18}"
    ratio = cmp.ratio
    if ratio is None:
        return f"{head}       n/a  (a side has no valid figure; goal >= {cmp.goal:g}x)"
    verdict = "met" if ratio >= cmp.goal else "NOT met"
    return f"{head} {ratio:>9.2f}x   (goal >= {cmp.goal:g}x: {verdict})"


# -- requests and answers ----------------------------------------------------------------------


def request_backlog(inputs: Array, wire: str = JSON) -> tuple[list[str], Backlog]:
    """One request per row in the content type ``wire``; ids are the Kafka keys."""
    ids = [f"b{i}" for i in range(len(inputs))]
    backlog: Backlog = []
    for rid, row in zip(ids, inputs, strict=True):
        value, headers = encode_request(
            id=rid, model=MODEL, inputs=row.reshape(1, -1), content_type=wire
        )
        backlog.append((rid.encode(), value, headers))
    return ids, backlog


class Answers(Protocol):
    """What :func:`verify_results` reads: the first message of each key, and the repeats."""

    @property
    def first(self) -> dict[bytes, Message]: ...

    @property
    def duplicates(self) -> int: ...


def check_answer(
    msg: Message,
    rid: str,
    expected_row: Array,
    version: int,
    columns: tuple[int, int] | None = None,
) -> tuple[str, Answer | None]:
    """One answer against numpy's row: ("ok", result), ("wrong", ...) or (its error code, ...).

    ``columns`` (start, stop): only those output columns are compared with ``expected_row``
    (an ONNX classifier's probabilities beside its label); the row must have exactly ``stop``.
    """
    try:
        result = decode_result(msg.value or b"", msg.headers)
    except UnreadableMessage:
        return "wrong", None
    if not result.ok or result.outputs is None:
        return result.error_code or "unknown", result
    out = result.outputs
    start, stop = columns or (0, expected_row.shape[0])
    if (
        result.id != rid
        or result.version != version
        or out.shape != (1, stop)
        or stop - start != expected_row.shape[0]
        or not np.allclose(out[0, start:stop], expected_row, rtol=RTOL, atol=ATOL)
    ):
        return "wrong", result
    return "ok", result


#: How one answer is checked: (message, request id, expected row, version) -> verdict, result.
Check = Callable[[Message, str, Array, int], tuple[str, Answer | None]]


def verify_results(
    fig: RunFigures,
    arrivals: Answers,
    ids: Sequence[str],
    expected: Array,
    version: int,
    check: Check = check_answer,
) -> Counter[str]:
    """Check every answer against numpy (with ``check``); fills the counts of ``fig``; returns
    cache sources."""
    sources: Counter[str] = Counter()
    codes: Counter[str] = Counter()
    for i, rid in enumerate(ids):
        msg = arrivals.first.get(rid.encode())
        if msg is None:
            fig.missing += 1
            continue
        verdict, result = check(msg, rid, expected[i], version)
        if verdict == "ok" and result is not None:
            fig.ok += 1
            sources[result.cache or "none"] += 1
        elif verdict == "wrong":
            fig.wrong += 1
        else:
            fig.errors += 1
            codes[verdict] += 1
    fig.duplicates = arrivals.duplicates
    fig.error_codes = dict(codes)
    return sources
