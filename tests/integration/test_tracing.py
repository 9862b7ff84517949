"""A trace started by the test's producer continues through a real worker (local Redis and
broker): the worker's spans are its children and the result carries it."""

from __future__ import annotations

import asyncio
import http.server
import os
import subprocess
import sys
import threading
from typing import Any

import numpy as np
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from consumers.inference import start_serving
from pipeline.io.kafka import Consumer, Producer, ensure_topics
from pipeline.io.kv import open_kv
from pipeline.io.wire import decode_result, encode_request
from pipeline.params.models import preset
from pipeline.params.store import ParamStore
from pipeline.serving.tracing import Tracing

pytestmark = pytest.mark.integration


async def test_the_workers_spans_are_children_of_the_producers_trace(make_settings: Any) -> None:
    settings = make_settings(**{"tracing.copy_headers": ("x-tenant",)})
    k = settings.kafka
    model = preset("mlp")
    params = model.init(0)
    async with open_kv(settings.redis) as kv:
        await ParamStore(kv, prefix=settings.redis.key_prefix).publish("m", model.arch, params)
    await ensure_topics(k, [k.requests_topic, k.results_topic, k.dlq_topic, k.updates_topic])
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    x = np.random.default_rng(3).standard_normal((2, model.input_dim)).astype(np.float32)

    stop = asyncio.Event()
    _, task = await start_serving(
        settings, stop, timeout_s=30, tracing=Tracing(settings.tracing, provider)
    )
    try:
        tracer = provider.get_tracer("test-producer")
        async with Producer(k) as producer:
            with tracer.start_as_current_span("send request", kind=trace.SpanKind.PRODUCER) as root:
                value, headers = encode_request(id="traced", model="m", inputs=x)
                carrier: dict[str, str] = {}
                TraceContextTextMapPropagator().inject(carrier)
                headers += [(name, text.encode()) for name, text in carrier.items()]
                headers.append(("x-tenant", b"acme"))
                await producer.send(k.requests_topic, value, key=b"traced", headers=headers)
        async with Consumer(k, [k.results_topic], group_id=None, assign_from="start") as results:
            got: list[Any] = []
            for _ in range(150):
                got += await results.getmany(timeout_ms=200, max_records=10)
                if got:
                    break
        assert len(got) == 1
        (message,) = got
        result = decode_result(message.value or b"", message.headers)
        assert result.ok and result.id == "traced"
        np.testing.assert_allclose(result.outputs, model.forward(params, x), rtol=1e-5)
        names = {"consume", "batch", "load", "compute", "produce"}
        for _ in range(100):  # the worker ends its spans when the broker acknowledges
            finished = {s.name: s for s in exporter.get_finished_spans()}
            if names <= finished.keys():
                break
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)

    root_ctx = root.get_span_context()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert names | {"send request"} == spans.keys()
    assert all(s.context.trace_id == root_ctx.trace_id for s in spans.values())

    def parent(name: str) -> int | None:
        p = spans[name].parent
        return None if p is None else p.span_id

    assert parent("consume") == root_ctx.span_id
    assert parent("batch") == spans["consume"].context.span_id
    assert parent("load") == parent("compute") == spans["batch"].context.span_id
    assert parent("produce") == spans["consume"].context.span_id
    assert spans["batch"].attributes is not None
    assert spans["batch"].attributes["kvpipe.batch.rows"] == 2
    carried = dict(message.headers)
    produce = spans["produce"].context
    assert carried["traceparent"] == (
        f"00-{root_ctx.trace_id:032x}-{produce.span_id:016x}-{produce.trace_flags:02x}".encode()
    )
    assert carried["x-tenant"] == b"acme"


async def test_a_client_request_made_inside_a_span_continues_its_trace(
    make_settings: Any, make_client: Any
) -> None:
    settings = make_settings()
    k = settings.kafka
    model = preset("mlp")
    async with open_kv(settings.redis) as kv:
        await ParamStore(kv, prefix=settings.redis.key_prefix).publish(
            "m", model.arch, model.init(0)
        )
    client = await make_client(settings)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    stop = asyncio.Event()
    _, task = await start_serving(
        settings, stop, timeout_s=30, tracing=Tracing(settings.tracing, provider)
    )
    try:
        x = np.zeros((1, model.input_dim), np.float32)
        with provider.get_tracer("caller").start_as_current_span("ask") as root:
            await client.submit("m", x, id="from-client")
        async with Consumer(k, [k.results_topic], group_id=None, assign_from="start") as results:
            got: list[Any] = []
            for _ in range(150):
                got += await results.getmany(timeout_ms=200, max_records=10)
                if got:
                    break
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    assert len(got) == 1
    carried = dict(got[0].headers)
    trace_id = f"{root.get_span_context().trace_id:032x}"
    assert carried["traceparent"].decode().split("-")[1] == trace_id
    for _ in range(100):
        consume = [s for s in exporter.get_finished_spans() if s.name == "consume"]
        if consume:
            break
        await asyncio.sleep(0.05)
    assert consume and consume[0].parent is not None
    assert consume[0].parent.span_id == root.get_span_context().span_id


def test_kvpipe_otlp_endpoint_exports_spans_over_otlp_http() -> None:
    """``KVPIPE_OTLP_ENDPOINT`` at the process edge: the SDK sends spans to a collector (a
    loopback HTTP server here, on a free port, stopped whatever happens)."""
    posts: list[tuple[str, str, int]] = []

    class Collector(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("content-length", "0"))
            body = self.rfile.read(length)
            posts.append((self.path, self.headers.get("content-type", ""), len(body)))
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            return

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1/traces"
        script = (
            "from opentelemetry import trace\n"
            "from pipeline.config import settings_from_env\n"
            "from pipeline.serving.tracing import configure_tracing\n"
            "import os\n"
            "configure_tracing(settings_from_env(os.environ).tracing)\n"
            "trace.get_tracer('t').start_span('exported').end()\n"
            "trace.get_tracer_provider().shutdown()\n"
        )
        env = {**os.environ, "KVPIPE_OTLP_ENDPOINT": url, "OTEL_SERVICE_NAME": "kvpipe-test"}
        done = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
    finally:
        server.shutdown()
        server.server_close()
    assert [(p, t) for p, t, _ in posts] == [("/v1/traces", "application/x-protobuf")]
    assert posts[0][2] > 0
