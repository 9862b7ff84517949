"""The worker's counters, shared by the parts it composes."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class WorkerStats:
    """Counters since the worker started."""

    received: int = 0
    ok: int = 0
    errors: int = 0
    dead_lettered: int = 0
    batches: int = 0
    batched_rows: int = 0
    commits: int = 0
    commit_failures: int = 0
    send_retries: int = 0
    batches_waited_on_load: int = 0
    memo_hits: int = 0
    memo_misses: int = 0
    memo_shared_hits: int = 0
    consumer_restarts: int = 0
    rebalances: int = 0
    topics_recreated: int = 0
    skipped_answered: int = 0  # redelivered requests skipped by dedupe (already answered)
    errors_by_code: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["errors_by_code"] = dict(self.errors_by_code)
        return out
