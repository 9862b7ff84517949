"""The client's part of tracing: a request made inside a span carries that span's trace."""

from __future__ import annotations

from opentelemetry.sdk.trace import TracerProvider

from pipeline.client import trace_context


def test_requests_made_inside_a_span_carry_its_trace() -> None:
    assert trace_context() == []  # outside any span: nothing to carry
    tracer = TracerProvider().get_tracer("caller")
    with tracer.start_as_current_span("ask") as span:
        headers = dict(trace_context())
    ctx = span.get_span_context()
    assert list(headers) == ["traceparent"]
    version, trace_id, parent_id, flags = headers["traceparent"].decode().split("-")
    assert (version, trace_id, parent_id) == ("00", f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}")
    assert int(flags, 16) & 1  # sampled
