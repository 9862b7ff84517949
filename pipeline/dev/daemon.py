"""Detached local services for ``kvpipe local up|down``: started in their own session, their
pids and addresses kept in a state file, stopped by pid."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any

from pipeline.dev.cluster import (
    cluster_args,
    cluster_url,
    find_redis_cli,
    form_cluster,
    free_cluster_port,
)
from pipeline.dev.local import _LIVE, KafkaBroker, RedisServer, _wait_ready
from pipeline.errors import LocalServiceError

__all__ = ["STATE_FILE", "local_down", "local_up"]

STATE_FILE = "local.json"


def _spawn_detached(argv: list[str], env: Mapping[str, str], log_path: Path) -> int:
    """Start ``argv`` in its own session with output to ``log_path``; return its pid."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        return os.posix_spawn(
            argv[0],
            argv,
            env,
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, fd, 1),
                (os.POSIX_SPAWN_DUP2, fd, 2),
            ],
            setsid=True,
        )
    except (OSError, NotImplementedError) as exc:
        raise LocalServiceError(f"cannot run {argv[0]}: {exc}") from exc
    finally:
        os.close(fd)


def _child_exit_code(pid: int) -> int | None:
    """The exit code of our child ``pid`` once it has exited (reaping it), else None."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None if _pid_alive(pid) else -1
    return os.waitstatus_to_exitcode(status) if done else None


def _pid_alive(pid: int, binary: str | None = None) -> bool:
    """Whether ``pid`` runs (not a zombie) and, where /proc tells, runs ``binary``."""
    if pid <= 0:
        return False
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0]:
            return False  # our own child, just exited and now reaped
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return binary is None  # someone else's process: not one we started
    proc = Path(f"/proc/{pid}")
    with contextlib.suppress(OSError, IndexError):
        if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    if binary is not None:  # guard against a recycled pid (redis rewrites its cmdline)
        with contextlib.suppress(OSError):
            return os.readlink(proc / "exe") == os.path.realpath(binary)
    return True


def _terminate(pids: list[int], timeout: float) -> None:
    """SIGTERM ``pids``, wait up to ``timeout`` seconds, then SIGKILL the rest."""
    for pid in pids:
        for sig in (signal.SIGTERM, signal.SIGCONT):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [pid for pid in alive if _pid_alive(pid)]
    for pid in alive:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 2.0
    while alive and time.monotonic() < deadline:
        time.sleep(0.02)
        alive = [pid for pid in alive if _pid_alive(pid)]


def _run_sync(make: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run a coroutine to completion from sync code, even when a loop runs in this thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        loop = asyncio.new_event_loop()  # not asyncio.run: leave the current loop alone
        try:
            loop.run_until_complete(make())
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
        return
    errors: list[BaseException] = []

    def runner() -> None:
        try:
            asyncio.run(make())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=runner, name="kvpipe-local-wait")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


def _read_state(state_dir: Path) -> dict[str, Any] | None:
    try:
        state = json.loads((state_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def _state_pids(state: Mapping[str, Any]) -> list[tuple[int, str | None]]:
    pids = []
    for name in ("redis", "kafka"):
        pid, binary = state.get(f"{name}_pid"), state.get(f"{name}_binary")
        if isinstance(pid, int):
            pids.append((pid, binary if isinstance(binary, str) else None))
    binary = state.get("redis_binary")
    for pid in state.get("redis_cluster_pids") or ():  # the nodes of a local cluster
        if isinstance(pid, int):
            pids.append((pid, binary if isinstance(binary, str) else None))
    return pids


def _layout(redis_cluster: int, replicas: int) -> list[int]:
    """What local.json records about Redis: [] for one Redis, else [primaries, replicas]."""
    return [redis_cluster, replicas] if redis_cluster else []


def local_up(state_dir: Path, *, redis_cluster: int = 0, replicas: int = 0) -> dict[str, Any]:
    """Start Redis and Tansu detached, logs in ``state_dir``; write and return its local.json.

    With ``redis_cluster`` N, Redis is a cluster of N primaries with ``replicas`` replicas
    each (its nodes under ``state_dir/redis-PORT``), and KVPIPE_REDIS a redis+cluster:// URL.
    """
    state_dir = Path(state_dir).absolute()
    state_dir.mkdir(parents=True, exist_ok=True)
    existing = _read_state(state_dir)
    if existing is not None:
        pids = _state_pids(existing)
        alive = [pid for pid, binary in pids if _pid_alive(pid, binary)]
        same = existing.get("redis_layout", []) == _layout(redis_cluster, replicas)
        if same and len(pids) >= 2 and len(alive) == len(pids):
            return existing
        _terminate(alive, timeout=5.0)  # half up, or another layout asked for: start over
    broker = KafkaBroker()
    _LIVE.discard(broker)
    tansu_bin = broker._resolve_binary()
    kafka_log = state_dir / "tansu.log"
    if redis_cluster:
        args = cluster_args()
        count = redis_cluster * (1 + replicas)
        nodes = [RedisServer(port=free_cluster_port(), extra_args=args) for _ in range(count)]
    else:
        nodes = [RedisServer()]
    for node in nodes:
        _LIVE.discard(node)
    redis_bin = nodes[0]._resolve_binary()
    started: list[int] = []
    try:
        node_pids, node_logs = [], []
        for node in nodes:
            workdir = state_dir
            if redis_cluster:  # each node its own nodes.conf and redis.conf
                workdir = state_dir / f"redis-{node.port}"
                workdir.mkdir(exist_ok=True)
            log = state_dir / ("redis.log" if not redis_cluster else f"redis-{node.port}.log")
            pid = _spawn_detached(node._argv(redis_bin, workdir), node._env(), log)
            started.append(pid)
            node_pids.append(pid)
            node_logs.append(log)
        kafka_pid = _spawn_detached(broker._argv(tansu_bin, state_dir), broker._env(), kafka_log)
        started.append(kafka_pid)

        async def wait_all() -> None:
            await asyncio.gather(
                *(_wait_ready(node._label, node.port, node._probe,
                              functools.partial(_child_exit_code, pid),
                              node._ready_timeout, log)
                  for node, pid, log in zip(nodes, node_pids, node_logs, strict=True)),
                _wait_ready(broker._label, broker.port, broker._probe,
                            functools.partial(_child_exit_code, kafka_pid),
                            broker._ready_timeout, kafka_log),
            )  # fmt: skip
            if redis_cluster:
                cli = find_redis_cli(redis_bin)
                ports = [node.port for node in nodes]
                await form_cluster(ports, redis_cluster, redis_cli=cli)

        _run_sync(wait_all)
    except BaseException:
        _terminate(started, timeout=2.0)
        raise
    redis = nodes[0]
    redis_pid, redis_log = node_pids[0], node_logs[0]
    state: dict[str, Any] = {
        "redis_pid": redis_pid,
        "redis_port": redis.port,
        "redis_binary": redis_bin,
        "redis_log": str(redis_log),
        "redis_layout": _layout(redis_cluster, replicas),
        "redis_cluster_pids": node_pids[1:],
        "redis_cluster_ports": [node.port for node in nodes] if redis_cluster else [],
        "kafka_pid": kafka_pid,
        "kafka_port": broker.port,
        "kafka_binary": tansu_bin,
        "kafka_log": str(kafka_log),
        "KVPIPE_REDIS": cluster_url([n.port for n in nodes]) if redis_cluster else redis.url,
        "KVPIPE_KAFKA": broker.bootstrap,
        "state_dir": str(state_dir),
        "started_at": time.time(),
    }
    tmp = state_dir / f".{STATE_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, state_dir / STATE_FILE)
    return state


def local_down(state_dir: Path) -> bool:
    """Stop what ``state_dir``/local.json names (SIGTERM, SIGKILL after 5s); True if any ran."""
    state_dir = Path(state_dir)
    state = _read_state(state_dir)
    alive = [pid for pid, binary in _state_pids(state or {}) if _pid_alive(pid, binary)]
    _terminate(alive, timeout=5.0)
    for port in (state or {}).get("redis_cluster_ports") or ():  # the nodes' own directories
        if isinstance(port, int):
            shutil.rmtree(state_dir / f"redis-{port}", ignore_errors=True)
    (state_dir / STATE_FILE).unlink(missing_ok=True)
    return bool(alive)
