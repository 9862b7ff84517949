"""The worker's status server: /metrics, /healthz, /readyz on a real worker."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from pipeline.client import ResultStream
from pipeline.io.kv import open_kv
from pipeline.metrics import METRIC_NAMES, iter_names
from pipeline.params.models import preset
from pipeline.params.store import ParamStore
from tests.integration.conftest import collect

pytestmark = pytest.mark.integration


async def http_get(port: int, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def sample(body: bytes, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in body.decode().splitlines():
        if line.startswith(f"{name}{{{want}}}" if want else f"{name} "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} {labels} not in the exposition")


async def test_metrics_health_and_readiness(
    make_settings: Any, start_worker: Any, make_client: Any
) -> None:
    settings = make_settings(worker__metrics_port=0)
    model = preset("mlp")
    async with open_kv(settings.redis) as kv:
        await ParamStore(kv, prefix=settings.redis.key_prefix).publish(
            "m", model.arch, model.init(0)
        )
    client = await make_client(settings)
    k = settings.kafka
    async with ResultStream(k, k.results_topic, from_beginning=True) as stream:
        running = await start_worker(settings)
        metrics = running.worker.metrics
        assert metrics is not None and metrics.served_on is not None
        for i in range(50):
            await client.submit("m", np.zeros((1, 32)), id=f"m{i}", wait=False)
        await client.submit("ghost", np.zeros((1, 32)), id="ghost")
        await client.submit_raw(b"\xff junk")
        await collect(stream, {f"m{i}" for i in range(50)} | {"ghost"})
        port = metrics.served_on[1]
        assert (await http_get(port, "/healthz"))[0] == 200
        status, why = await http_get(port, "/readyz")
        assert status == 200, why
        status, body = await http_get(port, "/metrics")
        assert status == 200
        names = set(iter_names(body))
        assert set(METRIC_NAMES) <= names, set(METRIC_NAMES) - names
        assert sample(body, "kvpipe_results_total", code="", model="m", status="ok") == 50
        # a name nobody published is never a label value (clients choose names freely)
        assert (
            sample(
                body, "kvpipe_results_total", code="unknown_model", model="other", status="error"
            )
            == 1
        )
        assert b'model="ghost"' not in body
        assert sample(body, "kvpipe_served_version", model="m") == 1
        assert sample(body, "kvpipe_cache_loads_total") == 5  # pointer (+manifest), 4 tensors
        assert sample(body, "kvpipe_requests_total") == 52
        assert (await http_get(port, "/nope"))[0] == 404
