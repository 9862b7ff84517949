"""Corrupt parameters, secrets in logs, and a worker that cannot reach Redis at start."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import time
from typing import Any
from urllib.parse import quote, quote_plus

import numpy as np
import pytest
import structlog

from pipeline.client import InferenceClient
from pipeline.dev.local import free_port
from pipeline.io.kv import open_kv
from pipeline.logging import configure_logging
from pipeline.params.models import preset
from pipeline.params.store import ParamStore
from tests.integration.test_metrics import http_get

pytestmark = pytest.mark.integration


async def test_tampered_tensor_is_refused_and_logged_once(
    make_settings: Any, start_worker: Any, make_client: Any
) -> None:
    settings = make_settings()
    model = preset("mlp")
    async with open_kv(settings.redis) as kv:
        store = ParamStore(kv, prefix=settings.redis.key_prefix)
        manifest = await store.publish("m", model.arch, model.init(0))
        key = store.tensor_key("m", manifest.version, "w1")
        raw = bytearray(await kv.get(key) or b"")
        raw[-5] ^= 0x40
        await kv.set(key, bytes(raw))
    await make_client(settings)
    stream = io.StringIO()
    configure_logging(fmt="json", level="info", stream=stream)
    try:
        await start_worker(settings)
        async with InferenceClient(settings.kafka) as client:
            results = [await client.infer("m", np.ones((1, 32)), timeout=30) for _ in range(5)]
    finally:
        structlog.reset_defaults()
    assert all(r.error_code == "params_corrupt" and r.outputs is None for r in results)
    logs = stream.getvalue()
    assert logs.count('"event": "params_corrupt"') == 1, logs[-3000:]


async def test_secrets_never_reach_the_logs(
    redis_factory: Any, make_settings: Any, start_worker: Any, make_client: Any
) -> None:
    secret = "s3cr3t-Hunter2"
    server = await redis_factory(password=secret)
    settings = make_settings(redis__url=server.url, redis__timeout_s=0.5, cache__version_ttl_s=0.3)
    assert secret in settings.redis.url
    model = preset("mlp")
    async with open_kv(settings.redis) as kv:
        await ParamStore(kv, prefix=settings.redis.key_prefix).publish(
            "m", model.arch, model.init(0)
        )
    await make_client(settings)
    stream = io.StringIO()
    configure_logging(fmt="json", level="debug", stream=stream)
    try:
        await start_worker(settings)
        async with InferenceClient(settings.kafka) as client:
            assert (await client.infer("m", np.ones((1, 32)), timeout=30)).ok
            server.kill()  # errors now name the Redis URL: they must not carry the password
            await asyncio.sleep(0.4)
            down = await client.infer("cold", np.ones((1, 32)), timeout=30)
    finally:
        structlog.reset_defaults()
    assert down.error_code == "params_unavailable"
    assert secret not in (down.error_message or "")
    logs = stream.getvalue()
    assert "unavailable" in logs and "***" in logs
    assert secret not in logs


def test_worker_without_redis_fails_fast_with_one_line() -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    started = time.monotonic()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "serve",
            "--redis",
            dead,
            "--kafka",
            f"127.0.0.1:{free_port()}",
        ],
        env={k: v for k, v in os.environ.items() if not k.startswith("KVPIPE_")},
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert out.returncode == 1  # a failure at run time (2 is for usage errors)
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith("kvpipe serve: error: Redis at redis://127.0.0.1:")
    assert "Traceback" not in out.stderr
    assert time.monotonic() - started < 10


#: A password given as a query parameter; '/' and '+' must be percent-encoded there.
QUERY_SECRET = "q-S3cr3t/pw+x"


def _secret_forms(secret: str) -> tuple[str, ...]:
    return (secret, quote(secret, safe=""), quote_plus(secret))


async def test_a_query_password_never_reaches_results_logs_or_readyz(
    redis_factory: Any, make_settings: Any, start_worker: Any, make_client: Any
) -> None:
    server = await redis_factory(password=QUERY_SECRET)
    url = f"redis://127.0.0.1:{server.port}/0?password={quote(QUERY_SECRET, safe='')}"
    settings = make_settings(
        redis__url=url, redis__timeout_s=0.5, cache__version_ttl_s=0.3, worker__metrics_port=0
    )
    model = preset("mlp")
    async with open_kv(settings.redis) as kv:  # the query password is what logs in
        await ParamStore(kv, prefix=settings.redis.key_prefix).publish(
            "m", model.arch, model.init(0)
        )
    await make_client(settings)
    stream = io.StringIO()
    configure_logging(fmt="json", level="debug", stream=stream)
    try:
        running = await start_worker(settings)
        async with InferenceClient(settings.kafka) as client:
            assert (await client.infer("m", np.ones((1, 32)), timeout=30)).ok
            server.kill()
            await asyncio.sleep(0.4)
            down = await client.infer("cold", np.ones((1, 32)), timeout=30)
        metrics = running.worker.metrics
        assert metrics is not None and metrics.served_on is not None
        status, why = await http_get(metrics.served_on[1], "/readyz")
    finally:
        structlog.reset_defaults()
    assert down.error_code == "params_unavailable"
    message = down.error_message or ""
    logs = stream.getvalue()
    ready = why.decode()
    assert status == 503
    for text in (message, ready):
        assert "password=***" in text, text
    assert "password=***" in logs
    for form in _secret_forms(QUERY_SECRET):
        assert form not in message and form not in ready and form not in logs, form


def test_cli_errors_never_show_a_password_in_any_url_form() -> None:
    pw = quote(QUERY_SECRET, safe="")
    for template in (
        "redis://127.0.0.1:{port}/0?password={pw}",
        "redis://127.0.0.1:{port}/0?username=default&password={pw}",
        "rediss://127.0.0.1:{port}/0?password={pw}",
        "unix:///nonexistent/redis-{port}.sock?password={pw}",
        "redis://:{pw}@127.0.0.1:{port}/0",
        "redis://{pw}@127.0.0.1:{port}/0",
        "redis://:{pw}@127.0.0.1:99999/0",
    ):
        url = template.format(port=free_port(), pw=pw)
        out = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "publish", "--model", "m", "--preset", "mlp"],
            env={
                **{k: v for k, v in os.environ.items() if not k.startswith("KVPIPE_")},
                "KVPIPE_REDIS": url,
                "KVPIPE_REDIS_TIMEOUT": "1",
            },
            capture_output=True,
            text=True,
            timeout=30,
        )
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        usage = "99999" in template  # a port that cannot be is a usage error; the rest fail
        assert out.returncode == (2 if usage else 1), (template, out.stderr[-2000:])
        assert len(lines) == 1, (template, out.stderr[-2000:])
        assert lines[0].startswith("kvpipe publish: error: ") and "***" in lines[0], lines
        for form in _secret_forms(QUERY_SECRET):
            assert form not in out.stderr + out.stdout, (template, lines)
