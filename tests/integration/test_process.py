"""The worker as a real process: SIGTERM drains, commits and exits 0; no duplicates after."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from typing import Any

import numpy as np
import pytest

from pipeline.client import ResultStream
from pipeline.config import settings_to_env
from pipeline.io.kafka import Consumer, Partition
from pipeline.io.kv import open_kv
from pipeline.params.models import preset
from pipeline.params.store import ParamStore

pytestmark = pytest.mark.integration


async def spawn_worker(settings: Any, worker_id: str) -> asyncio.subprocess.Process:
    env = {
        **os.environ,
        **settings_to_env(settings),
        "KVPIPE_WORKER_ID": worker_id,
        "KVPIPE_MAX_BATCH": "1",
        "KVPIPE_MAX_IN_FLIGHT": "64",  # SIGTERM drains at most this many; the rest wait
        "KVPIPE_LOG_FORMAT": "json",
    }
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "consumers.inference",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )


async def test_sigterm_drains_commits_and_exits_zero(make_settings: Any, make_client: Any) -> None:
    settings = make_settings()
    model = preset("article")
    params = model.init(0)
    async with open_kv(settings.redis) as kv:
        await ParamStore(kv, prefix=settings.redis.key_prefix).publish("a", model.arch, params)
    client = await make_client(settings)
    n = 3000
    x = np.random.default_rng(1).standard_normal((n, model.input_dim)).astype(np.float32)
    for i in range(n):
        await client.submit("a", x[i : i + 1], id=f"s{i}", wait=False)
    await client.flush()
    k = settings.kafka
    seen: dict[str, int] = {}
    proc = await spawn_worker(settings, "first")
    try:
        async with ResultStream(k, k.results_topic, from_beginning=True) as stream:
            while len(seen) < 100:
                for r in await stream.next_batch(0.2):
                    seen[r.id] = seen.get(r.id, 0) + 1
                assert proc.returncode is None, "worker died"
            proc.send_signal(signal.SIGTERM)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            code = await asyncio.wait_for(proc.wait(), 40)
            drain_s = loop.time() - t0
            assert code == 0, (await proc.stderr.read()).decode()[-2000:]  # type: ignore[union-attr]
            while batch := await stream.next_batch(2.0):
                for r in batch:
                    seen[r.id] = seen.get(r.id, 0) + 1
            first_count = len(seen)
            assert first_count < n, "the worker finished before SIGTERM; make the test slower"
            probe = Consumer(k, [k.requests_topic], group_id=k.group_id)
            async with probe:
                committed = 0
                for p in range(k.partitions):
                    committed += await probe.committed(Partition(k.requests_topic, p)) or 0
            assert committed == first_count  # everything answered is committed, nothing more
            proc = await spawn_worker(settings, "second")
            while len(seen) < n:
                for r in await stream.next_batch(0.5):
                    seen[r.id] = seen.get(r.id, 0) + 1
                assert proc.returncode is None, "second worker died"
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 40) == 0
            while batch := await stream.next_batch(2.0):
                for r in batch:
                    seen[r.id] = seen.get(r.id, 0) + 1
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert set(seen) == {f"s{i}" for i in range(n)}
    assert max(seen.values()) == 1, "duplicates after a clean SIGTERM"
    assert drain_s < 20


@pytest.mark.parametrize(
    ("env", "status", "says"),
    [
        ({"KVPIPE_MAX_BATCH": "0"}, 2, "KVPIPE_MAX_BATCH='0': must be a positive integer"),
        (
            {"KVPIPE_REDIS": "redis://127.0.0.1:1/0", "KVPIPE_REDIS_TIMEOUT": "1"},
            1,
            "Redis at redis://127.0.0.1:1/0 unavailable",
        ),
    ],
)
async def test_the_worker_process_exits_2_for_settings_and_1_at_run_time(
    env: dict[str, str], status: int, says: str
) -> None:
    """The exit statuses of ``kvpipe``: 2 for what the user must change, 1 for run-time
    failures; one line on stderr either way, never a traceback."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "consumers.inference",
        env={**os.environ, **env},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    lines = err.decode().strip().splitlines()
    assert proc.returncode == status, lines
    assert len(lines) == 1 and lines[0].startswith("kvpipe serve: ") and says in lines[0], lines
