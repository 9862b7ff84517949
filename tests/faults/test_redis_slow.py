"""Redis slow: a loopback proxy in the test delays every reply. Calls finish or time out within
their bound, heartbeats stay healthy (no rebalance), and single-flight keeps loads to one per key.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import pytest
import pytest_asyncio

from pipeline.client import InferenceClient
from pipeline.io.kv import open_kv
from pipeline.params.models import preset
from pipeline.params.store import ParamStore
from tests.integration.conftest import collect

# A RESP array whose first two items are GET/HGET/HMGET and a key (what a load sends).
READ = re.compile(rb"\*\d+\r\n\$\d+\r\n(GET|HGET|HMGET|HGETALL)\r\n\$\d+\r\n([^\r]*)\r\n", re.I)


class SlowProxy:
    """A TCP proxy on a free loopback port that holds every reply chunk for ``delay_s``
    and counts the reads it forwards, per key."""

    def __init__(self, target_port: int, delay_s: float) -> None:
        self.target_port = target_port
        self.delay_s = delay_s
        self.reads: Counter[str] = Counter()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in self._writers:
            w.close()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers |= {writer, up_writer}
        for pump in (self._requests(reader, up_writer), self._replies(up_reader, writer)):
            task = asyncio.create_task(pump)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _requests(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await src.read(65536):
                for m in READ.finditer(data):
                    self.reads[m.group(2).decode()] += 1
                dst.write(data)
                await dst.drain()
        dst.close()

    async def _replies(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await src.read(65536):
                await asyncio.sleep(self.delay_s)
                dst.write(data)
                await dst.drain()
        dst.close()


@pytest_asyncio.fixture
async def slow_proxy() -> AsyncIterator[Any]:
    proxies: list[SlowProxy] = []

    async def make(target_port: int, delay_s: float) -> SlowProxy:
        proxy = SlowProxy(target_port, delay_s)
        await proxy.start()
        proxies.append(proxy)
        return proxy

    try:
        yield make
    finally:
        for proxy in proxies:
            await proxy.aclose()


def via(url: str, port: int) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit(":", 1)[0] + f":{port}"
    return urlunsplit(parts._replace(netloc=netloc))


@pytest.mark.parametrize("backend", ["redis-py", "asyncio-redis"])
async def test_slow_redis(fault_stack: Any, slow_proxy: Any, backend: str) -> None:
    fleet = await fault_stack(KVPIPE_VERSION_TTL="0.5", KVPIPE_REDIS_BACKEND=backend)
    model, params = await fleet.publish_mlp("m", seed=8)
    proxy = await slow_proxy(fleet.redis.port, 0.2)
    # 200 ms per reply, a 1 s bound per call: every call completes, only later.
    worker = await fleet.serve_here(
        "w", values={"redis.url": via(fleet.redis.url, proxy.port), "redis.timeout_s": 1.0}
    )
    start_reads = proxy.reads.copy()
    n = 1500
    x = np.random.default_rng(8).standard_normal((n, 32)).astype(np.float32)
    expected = model.forward(params, x)
    loop = asyncio.get_running_loop()
    async with (
        InferenceClient(fleet.settings.kafka) as client,
        client.stream(from_beginning=True) as stream,
    ):
        began = loop.time()
        for i in range(n):  # a cold burst of 300, then ~500 requests/s for about 2.5 s
            await client.submit("m", x[i : i + 1], id=f"a{i}", wait=False)
            if i >= 300 and i % 50 == 49:
                await client.flush()
                await asyncio.sleep(0.1)
        await client.flush()
        got = await collect(stream, {f"a{i}" for i in range(n)}, timeout=60)
        slow_s = loop.time() - began

        # Slower than the bound: 1.5 s per reply against 1 s. The warm model answers stale;
        # a model never loaded answers params_unavailable; nothing waits past the bound.
        reads_before_late = proxy.reads.copy()
        proxy.delay_s = 1.5
        cold_model = preset("mlp")
        async with open_kv(fleet.settings.redis) as kv:  # published directly, not via the proxy
            await ParamStore(kv, prefix=fleet.settings.redis.key_prefix).publish(
                "cold", cold_model.arch, cold_model.init(9)
            )
        await asyncio.sleep(1.0)  # the warm pointer expires
        m = 200
        for i in range(m):
            await client.submit("m", x[i : i + 1], id=f"b{i}", wait=False)
            await client.submit("cold", x[i : i + 1], id=f"c{i}", wait=False)
        await client.flush()
        sent = loop.time()
        want = {f"b{i}" for i in range(m)} | {f"c{i}" for i in range(m)}
        late = await collect(stream, want, timeout=60)
        late_s = loop.time() - sent
    reads = proxy.reads - start_reads - (proxy.reads - reads_before_late)
    assert set(got) == {f"a{i}" for i in range(n)}
    for i in range(n):
        r = got[f"a{i}"][0]
        assert r.ok and not r.stale, (r.error_code, r.error_message)
        np.testing.assert_allclose(r.outputs[0], expected[i], rtol=1e-4, atol=1e-5)  # type: ignore[index]
    # Single-flight under 200 ms replies: a cold burst of 300 reads each tensor once, and the
    # pointer (with its manifest) once per expiry, not once per request or batch.
    tensor_reads = {k: c for k, c in reads.items() if ":t:" in k}
    assert len(tensor_reads) == 4 and set(tensor_reads.values()) == {1}, reads
    pointer_reads = reads[f"{fleet.settings.redis.key_prefix}:m:current"]
    assert 1 <= pointer_reads <= slow_s / 0.5 + 2, reads
    assert worker.stats.rebalances == 0, "a heartbeat was missed while Redis was slow"
    assert worker.stats.commit_failures == 0

    assert set(late) == want
    bound_ms = (2 * 1.0 + worker.settings.redis.connect_timeout_s + 1.0) * 1000  # the backstop
    codes = Counter(r[0].error_code or r[0].cache for r in late.values())
    for i in range(m):
        warm, cold = late[f"b{i}"][0], late[f"c{i}"][0]
        assert warm.ok and warm.stale, (warm.error_code, warm.error_message)
        np.testing.assert_allclose(warm.outputs[0], expected[i], rtol=1e-4, atol=1e-5)  # type: ignore[index]
        assert cold.error_code == "params_unavailable", (cold.error_code, cold.error_message)
        assert warm.timings["load_ms"] <= bound_ms
    print(
        f"\nslow Redis ({backend}): {n} requests at 200 ms per reply: all answered fresh and "
        f"correct in {slow_s:.1f} s; reads per key {dict(reads)}; 0 rebalances. Then 1.5 s per "
        f"reply against a 1 s bound: {2 * m} answered in {late_s:.1f} s, by source {dict(codes)}"
    )
