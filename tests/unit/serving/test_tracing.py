"""Trace context through the worker (real decode -> batch -> compute -> deliver path, Kafka and
Redis replaced at the boundary by fakes): spans under the request's trace when an SDK records,
the trace headers carried as they came with the API alone, nothing with tracing off, and the
copied request headers bounded."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from pipeline.config import MAX_COPY_HEADERS, Settings, settings_from_env, with_values
from pipeline.errors import ConfigError
from pipeline.io.kv.memory import MemoryKV
from pipeline.io.wire import decode_result
from pipeline.params.models import preset
from pipeline.params.store import ParamStore
from pipeline.serving.tracing import Tracing, carried, trace_headers, valid_traceparent
from tests.unit.kafka_fakes import (
    FakeBroker,
    Record,
    fake_worker,
    run_until_committed,
)

MODEL = preset("mlp")
PARAMS = MODEL.init(0)
WIDTH = MODEL.input_dim
PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _settings(**values: Any) -> Settings:
    base = {
        "worker.max_wait_ms": 20.0,
        "worker.commit_interval_s": 0.01,
        "worker.watchdog_s": 0.0,
        "worker.shutdown_timeout_s": 5.0,
        "worker.listen_updates": False,
        "worker.topic_check_s": 0.05,
    }
    base.update(values)
    return with_values(Settings(), base)


def _sdk() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


async def _serve(
    messages: Sequence[tuple[bytes | None, Sequence[tuple[str, bytes]]]],
    settings: Settings | None = None,
    provider: TracerProvider | None = None,
) -> list[Record]:
    """Run a worker on fakes until every message is committed; the result records."""
    settings = settings or _settings()
    k = settings.kafka
    broker = FakeBroker()
    broker.create(k.requests_topic, k.results_topic, k.dlq_topic)
    store = ParamStore(MemoryKV(), prefix="t")
    await store.publish("m", MODEL.arch, PARAMS)
    for value, headers in messages:
        broker.append(k.requests_topic, 0, value, headers)
    worker = fake_worker(settings, broker, store, tracing=Tracing(settings.tracing, provider))
    async with worker:
        await run_until_committed(worker, broker, k.requests_topic)
    assert broker.all_committed(k.requests_topic)
    return broker.records(k.results_topic)


def _request(rid: str, *headers: tuple[str, bytes], rows: int = 1) -> tuple[bytes, list[Any]]:
    x = np.random.default_rng(len(rid)).normal(size=(rows, WIDTH)).round(3).tolist()
    return json.dumps({"id": rid, "model": "m", "inputs": x}).encode(), list(headers)


def _by_name(spans: Sequence[ReadableSpan]) -> dict[str, list[ReadableSpan]]:
    out: dict[str, list[ReadableSpan]] = {}
    for span in spans:
        out.setdefault(span.name, []).append(span)
    return out


# -- the header checks ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        (PARENT, True),
        ("01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra", True),
        ("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra", False),
        ("ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", False),
        ("00-00000000000000000000000000000000-b7ad6b7169203331-01", False),
        ("00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01", False),
        ("00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01", False),
        ("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331", False),
        ("", False),
    ],
)
def test_traceparent_format(value: str, ok: bool) -> None:
    assert valid_traceparent(value) is ok


def test_trace_headers_are_bounded_and_dropped_when_malformed() -> None:
    assert trace_headers([("traceparent", PARENT.encode()), ("tracestate", b"a=1")]) == {
        "traceparent": PARENT,
        "tracestate": "a=1",
    }
    assert trace_headers([("TraceParent", PARENT.encode())]) == {"traceparent": PARENT}
    assert trace_headers([("traceparent", b"\xff" * 55)]) == {}
    assert trace_headers([("traceparent", PARENT.encode() + b"-" + b"x" * 200)]) == {}
    assert trace_headers([("tracestate", b"a=1")]) == {}  # no parent: nothing
    big = [("traceparent", PARENT.encode()), ("tracestate", b"a=" + b"1" * 600)]
    assert trace_headers(big) == {"traceparent": PARENT}
    assert trace_headers([("traceparent", PARENT.encode()), ("tracestate", b"a=\n")]) == {
        "traceparent": PARENT
    }


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["traceparent", "tracestate", "TraceParent", "x"]),
            st.one_of(
                st.binary(max_size=70),
                st.sampled_from([PARENT.encode(), PARENT.encode() + b"-x", b"a=1", b"a=\x01"]),
                st.builds(
                    lambda v, tail: f"{v}-{'a' * 32}-{'b' * 16}-01{tail}".encode(),
                    st.sampled_from(["00", "01", "ff", "0g"]),
                    st.sampled_from(["", "-x", "-\x01", "-\u00e9"]),
                ),
            ),
        ),
        max_size=4,
    )
)
def test_the_bytes_path_carries_what_the_text_path_would(headers: list[tuple[str, bytes]]) -> None:
    text = [(k, v.encode()) for k, v in trace_headers(headers).items()]
    assert carried(headers) == text


def test_copy_headers_setting_refuses_kvpipes_own_and_too_many() -> None:
    env = {"KVPIPE_COPY_HEADERS": "X-Tenant, x-request-source"}
    assert settings_from_env(env).tracing.copy_headers == ("x-tenant", "x-request-source")
    for bad in ("kvpipe-id", "content-type", "traceparent", "x tenant", "a" * 65):
        with pytest.raises(ConfigError, match="KVPIPE_COPY_HEADERS"):
            settings_from_env({"KVPIPE_COPY_HEADERS": bad})
    many = ",".join(f"x-{i}" for i in range(MAX_COPY_HEADERS + 1))
    with pytest.raises(ConfigError, match="at most"):
        settings_from_env({"KVPIPE_COPY_HEADERS": many})


# -- spans with an SDK ----------------------------------------------------------------------


async def test_spans_continue_the_requests_trace_and_the_result_carries_it() -> None:
    provider, exporter = _sdk()
    client = provider.get_tracer("test-client")
    with client.start_as_current_span("client send") as root:
        carrier: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(carrier)
    headers = [(k, v.encode()) for k, v in carrier.items()]
    (record,) = await _serve([_request("r1", *headers)], provider=provider)
    assert decode_result(record.value, record.headers).ok
    spans = _by_name(exporter.get_finished_spans())
    assert sorted(spans) == ["batch", "client send", "compute", "consume", "load", "produce"]
    trace_id = root.get_span_context().trace_id
    assert all(s.context.trace_id == trace_id for group in spans.values() for s in group)
    (consume,), (batch,), (load,), (compute,), (produce,) = (
        spans[n] for n in ("consume", "batch", "load", "compute", "produce")
    )
    assert consume.parent is not None and consume.parent.span_id == root.get_span_context().span_id
    assert consume.kind == trace.SpanKind.CONSUMER and produce.kind == trace.SpanKind.PRODUCER
    assert batch.parent is not None and batch.parent.span_id == consume.context.span_id
    assert load.parent is not None and load.parent.span_id == batch.context.span_id
    assert compute.parent is not None and compute.parent.span_id == batch.context.span_id
    assert produce.parent is not None and produce.parent.span_id == consume.context.span_id
    assert consume.attributes is not None and consume.attributes["messaging.message.id"] == "r1"
    assert batch.start_time is not None and load.end_time is not None
    assert compute.start_time is not None and batch.start_time <= load.start_time
    assert load.end_time <= compute.start_time
    assert consume.end_time is not None and produce.end_time is not None
    assert consume.end_time >= produce.end_time  # ends when the answer is acknowledged
    sent = record.header("traceparent")
    flags = produce.context.trace_flags
    assert sent == f"00-{trace_id:032x}-{produce.context.span_id:016x}-{flags:02x}".encode()


async def test_a_batch_of_many_traces_puts_one_batch_span_in_each() -> None:
    provider, exporter = _sdk()
    client = provider.get_tracer("test-client")
    messages = []
    roots = []
    for i in range(4):
        with client.start_as_current_span(f"send {i}") as root:
            carrier: dict[str, str] = {}
            TraceContextTextMapPropagator().inject(carrier)
        roots.append(root.get_span_context().trace_id)
        messages.append(_request(f"r{i}", *[(k, v.encode()) for k, v in carrier.items()]))
    messages.append(_request("untraced"))  # a new trace of its own
    records = await _serve(messages, provider=provider)
    assert len(records) == 5
    spans = _by_name(exporter.get_finished_spans())
    batches = spans["batch"]
    assert len(batches) == 5 and len(spans["compute"]) == 5
    assert {b.context.trace_id for b in batches} >= set(roots)
    per_batch: dict[Any, list[Any]] = {}
    for b in batches:
        assert b.attributes is not None
        per_batch.setdefault(b.attributes["kvpipe.batch.id"], []).append(b.attributes)
    for members in per_batch.values():  # one batch span per request the batch answered
        assert all(a["kvpipe.batch.requests"] == len(members) for a in members)
    assert max(len(m) for m in per_batch.values()) > 1  # they did share a batch
    for record in records:
        sent = record.header("traceparent")
        assert sent is not None and valid_traceparent(sent.decode())


async def test_errors_and_dead_letters_are_traced_too() -> None:
    provider, exporter = _sdk()
    headers = [("traceparent", PARENT.encode())]
    messages = [
        (b'{"id": "bad", "model": "m", "inputs": [[1.0]]}', headers),  # wrong width
        (b'{"id": "nomodel", "model": "ghost", "inputs": [[1.0]]}', headers),
        (b"\x00 not json", headers),  # to the DLQ
    ]
    records = await _serve(messages, provider=provider)
    codes = sorted(decode_result(r.value, r.headers).error_code or "" for r in records)
    assert codes == ["bad_shape", "unknown_model"]
    spans = _by_name(exporter.get_finished_spans())
    assert len(spans["consume"]) == 3 and len(spans["produce"]) == 2
    assert all(s.status.status_code == trace.StatusCode.ERROR for s in spans["produce"])
    dead = [s for s in spans["consume"] if s.status.status_code == trace.StatusCode.ERROR]
    assert len(dead) == 1
    assert "compute" not in spans
    trace_id = int(PARENT.split("-")[1], 16)
    assert all(s.context.trace_id == trace_id for g in spans.values() for s in g)


async def test_a_sampled_out_request_makes_no_spans_and_its_trace_goes_on() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ALWAYS_OFF)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    (record,) = await _serve([_request("r", ("traceparent", PARENT.encode()))], provider=provider)
    assert exporter.get_finished_spans() == ()
    sent = record.header("traceparent")
    assert sent is not None and valid_traceparent(sent.decode())
    assert sent.split(b"-")[1] == PARENT.split("-")[1].encode()  # the caller's trace
    assert sent.split(b"-")[3] == b"00"  # not sampled, as the SDK decided


# -- no SDK, tracing off, copied headers ----------------------------------------------------


async def test_without_an_sdk_the_trace_headers_are_carried_as_they_came() -> None:
    assert not isinstance(trace.get_tracer_provider(), TracerProvider)  # nothing global here
    headers = [("traceparent", PARENT.encode()), ("tracestate", b"vendor=1")]
    records = await _serve([_request("r", *headers), _request("plain")])
    by_id = {decode_result(r.value, r.headers).id: r for r in records}
    assert by_id["r"].header("traceparent") == PARENT.encode()
    assert by_id["r"].header("tracestate") == b"vendor=1"
    assert by_id["plain"].header("traceparent") is None


async def test_tracing_off_carries_no_trace_and_makes_no_span() -> None:
    provider, exporter = _sdk()
    settings = _settings(**{"tracing.enabled": False})
    headers = [("traceparent", PARENT.encode())]
    (record,) = await _serve([_request("r", *headers)], settings, provider)
    assert record.header("traceparent") is None
    assert exporter.get_finished_spans() == ()


async def test_named_request_headers_are_copied_bounded() -> None:
    settings = _settings(**{"tracing.copy_headers": ("x-tenant", "x-many", "x-big")})
    headers = [
        ("X-Tenant", b"acme"),
        ("x-big", b"b" * 2000),  # over the size bound: left out
        ("kvpipe-reply-to", b"kvpipe.results"),
        *[("x-many", str(i).encode()) for i in range(40)],
    ]
    (record,) = await _serve([_request("r", *headers)], settings)
    assert record.header("X-Tenant") == b"acme"  # as the request named it
    assert record.header("x-big") is None
    copied = [k for k, _ in record.headers if k.lower() in ("x-tenant", "x-many")]
    assert len(copied) == MAX_COPY_HEADERS
    assert [k for k, _ in record.headers].count("kvpipe-reply-to") == 0
    assert decode_result(record.value, record.headers).ok


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["traceparent", "tracestate", "TRACEPARENT", "x-tenant"]),
            st.one_of(
                st.binary(max_size=80),
                st.just(PARENT.encode()),
                st.text(max_size=60).map(lambda t: t.encode("utf-8", "surrogatepass")),
            ),
        ),
        max_size=4,
    )
)
def test_hostile_trace_headers_never_cost_an_answer(headers: list[tuple[str, bytes]]) -> None:
    async def go() -> None:
        provider, _ = _sdk()
        settings = _settings(**{"tracing.copy_headers": ("x-tenant",)})
        (record,) = await _serve([_request("r", *headers)], settings, provider)
        assert decode_result(record.value, record.headers).ok
        sent = record.header("traceparent")
        assert sent is not None and valid_traceparent(sent.decode())

    asyncio.run(go())
