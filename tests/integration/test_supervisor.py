"""``kvpipe serve --processes 2`` as a real process on the real services: a SIGKILLed child is
started again and nothing is lost; one ``/metrics`` and ``/readyz`` for both children; logs
say which child; SIGTERM drains every child and the supervisor exits 0."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.config import Settings, settings_to_env
from pipeline.io.kafka import Consumer, Partition
from pipeline.io.kv import open_kv
from pipeline.params.models import preset
from pipeline.params.store import ParamStore
from pipeline.serving.fleet import http_get

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _events(log: Path) -> list[dict[str, Any]]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict):
                out.append(event)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def _until(check: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (found := check()):
        assert loop.time() < deadline, f"not within {timeout:g} s: {what}"
        await asyncio.sleep(0.1)
    return found


async def test_a_sigkilled_child_is_restarted_and_nothing_is_lost(
    make_settings: Callable[..., Settings], make_client: Any, tmp_path: Path
) -> None:
    settings = make_settings()
    model = preset("mlp")
    params = model.init(3)
    async with open_kv(settings.redis) as kv:
        await ParamStore(kv, prefix=settings.redis.key_prefix).publish("m", model.arch, params)
    client = await make_client(settings)
    port = _free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("KVPIPE_")},
        **settings_to_env(settings),
        "KVPIPE_PROCESSES": "2",
        "KVPIPE_WORKER_ID": "sup",
        "KVPIPE_METRICS_PORT": str(port),
        "KVPIPE_LOG_FORMAT": "json",
        "KVPIPE_MAX_IN_FLIGHT": "128",
    }
    log = tmp_path / "supervisor.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "consumers.inference", env=env, stdout=out, stderr=out
        )
    try:
        status, why = 0, b""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 90
        while True:
            with contextlib.suppress(OSError, TimeoutError, ConnectionError):
                status, why = await http_get(port, "/readyz")
                if status == 200:
                    break
            assert proc.returncode is None, log.read_text()[-3000:]
            assert loop.time() < deadline, f"never ready: {why!r}"
            await asyncio.sleep(0.2)
        assert b"serving" in why

        def started() -> dict[int, list[int]]:
            pids: dict[int, list[int]] = {}
            for e in _events(log):
                if e.get("event") == "child_started":
                    pids.setdefault(e["child"], []).append(e["pid"])
            return pids

        first = await _until(lambda: (p := started()) and len(p) == 2 and p, "two children")
        # every line a child logs says which child it is
        assert {e["child"] for e in _events(log) if e.get("event") == "worker_started"} == {0, 1}

        n = 4000
        x = np.random.default_rng(4).standard_normal((n, model.input_dim)).astype(np.float32)
        ids = [f"s{i}" for i in range(n)]
        async with client.stream(from_beginning=True) as stream:
            got: dict[str, list[Any]] = {}

            async def read() -> None:
                while len(got) < n:
                    for r in await stream.next_batch(0.2):
                        got.setdefault(r.id, []).append(r)

            reader = asyncio.create_task(read())
            for i in range(n // 2):
                await client.submit("m", x[i : i + 1], id=ids[i], wait=False)
                if i % 100 == 99:
                    await client.flush()
                    await asyncio.sleep(0.05)
            await client.flush()
            # both children answer; then child 0 is killed while the stream goes on
            await _until(
                lambda: {r.worker for rs in got.values() for r in rs} >= {"sup-0", "sup-1"},
                "answers from both children",
            )
            victim = first[0][-1]
            os.kill(victim, signal.SIGKILL)
            for i in range(n // 2, n):
                await client.submit("m", x[i : i + 1], id=ids[i], wait=False)
                if i % 100 == 99:
                    await client.flush()
                    await asyncio.sleep(0.05)
            await client.flush()
            await asyncio.wait_for(reader, 120)
            again = await _until(lambda: len(started().get(0, [])) >= 2 and started(), "restart")
            assert again[0][-1] != victim and again[1] == first[1]
            assert not _alive(victim)
        expected = model.forward(params, x)
        for i, rid in enumerate(ids):
            r = got[rid][0]
            assert r.ok, r.error_message
            np.testing.assert_allclose(r.outputs[0], expected[i], rtol=1e-4, atol=1e-5)
        exited = [e for e in _events(log) if e.get("event") == "child_exited"]
        assert [(e["child"], e["pid"], e["status"]) for e in exited] == [
            (0, victim, -signal.SIGKILL)
        ]

        # one /metrics for both children, each sample labelled by child
        status, body = await http_get(port, "/metrics")
        text = body.decode()
        assert status == 200
        assert 'kvpipe_requests_total{child="0"}' in text
        assert 'kvpipe_requests_total{child="1"}' in text
        assert 'kvpipe_supervisor_restarts_total{child="0"} 1.0' in text
        assert "kvpipe_supervisor_children 2.0" in text
        # the restarted child rejoins the group: ready again
        deadline = loop.time() + 60
        while (await http_get(port, "/readyz"))[0] != 200:
            assert loop.time() < deadline, "not ready again after the restart"
            await asyncio.sleep(0.2)

        # SIGTERM: every child drains, the supervisor exits 0, no child is left
        live = [pids[-1] for pids in started().values()]
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 60) == 0, log.read_text()[-3000:]
        assert not any(_alive(pid) for pid in live)
        drained = [e for e in _events(log) if e.get("event") == "worker_drained"]
        assert sorted(e["child"] for e in drained) == [0, 1]
        assert all(e["complete"] for e in drained)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    # nothing lost: every request answered and committed by the group
    k = settings.kafka
    async with Consumer(k, [k.requests_topic], group_id=k.group_id) as probe:
        committed = 0
        for p in range(k.partitions):
            committed += await probe.committed(Partition(k.requests_topic, p)) or 0
    assert committed == n
