"""One generation in progress (a sequence), shared by the parts of :mod:`.generation`."""

from __future__ import annotations

import asyncio
import codecs
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.errors import KvpipeError, RequestError
from pipeline.io.stream import GenerationSpec
from pipeline.params.keys import PrefixKey
from pipeline.params.prefix import Reuse
from pipeline.params.registry import Resolved
from pipeline.params.transformer import KVState, Transformer
from pipeline.serving.item import Item


@dataclass(eq=False)
class Generation:
    """One generation in progress."""

    item: Item
    spec: GenerationSpec
    resolved: Resolved
    model: Transformer
    state: KVState
    rng: np.random.Generator
    topic: str
    partition: int | None
    started: float  # perf_counter at dispatch
    queue_ms: float
    reuse: Reuse | None = None
    tokens: list[int] = field(default_factory=list)
    text: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace")
    )
    seq: int = 0
    computed: int = 0  # prompt tokens this request computed itself
    joined: int = 0  # prompt tokens another request computed for it (single-flight)
    #: Chunks this request computed, written to Redis once its first token is out.
    unshared: list[tuple[PrefixKey, Any]] = field(default_factory=list)
    kv_reserved: int = 0  # bytes of the scheduler's key/value budget this sequence holds
    timings: dict[str, float] = field(default_factory=dict)
    done: asyncio.Future[None] | None = None
    finish: str | None = None
    error: KvpipeError | None = None

    @property
    def id(self) -> str:
        return self.item.request.id

    @property
    def group(self) -> tuple[str, int]:
        """The decode group it joins: its (model, version)."""
        return (self.resolved.name, self.resolved.version)

    def generated(self) -> bytes:
        return bytes(t for t in self.tokens if t < 256)

    def past_deadline(self) -> bool:
        deadline = self.item.request.deadline_ms
        return deadline is not None and time.time() * 1000 > deadline

    def deadline_error(self) -> RequestError:
        return RequestError(
            f"deadline passed after {len(self.tokens)} generated tokens; generation stopped",
            code="deadline_exceeded",
        )


class DeadlinePassed(Exception):
    """The request's deadline passed during its prefill."""


def elapsed_ms(since: float) -> float:
    """Milliseconds since ``since`` (a ``time.perf_counter()``)."""
    return (time.perf_counter() - since) * 1000
