"""Generation requests and their streamed results: the bytes on the topics.

A generation request is a JSON request with a ``prompt`` (text, or byte token ids 0-255),
``max_tokens``, optional ``sampling`` (``temperature``, ``top_k``, ``seed``) and ``stop``
strings. :func:`parse_generation` checks it; a wrong one is answered with an error result whose
code is one of :data:`GENERATION_CODES`.

The answer is a stream of messages for the request's id, keyed by it (one partition, in
order): each carries ``stream.seq`` (0, 1, ...), ``stream.start`` (the index of its first new
token) and the new ``tokens``/``text``; the last has ``stream.final`` true, every token, the
finish reason, the usage and prefix-cache provenance, the timings and the model version. It is
also a readable result (``id``, ``status``, ``error``), so any results reader sees how the
generation ended. After a redelivery a reader drops what it has by ``(id, seq)`` or by
``start``.
"""

from __future__ import annotations

import asyncio
import codecs
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog

from pipeline.config import KafkaSettings, LimitSettings
from pipeline.errors import KvpipeError, RequestError
from pipeline.io.kafka import Consumer
from pipeline.resource import AsyncResource

log = structlog.get_logger("kvpipe.stream")

#: Largest ``max_tokens`` any request may ask for (the model's context bounds it further).
MAX_NEW_TOKENS = 4096
MAX_STOPS = 4
MAX_STOP_CHARS = 64
SAMPLING_KEYS = frozenset({"temperature", "top_k", "seed"})

#: Stable error codes of generation requests.
GENERATION_CODES = (
    "bad_prompt",  # no prompt, empty, wrong type, ids outside 0-255, over the size limit
    "bad_text",  # prompt or stop text that is not valid Unicode (cannot be UTF-8)
    "bad_max_tokens",  # max_tokens not an integer in 1..MAX_NEW_TOKENS
    "bad_sampling",  # unknown sampling setting or one out of range
    "bad_stop",  # stop not a list of at most 4 non-empty strings of at most 64 characters
    "context_too_long",  # prompt (plus max_tokens) over the model's context
    "not_generative",  # the model is not a transformer
    "deadline_exceeded",  # the deadline passed: generation stopped (partial tokens in the final)
)


@dataclass(frozen=True, slots=True)
class GenerationSpec:
    """What a generation request asks for, checked."""

    prompt: tuple[int, ...]
    text: bool  # the prompt came as text: answers carry text too
    max_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[bytes, ...] = ()


def _utf8(text: str, what: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(
            f"{what} is not valid Unicode (it holds a lone surrogate); send UTF-8 text",
            code="bad_text",
        ) from None


def _int_in(raw: object, low: int, high: int) -> int | None:
    if isinstance(raw, bool) or not isinstance(raw, int) or not low <= raw <= high:
        return None
    return raw


def parse_generation(body: Mapping[str, Any], limits: LimitSettings) -> GenerationSpec:
    """The checked generation request in ``body``; RequestError with a generation code."""
    raw = body.get("prompt")
    if isinstance(raw, str):
        prompt = tuple(_utf8(raw, "prompt"))
        text = True
    elif isinstance(raw, list) and all(_int_in(t, 0, 255) is not None for t in raw):
        prompt, text = tuple(raw), False
    else:
        raise RequestError(
            "prompt must be text or a list of byte token ids 0-255", code="bad_prompt"
        )
    if not prompt:
        raise RequestError("prompt is empty", code="bad_prompt")
    if len(prompt) > limits.max_elements:
        raise RequestError(
            f"prompt of {len(prompt)} tokens is over the limit of {limits.max_elements}",
            code="bad_prompt",
        )
    max_tokens = _int_in(body.get("max_tokens", 16), 1, MAX_NEW_TOKENS)
    if max_tokens is None:
        raise RequestError(
            f"max_tokens must be an integer from 1 to {MAX_NEW_TOKENS}", code="bad_max_tokens"
        )
    sampling = body.get("sampling") or {}
    if not isinstance(sampling, dict):
        raise RequestError("sampling must be an object", code="bad_sampling")
    unknown = sorted(set(sampling) - SAMPLING_KEYS)
    if unknown:
        raise RequestError(
            f"unknown sampling settings {unknown[:5]}; known: {sorted(SAMPLING_KEYS)}",
            code="bad_sampling",
        )
    temperature = sampling.get("temperature", 0.0)
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, int | float)
        or not (math.isfinite(temperature) and 0.0 <= temperature <= 10.0)
    ):
        raise RequestError("temperature must be a number from 0 to 10", code="bad_sampling")
    top_k = _int_in(sampling.get("top_k", 0), 0, 1 << 20)
    if top_k is None:
        raise RequestError("top_k must be a non-negative integer (0: all)", code="bad_sampling")
    seed = sampling.get("seed")
    if seed is not None and _int_in(seed, 0, 2**63 - 1) is None:
        raise RequestError("seed must be a non-negative integer", code="bad_sampling")
    return GenerationSpec(
        prompt=prompt,
        text=text,
        max_tokens=max_tokens,
        temperature=float(temperature),
        top_k=top_k,
        seed=seed,
        stop=_stops(body.get("stop")),
    )


def _stops(raw: object) -> tuple[bytes, ...]:
    if raw is None:
        return ()
    if isinstance(raw, str):
        raw = [raw]
    if (
        not isinstance(raw, list)
        or len(raw) > MAX_STOPS
        or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in raw)
    ):
        raise RequestError(
            f"stop must be a string or a list of at most {MAX_STOPS} non-empty strings of at "
            f"most {MAX_STOP_CHARS} characters",
            code="bad_stop",
        )
    return tuple(_utf8(s, "stop") for s in raw)


def encode_generation(
    *,
    id: str,
    model: str,
    prompt: str | Sequence[int],
    max_tokens: int = 16,
    version: int | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    stop: Sequence[str] | None = None,
) -> bytes:
    """The JSON value of a generation request (headers as for any JSON request)."""
    body: dict[str, Any] = {
        "id": id,
        "model": model,
        "prompt": prompt if isinstance(prompt, str) else list(prompt),
        "max_tokens": max_tokens,
    }
    if version is not None:
        body["version"] = version
    sampling = {
        k: v for k, v in (("temperature", temperature), ("top_k", top_k), ("seed", seed))
        if v is not None
    }  # fmt: skip
    if sampling:
        body["sampling"] = sampling
    if stop:
        body["stop"] = list(stop)
    return orjson.dumps(body)


@dataclass(slots=True)
class StreamMessage:
    """One message of a generation's answer (see the module docstring)."""

    id: str
    model: str
    seq: int
    start: int
    tokens: list[int]
    text: str | None = None
    final: bool = False
    version: int | None = None
    status: str = "ok"
    error_code: str | None = None
    error_message: str | None = None
    finish_reason: str | None = None
    usage: dict[str, int] = field(default_factory=dict)
    prefix: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    worker: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def encode_stream(msg: StreamMessage) -> bytes:
    """The JSON value of one stream message (a result too: id, status, error, timings)."""
    stream: dict[str, Any] = {
        "seq": msg.seq,
        "start": msg.start,
        "tokens": msg.tokens,
        "text": msg.text,
        "final": msg.final,
    }
    if msg.final:
        stream.update(finish_reason=msg.finish_reason, usage=msg.usage, prefix=msg.prefix)
    return orjson.dumps(
        {
            "id": msg.id,
            "model": msg.model,
            "version": msg.version,
            "status": msg.status,
            "error": None
            if msg.error_code is None
            else {"code": msg.error_code, "message": msg.error_message},
            "cache": None,
            "stale": False,
            "worker": msg.worker,
            "timings": msg.timings,
            "outputs": None,
            "stream": stream,
        }
    )


def decode_stream(value: bytes) -> StreamMessage | None:
    """A stream message, a plain result read as a final one (an error before generation
    started), or None when ``value`` is neither."""
    try:
        body = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(body, dict) or not isinstance(body.get("id"), str):
        return None
    raw_err = body.get("error")
    err: dict[str, Any] = raw_err if isinstance(raw_err, dict) else {}
    common: dict[str, Any] = {
        "id": body["id"],
        "model": str(body.get("model", "")),
        "version": body.get("version") if isinstance(body.get("version"), int) else None,
        "status": "ok" if body.get("status") == "ok" else "error",
        "error_code": err.get("code"),
        "error_message": err.get("message"),
        "worker": str(body.get("worker", "")),
        "timings": dict(body.get("timings") or {}),
    }
    stream = body.get("stream")
    if not isinstance(stream, dict):
        return StreamMessage(seq=-1, start=0, tokens=[], final=True, **common)
    try:
        return StreamMessage(
            seq=int(stream["seq"]),
            start=int(stream["start"]),
            tokens=[int(t) for t in stream.get("tokens") or []],
            text=stream.get("text"),
            final=bool(stream.get("final")),
            finish_reason=stream.get("finish_reason"),
            usage=dict(stream.get("usage") or {}),
            prefix=dict(stream.get("prefix") or {}),
            **common,
        )
    except (KeyError, TypeError, ValueError):
        return None


class StreamReader(AsyncResource):
    """Stream messages of one topic handed out by request id (every partition, no group).

    ``watch(id)`` before the request is sent, then ``await queue.get()``; messages of ids no
    one watches are dropped. Read from the start of a topic this client owns, else from its end.
    """

    def __init__(self, settings: KafkaSettings, topic: str, *, from_beginning: bool) -> None:
        self.topic = topic
        self._consumer = Consumer(
            settings, [topic], group_id=None, assign_from="start" if from_beginning else "end"
        )
        self._queues: dict[str, asyncio.Queue[StreamMessage]] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._consumer.start()
        self._task = asyncio.get_running_loop().create_task(self._read())

    async def aclose(self) -> None:
        """Stop reading; safe twice."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self._consumer.aclose()

    def watch(self, rid: str) -> asyncio.Queue[StreamMessage]:
        return self._queues.setdefault(rid, asyncio.Queue())

    def forget(self, rid: str) -> None:
        self._queues.pop(rid, None)

    async def _read(self) -> None:
        while True:
            try:
                messages = await self._consumer.getmany(timeout_ms=200, max_records=2000)
            except KvpipeError as exc:  # the broker away for a while: readers time out
                log.warning("stream_read_failed", topic=self.topic, error=str(exc))
                await asyncio.sleep(0.5)
                continue
            for m in messages:
                msg = decode_stream(m.value or b"")
                queue = None if msg is None else self._queues.get(msg.id)
                if queue is not None and msg is not None:
                    queue.put_nowait(msg)


@dataclass(slots=True)
class Generated:
    """What a generation's reader gets at a time: new tokens and their text; with the last,
    the final message (``final.ok``, ``finish_reason``, usage, prefix provenance, timings)."""

    tokens: list[int]
    text: str
    final: StreamMessage | None = None


class StreamAssembler:
    """One generation's messages in, new tokens out: duplicates (a redelivered request
    answered twice, a message read twice) are dropped by ``(seq)`` and by token position; a
    gap waits for the final message, which carries every token."""

    def __init__(self) -> None:
        self.emitted = 0
        self.done = False
        self._seen: set[int] = set()
        self._text = codecs.getincrementaldecoder("utf-8")("replace")

    def add(self, msg: StreamMessage) -> Generated | None:
        if self.done or (msg.seq >= 0 and msg.seq in self._seen and not msg.final):
            return None
        self._seen.add(msg.seq)
        if not msg.final and not msg.start <= self.emitted < msg.start + len(msg.tokens):
            return None  # all known already, or after a gap
        new = msg.tokens[self.emitted - msg.start :]
        self.emitted += len(new)
        text = self._text.decode(bytes(t for t in new if t < 256), final=msg.final)
        if msg.final:
            self.done = True
            return Generated(new, text, msg)
        return Generated(new, text)
