"""The supervisor's /metrics and /readyz over its children, each a small loopback server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from pipeline.serving.fleet import IDLE_REASON, FleetStatus
from pipeline.serving.supervisor import ChildSlot


class Running:
    """Stands in for a running child's process."""

    returncode: int | None = None
    pid = 4242


@asynccontextmanager
async def child(slot: ChildSlot, ready: tuple[int, str], metrics: str) -> AsyncIterator[None]:
    """A status server for ``slot`` answering ``/readyz`` and ``/metrics`` as told."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        path = head.split(b" ")[1]
        status, body = ready if path == b"/readyz" else (200, metrics)
        writer.write(f"HTTP/1.1 {status} X\r\nConnection: close\r\n\r\n{body}".encode())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    slot.proc = Running()  # type: ignore[assignment]
    slot.port_file.write_text(str(server.sockets[0].getsockname()[1]))
    try:
        yield
    finally:
        server.close()
        await server.wait_closed()


METRICS = """# HELP kvpipe_requests_total Requests fetched from Kafka
# TYPE kvpipe_requests_total counter
kvpipe_requests_total {n}
"""


def slots(tmp_path: Path, n: int) -> list[ChildSlot]:
    return [ChildSlot(i, tmp_path / f"child-{i}.port") for i in range(n)]


async def test_metrics_are_every_childs_labelled_by_child(tmp_path: Path) -> None:
    a, b = slots(tmp_path, 2)
    a.starts, b.starts = 1, 3  # b was started again twice
    async with (
        child(a, (200, "ready"), METRICS.format(n=5)),
        child(b, (200, "ready"), METRICS.format(n=7)),
    ):
        body = (await FleetStatus([a, b]).render()).decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(body)
        for s in fam.samples
    }
    assert samples[("kvpipe_requests_total", (("child", "0"),))] == 5
    assert samples[("kvpipe_requests_total", (("child", "1"),))] == 7
    assert samples[("kvpipe_supervisor_children", ())] == 2
    assert samples[("kvpipe_supervisor_restarts_total", (("child", "1"),))] == 2
    assert body.count("# TYPE kvpipe_requests_total counter") == 1  # one family, two children


async def test_ready_when_all_run_one_serves_and_the_rest_only_lack_a_partition(
    tmp_path: Path,
) -> None:
    a, b, c = slots(tmp_path, 3)
    fleet = FleetStatus([a, b, c])
    idle = (503, f"{IDLE_REASON} yet")
    async with child(a, (200, "ready"), ""), child(b, idle, ""), child(c, idle, ""):
        ok, why = await fleet.ready()
        assert ok and "1 serving, 2 idle" in why
    async with child(a, idle, ""), child(b, idle, ""), child(c, idle, ""):
        ok, why = await fleet.ready()
        assert not ok and "no child owns partitions" in why
    async with child(a, (200, "ready"), ""), child(b, (503, "redis unreachable: x"), ""):
        c.proc = None  # down, being restarted
        ok, why = await fleet.ready()
        assert not ok
        assert "child 1: redis unreachable: x" in why and "child 2 is down" in why
