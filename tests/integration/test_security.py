"""Corrupt parameters, secrets in logs, and a worker that cannot reach Redis at start."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import time
from typing import Any

import numpy as np
import pytest
import structlog

from pipeline.client import InferenceClient
from pipeline.kv import open_kv
from pipeline.local import free_port
from pipeline.logging import configure_logging
from pipeline.models import preset
from pipeline.store import ParamStore

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
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith("kvpipe serve: error: Redis at redis://127.0.0.1:")
    assert "Traceback" not in out.stderr
    assert time.monotonic() - started < 10
