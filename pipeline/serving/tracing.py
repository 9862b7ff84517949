"""Trace context through the worker: W3C ``traceparent``/``tracestate`` from a request continue
into the worker's spans and onto its result, and the request headers a setting names are
copied onto the result.

With an OpenTelemetry SDK configured (``KVPIPE_OTLP_ENDPOINT``, or any SDK the process set up)
each request gets, under the context its headers carry (a new trace when they carry none):

- ``consume`` (kind CONSUMER): from the fetch that brought it until its answer is acknowledged;
- ``batch`` with its children ``load`` (parameters through the cache) and ``compute`` (the
  forward pass; left out for answers the result memo gave): one set per request, under its
  ``consume``. A batch serves many requests and so many traces; each trace shows the batch
  it rode in, with the batch's shared times, and ``kvpipe.batch.id`` joins the spans of one
  batch across traces (a single batch span with links would leave it out of every trace);
- ``produce`` (kind PRODUCER) under ``consume``: until the broker acknowledged the result;
  its context is the result's ``traceparent``.

A request the SDK's sampler leaves out gets its ``consume`` span only (not recorded) and its
context goes on to the result; no child spans are made for it.

Without an SDK (opentelemetry-api alone) no span is made per message: the request's trace
headers go onto the result as they came, which is what the API's non-recording spans would
propagate, so a caller's trace continues through kvpipe at the cost of a header copy.
``KVPIPE_TRACING=0`` turns both off. Foreign header bytes are hostile: sizes are bounded and a
malformed ``traceparent`` is dropped, never an error.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Sequence
from typing import Any

import structlog
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer, TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from pipeline.config import MAX_COPY_HEADERS, TracingSettings
from pipeline.errors import ConfigError, KvpipeError
from pipeline.io.kafka import Message
from pipeline.io.wire import MAX_HEADER_BYTES, Result
from pipeline.serving.item import Item

log = structlog.get_logger("kvpipe.worker")

__all__ = ["BatchTrace", "Tracing", "configure_tracing"]

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
#: W3C trace context: version 00 is exactly this; later versions may append fields.
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}(-[!-~]*)?")
MAX_TRACEPARENT = 128
MAX_TRACESTATE = 512
_PROPAGATOR = TraceContextTextMapPropagator()
_NO_PROVIDER = (trace.ProxyTracerProvider, trace.NoOpTracerProvider)

Headers = Sequence[tuple[str, bytes]]


def valid_traceparent(value: str) -> bool:
    """Whether ``value`` is a W3C traceparent worth carrying (version, ids not all zero)."""
    m = _TRACEPARENT.fullmatch(value)
    if m is None or m.group(1) == "ff" or (m.group(1) == "00" and m.group(4)):
        return False
    return m.group(2) != "0" * 32 and m.group(3) != "0" * 16


def trace_headers(headers: Headers) -> dict[str, str]:
    """The request's ``traceparent`` and ``tracestate`` (lower-case keys), only when the
    traceparent is valid and both are within their size bounds; else empty."""
    parent: bytes | None = None
    state: bytes | None = None
    for key, value in headers:
        name = key.lower()
        if name == TRACEPARENT:
            parent = value
        elif name == TRACESTATE:
            state = value
    if parent is None or len(parent) > MAX_TRACEPARENT:
        return {}
    try:
        text = parent.decode("ascii")
    except UnicodeDecodeError:
        return {}
    if not valid_traceparent(text):
        return {}
    out = {TRACEPARENT: text}
    if state is not None and 0 < len(state) <= MAX_TRACESTATE:
        try:
            decoded = state.decode("ascii")
        except UnicodeDecodeError:
            return out
        if decoded.isprintable():
            out[TRACESTATE] = decoded
    return out


#: :func:`valid_traceparent` in one expression on the bytes (version ff and zero ids refused).
_TRACEPARENT_B = re.compile(
    rb"(?!ff)[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}(?:-[!-~]*)?"
)
_TRACESTATE_B = re.compile(rb"[ -~]{1,%d}" % MAX_TRACESTATE)


def carried(headers: Headers) -> list[tuple[str, bytes]]:
    """The request's trace headers to put on its result unchanged, when the traceparent is
    valid (the same rule as :func:`trace_headers`, on the bytes: the path without an SDK)."""
    parent: bytes | None = None
    state: bytes | None = None
    for key, value in headers:
        if len(key) == 11 and (key == TRACEPARENT or key.lower() == TRACEPARENT):
            parent = value
        elif len(key) == 10 and (key == TRACESTATE or key.lower() == TRACESTATE):
            state = value
    if (
        parent is None
        or len(parent) > MAX_TRACEPARENT
        or _TRACEPARENT_B.fullmatch(parent) is None
        or (len(parent) != 55 and parent[:2] == b"00")
    ):
        return []
    if state is None or _TRACESTATE_B.fullmatch(state) is None:
        return [(TRACEPARENT, parent)]
    return [(TRACEPARENT, parent), (TRACESTATE, state)]


class BatchTrace:
    """The stage times of one batch; at its end, spans for every request it answered."""

    __slots__ = ("_tracer", "batch_id", "computed_ns", "loaded_ns", "model", "start_ns")

    def __init__(self, tracer: Tracer | None, model: str) -> None:
        self._tracer = tracer
        self.model = model
        self.batch_id = ""
        self.start_ns = time.time_ns() if tracer is not None else 0
        self.loaded_ns = 0
        self.computed_ns = 0

    def loaded(self) -> None:
        """The batch's parameters are in hand."""
        if self._tracer is not None:
            self.loaded_ns = time.time_ns()

    def computed(self) -> None:
        """The forward pass returned."""
        if self._tracer is not None:
            self.computed_ns = time.time_ns()

    def end(self, answers: Sequence[tuple[Item, Result]], error: KvpipeError | None = None) -> None:
        """``batch``, ``load`` and ``compute`` spans under each answered request's ``consume``."""
        tracer = self._tracer
        if tracer is None or not answers:
            return
        end_ns = time.time_ns()
        self.batch_id = uuid.uuid4().hex[:16]
        rows = sum(it.request.rows for it, _ in answers)
        for item, result in answers:
            if item.span is None or not item.span.is_recording():  # sampled out: no children
                continue
            attrs: dict[str, Any] = {
                "kvpipe.model": self.model,
                "kvpipe.batch.id": self.batch_id,
                "kvpipe.batch.requests": len(answers),
                "kvpipe.batch.rows": rows,
            }
            if result.version is not None:
                attrs["kvpipe.version"] = result.version
            parent = trace.set_span_in_context(item.span)
            batch = tracer.start_span("batch", parent, attributes=attrs, start_time=self.start_ns)
            inner = trace.set_span_in_context(batch)
            loaded = self.loaded_ns or end_ns
            load = tracer.start_span("load", inner, start_time=self.start_ns)
            if error is not None and not self.loaded_ns:
                load.set_status(Status(StatusCode.ERROR, f"{error.code}: {error}"[:200]))
            load.end(loaded)
            if self.computed_ns and result.cache != "memo" and result.ok:
                compute = tracer.start_span("compute", inner, start_time=loaded)
                compute.end(self.computed_ns)
            if not result.ok:
                batch.set_status(Status(StatusCode.ERROR, result.error_code or "error"))
            batch.end(end_ns)


class Tracing:
    """The worker's tracing hooks; ``provider`` None means the process's global one."""

    def __init__(self, settings: TracingSettings, provider: TracerProvider | None = None) -> None:
        self.enabled = settings.enabled
        self._copy = frozenset(settings.copy_headers)
        self._provider = provider
        self._checked_at = float("-inf")
        self._global_sdk = False
        self._tracer = (
            trace.get_tracer("kvpipe") if provider is None else provider.get_tracer("kvpipe")
        )

    @classmethod
    def off(cls) -> Tracing:
        """No spans, no trace headers, nothing copied."""
        return cls(TracingSettings(enabled=False))

    @property
    def recording(self) -> bool:
        """Whether spans are made: tracing on and an SDK behind the provider."""
        if not self.enabled:
            return False
        if self._provider is not None:
            return not isinstance(self._provider, _NO_PROVIDER)
        now = time.monotonic()  # the global provider's lookup costs microseconds: once a second
        if now >= self._checked_at + 1.0:
            self._checked_at = now
            self._global_sdk = not isinstance(trace.get_tracer_provider(), _NO_PROVIDER)
        return self._global_sdk

    # -- the stages ------------------------------------------------------------------------

    def consumed(self, items: Sequence[Item], started_ns: int) -> None:
        """Start each request's ``consume`` span (when recording), under its headers' context,
        from ``started_ns`` (when the fetch returned)."""
        if not items or not self.recording:
            return
        for item in items:
            msg = item.message
            carrier = trace_headers(msg.headers)
            parent = _PROPAGATOR.extract(carrier) if carrier else Context()
            item.span = self._tracer.start_span(
                "consume",
                parent,
                kind=SpanKind.CONSUMER,
                attributes=_message_attributes(msg, item.request.id, item.request.model),
                start_time=started_ns,
            )

    def unreadable(self, msg: Message, exc: KvpipeError, started_ns: int) -> None:
        """A ``consume`` span, ended at once with the error, for a message sent to the DLQ."""
        if not self.recording:
            return
        carrier = trace_headers(msg.headers)
        parent = _PROPAGATOR.extract(carrier) if carrier else Context()
        span = self._tracer.start_span(
            "consume",
            parent,
            kind=SpanKind.CONSUMER,
            attributes=_message_attributes(msg, None, None),
            start_time=started_ns,
        )
        span.set_status(Status(StatusCode.ERROR, f"{exc.code}: dead-lettered"))
        span.end()

    def batch(self, model: str) -> BatchTrace:
        """The times of one batch, from now (inert when not recording)."""
        return BatchTrace(self._tracer if self.recording else None, model)

    def result_headers(
        self, item: Item, topic: str, result: Result, headers: list[tuple[str, bytes]]
    ) -> Span | None:
        """Add the trace context and the copied request headers to a result's ``headers``;
        returns the ``produce`` span to end when the broker acknowledges it (when recording)."""
        request_headers = item.message.headers
        if self._copy:
            headers += self._copied(request_headers)
        if not self.enabled:
            return None
        if item.span is None:  # not recording: the request's trace context, as it came
            headers += carried(request_headers)
            return None
        carrier: dict[str, str] = {}
        if not item.span.is_recording():  # sampled out: its context goes on, no more spans
            _PROPAGATOR.inject(carrier, trace.set_span_in_context(item.span))
            headers += [(k, v.encode()) for k, v in carrier.items()]
            return None
        attrs = {
            "messaging.system": "kafka",
            "messaging.operation.type": "send",
            "messaging.destination.name": topic,
            "messaging.message.id": result.id,
            "kvpipe.status": str(result.status),
        }
        if result.error_code is not None:
            attrs["kvpipe.error.code"] = result.error_code
        parent = trace.set_span_in_context(item.span)
        span = self._tracer.start_span("produce", parent, kind=SpanKind.PRODUCER, attributes=attrs)
        if not result.ok:
            span.set_status(Status(StatusCode.ERROR, result.error_code or "error"))
        _PROPAGATOR.inject(carrier, trace.set_span_in_context(span))
        headers += [(k, v.encode()) for k, v in carrier.items()]
        return span

    def sent(self, item: Item, span: Span | None) -> None:
        """The broker acknowledged the answer: end its ``produce`` and ``consume`` spans."""
        if span is not None:
            span.end()
        if item.span is not None:
            item.span.end()
            item.span = None

    def _copied(self, headers: Headers) -> list[tuple[str, bytes]]:
        out: list[tuple[str, bytes]] = []
        for key, value in headers:
            if key.lower() in self._copy and len(value) <= MAX_HEADER_BYTES:
                out.append((key, value))
                if len(out) == MAX_COPY_HEADERS:
                    break
        return out


def _message_attributes(msg: Message, request_id: str | None, model: str | None) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        "messaging.system": "kafka",
        "messaging.operation.type": "process",
        "messaging.destination.name": msg.partition.topic,
        "messaging.destination.partition.id": str(msg.partition.partition),
        "messaging.kafka.offset": msg.offset,
    }
    if request_id:
        attrs["messaging.message.id"] = request_id
    if model:
        attrs["kvpipe.model"] = model
    return attrs


def configure_tracing(settings: TracingSettings, service_name: str = "kvpipe") -> None:
    """At the process edge: with ``otlp_endpoint`` set, install the OpenTelemetry SDK as the
    global provider, exporting over OTLP/HTTP in batches (needs ``kvpipe[tracing]``)."""
    if not settings.enabled or not settings.otlp_endpoint:
        return
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider as SdkProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        raise ConfigError(
            "KVPIPE_OTLP_ENDPOINT is set but the OpenTelemetry SDK is not installed; "
            "pip install 'kvpipe[tracing]'"
        ) from None
    resource = Resource.create()  # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES, if set
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": service_name}))
    provider = SdkProvider(resource=resource)
    exporter = OTLPSpanExporter(endpoint=settings.otlp_endpoint)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    log.info("tracing_configured", endpoint=settings.otlp_endpoint)
