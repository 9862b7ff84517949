"""The status of a supervisor's children as one: aggregated ``/metrics`` and ``/readyz``.

Each child serves its own status server on a loopback port it writes to a file
(:class:`~pipeline.serving.supervisor.ChildSlot`). A scrape of the supervisor fetches every
child's exposition and serves them as one, each sample labelled ``child="I"`` (sum them
with ``sum without (child)``), plus the supervisor's own figures.

Ready rule: every child is running and answers its ``/readyz``, at least one child is ready,
and any other child is idle only because it owns no partition (a group with fewer partitions
than processes leaves some children waiting; they take over in a rebalance).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence

from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from pipeline.serving.supervisor import ChildSlot

__all__ = ["IDLE_REASON", "FleetStatus"]

#: The start of a child's not-ready reason when it merely owns no partition.
IDLE_REASON = "no partitions assigned"
#: Seconds one child's status server may take to answer.
CHILD_TIMEOUT_S = 2.0
#: Largest response read from a child's status server.
MAX_BODY_BYTES = 16 * 1024 * 1024


async def http_get(port: int, path: str, timeout_s: float = CHILD_TIMEOUT_S) -> tuple[int, bytes]:
    """GET ``path`` from a loopback status server: (status, body)."""
    async with asyncio.timeout(timeout_s):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            await writer.drain()
            raw = await reader.read(MAX_BODY_BYTES)
        finally:
            writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    parts = head.split(b" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise ConnectionError("not an HTTP response")
    return int(parts[1]), body


class _Merged(Collector):
    """A collector over already collected families (what ``generate_latest`` reads)."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families


class FleetStatus:
    """``render`` and ``ready`` for a supervisor's status server."""

    def __init__(self, slots: Sequence[ChildSlot]) -> None:
        self.slots = slots

    async def _ask(self, slot: ChildSlot, path: str) -> tuple[int, bytes] | None:
        port = slot.status_port() if slot.alive else None
        if port is None:
            return None
        try:
            return await http_get(port, path)
        except (OSError, TimeoutError, ValueError):
            return None

    async def render(self) -> bytes:
        """Every child's metrics labelled by child, and the supervisor's own."""
        answers = await asyncio.gather(*(self._ask(s, "/metrics") for s in self.slots))
        merged: dict[str, Metric] = {}
        for slot, answer in zip(self.slots, answers, strict=True):
            if answer is None or answer[0] != 200:
                continue
            try:
                families = list(text_string_to_metric_families(answer[1].decode()))
            except (ValueError, UnicodeDecodeError):
                continue
            for fam in families:
                into = merged.get(fam.name)
                if into is None:
                    into = merged[fam.name] = Metric(fam.name, fam.documentation, fam.type)
                child = str(slot.index)
                into.samples += [
                    s._replace(labels={**s.labels, "child": child}) for s in fam.samples
                ]
        running = GaugeMetricFamily(
            "kvpipe_supervisor_children", "Worker processes running under the supervisor"
        )
        running.add_metric([], sum(1 for s in self.slots if s.alive))
        restarts = CounterMetricFamily(
            "kvpipe_supervisor_restarts",
            "Times the supervisor started a child again after it exited",
            labels=["child"],
        )
        for slot in self.slots:
            restarts.add_metric([str(slot.index)], slot.restarts)
        return generate_latest(_Merged([*merged.values(), running, restarts]))

    async def ready(self) -> tuple[bool, str]:
        """Ready by the rule in the module's docstring; the reason names each child."""
        answers = await asyncio.gather(*(self._ask(s, "/readyz") for s in self.slots))
        ready = idle = 0
        problems: list[str] = []
        for slot, answer in zip(self.slots, answers, strict=True):
            if not slot.alive:
                problems.append(f"child {slot.index} is down (restarting)")
            elif answer is None:
                problems.append(f"child {slot.index} does not answer yet")
            elif answer[0] == 200:
                ready += 1
            else:
                why = answer[1].decode(errors="replace").strip()
                if why.startswith(IDLE_REASON):
                    idle += 1
                else:
                    problems.append(f"child {slot.index}: {why}")
        if problems:
            return False, "; ".join(problems)
        if ready == 0:
            return False, f"no child owns partitions yet ({idle} waiting)"
        return True, f"ready: {ready} serving, {idle} idle (no partition)"
