"""The :class:`~pipeline.io.kv.protocol.KeyValue` backend over a Redis Cluster, through
``redis.asyncio.cluster.RedisCluster``.

``KVPIPE_REDIS=redis+cluster://[user:pass@]host:port[,host:port...]`` (``rediss+cluster://``
for TLS) names seed nodes; the client learns the rest. The client follows MOVED and ASK
redirects and waits out TRYAGAIN itself; an unreachable node, CLUSTERDOWN during a failover or
a slot no node serves become :class:`~pipeline.errors.StoreUnavailable` (retryable), like a
down single Redis. Multi-key calls split by slot (MGET per node, SET pipelines per node); the
one atomic multi-key call, :meth:`set_if_greater`, needs its keys in one slot (hash tags, see
:mod:`pipeline.params.store`) and says so when they are not.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from redis import exceptions as redis_errors
from redis.asyncio.cluster import ClusterNode, PipelineCommand, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from pipeline.config import RedisSettings
from pipeline.errors import ConfigError, KvpipeError
from pipeline.io.kv.protocol import T, _key, _opt_bytes, _unavailable, hash_slot
from pipeline.io.kv.redis_py import HEALTH_CHECK_INTERVAL_S, RedisPyKV
from pipeline.redact import redact_url

__all__ = [
    "CLUSTER_SCHEMES",
    "ClusterTarget",
    "RedisClusterKV",
    "is_cluster_url",
    "parse_cluster_url",
]

#: URL schemes that name a Redis Cluster (the second one with TLS).
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
#: Attempts after the first on a node failure, each after a topology refresh (a failover moves
#: the slots of a dead primary to its replica; redirects are followed and not counted).
CLUSTER_RETRIES = 2
#: Attempts of a call that ended in a redirect loop ("TTL exhausted"), a backstop for
#: whatever else than the ASKING race (see :class:`_AskingNode`) could bounce a call.
REDIRECT_ATTEMPTS = 2


def _redirect_loop(exc: BaseException | None) -> bool:
    """Whether the client gave up on a call after too many MOVED/ASK redirects."""
    return isinstance(exc, redis_errors.ClusterError) and "TTL exhausted" in str(exc)


def is_cluster_url(url: str) -> bool:
    """Whether ``url`` names a Redis Cluster (``redis+cluster://`` or ``rediss+cluster://``)."""
    return url.partition("://")[0].lower() in CLUSTER_SCHEMES


@dataclass(frozen=True)
class ClusterTarget:
    """What a cluster URL says: seed nodes, credentials, TLS."""

    nodes: tuple[tuple[str, int], ...]
    username: str | None
    password: str | None
    ssl: bool


def _host_port(item: str, shown: str) -> tuple[str, int]:
    if item.startswith("["):  # [IPv6]:port
        host, _, rest = item[1:].partition("]")
        port_text = rest.removeprefix(":")
    else:
        host, _, port_text = item.rpartition(":")
        if not host:
            host, port_text = item, ""
    if not host:
        raise ConfigError(f"Redis Cluster URL {shown!r} has an empty host")
    port_text = port_text or "6379"
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"Redis Cluster URL {shown!r}: port {port_text!r} is not a port number")
    return host, int(port_text)


def parse_cluster_url(url: str) -> ClusterTarget:
    """Parse ``redis+cluster://[user:pass@]host:port[,host:port...][/0]``; a one-line
    ConfigError (password masked) for anything else."""
    shown = redact_url(url)
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in CLUSTER_SCHEMES:
        raise ConfigError(f"Redis URL {shown!r} is not a redis+cluster:// URL")
    if "?" in rest or "#" in rest:
        raise ConfigError(
            f"Redis Cluster URL {shown!r}: query parameters are not supported; "
            "use redis+cluster://[user:pass@]host:port[,host:port...]"
        )
    netloc, _, path = rest.partition("/")
    if path not in ("", "0"):
        raise ConfigError(
            f"Redis Cluster URL {shown!r} names database {path!r}; a cluster has only "
            "database 0 (separate deployments with KVPIPE_KEY_PREFIX)"
        )
    userinfo, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
        if not colon:  # a lone part before '@' is a password more often than a user
            username, password = None, unquote(user) or None
    nodes = tuple(_host_port(item.strip(), shown) for item in hosts.split(",") if item.strip())
    if not nodes:
        raise ConfigError(f"Redis Cluster URL {shown!r} names no node")
    return ClusterTarget(nodes, username, password, scheme.lower() == "rediss+cluster")


class _AskingNode:
    """A cluster node as the ASK redirect sees it: ASKING is held back and sent together with
    the redirected command, on one connection.

    redis-py 8.2's asyncio client sends ASKING and then the command as two calls on the
    node's pool, which hands out its oldest free connection: with two or more free, the
    command lands on a connection that never said ASKING, the importing node answers MOVED
    back to the migrating one, which answers ASK again, until the client gives up ("TTL
    exhausted"). Found by tests/faults/test_cluster.py (slots migrated under load).
    """

    def __init__(self, node: ClusterNode) -> None:
        self._node = node
        self._asking = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._node, name)

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        if args == ("ASKING",) and not kwargs:
            self._asking = True
            return True
        if not self._asking:
            return await self._node.execute_command(*args, **kwargs)
        self._asking = False
        kwargs.pop("asking", None)
        commands = [PipelineCommand(0, "ASKING"), PipelineCommand(1, *args, **kwargs)]
        await self._node.execute_pipeline(commands)
        for command in commands:
            if isinstance(command.result, BaseException):
                raise command.result
        return commands[1].result


class _RedisCluster(RedisCluster):
    """``RedisCluster`` whose ASK redirects send ASKING on the command's own connection."""

    def get_node(
        self, host: str | None = None, port: int | None = None, node_name: str | None = None
    ) -> Any:
        # Called by the client's ASK redirect (with host and port) and by set_default_node.
        node = super().get_node(host, port, node_name)
        return None if node is None else _AskingNode(node)


class RedisClusterKV(RedisPyKV):
    """:class:`KeyValue` over a Redis Cluster: the same calls, errors and timeouts as
    :class:`RedisPyKV`.

    redis-py's cluster pools do not wait for a free connection (they raise), so calls wait
    here instead: at most ``pool_size`` per seed node in the URL are in flight, and no node's
    pool is smaller than that, so however the calls fall on the nodes none is refused.
    """

    backend = "redis-py"

    def _make_client(self, settings: RedisSettings) -> Any:
        target = parse_cluster_url(settings.url)
        in_flight = max(1, settings.pool_size) * len(target.nodes)
        self._in_flight = asyncio.Semaphore(in_flight)
        try:
            return _RedisCluster(
                startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
                username=target.username,
                password=target.password,
                ssl=target.ssl,
                max_connections=in_flight,
                socket_timeout=settings.timeout_s,
                socket_connect_timeout=settings.connect_timeout_s,
                health_check_interval=HEALTH_CHECK_INTERVAL_S,
                retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), CLUSTER_RETRIES),
                require_full_coverage=False,  # keys in the live slots stay served
                decode_responses=False,
            )
        except (ValueError, TypeError, redis_errors.RedisClusterException) as exc:
            raise ConfigError(f"Redis Cluster URL {self._url!r} cannot be used: {exc}") from None

    def _backstop(self, settings: RedisSettings) -> float:
        # Every attempt may wait for a connection and a reply, and a refresh in between.
        attempts = 1 + CLUSTER_RETRIES
        return attempts * (2 * settings.timeout_s + settings.connect_timeout_s) + 1.0

    def __repr__(self) -> str:
        return f"RedisClusterKV({self._url!r})"

    @property
    def cluster(self) -> bool:
        """Keys spread over slots: an atomic call over several keys needs one hash tag."""
        return True

    async def _run(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        """Wait (at most ``timeout_s``) for a turn among the calls in flight, then run it."""
        try:
            async with asyncio.timeout(self._settings.timeout_s):
                await self._in_flight.acquire()
        except TimeoutError:
            raise _unavailable(self._url, what, "no free connection in time") from None
        try:
            for _ in range(REDIRECT_ATTEMPTS - 1):
                try:
                    return await super()._run(what, op)
                except KvpipeError as exc:
                    if not _redirect_loop(exc.__cause__):
                        raise
            return await super()._run(what, op)
        finally:
            self._in_flight.release()

    async def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        ks = [_key(k) for k in keys]
        if not ks:
            return []

        async def op() -> list[bytes | None]:  # one MGET per slot, the nodes in parallel
            return [_opt_bytes(v) for v in await self._client.mget_nonatomic(ks)]

        return await self._run(f"MGET of {len(ks)} keys", op)

    async def set_if_greater(self, key: str, value: int, *, persist: Sequence[str] = ()) -> bool:
        slots = {hash_slot(k) for k in (key, *persist)}
        if len(slots) > 1:
            raise KvpipeError(
                f"set_if_greater on a Redis Cluster needs {key!r} and the keys it persists in "
                "one hash slot (give them one hash tag)",
                code="store_error",
            )
        return await super().set_if_greater(key, value, persist=persist)

    async def _close(self) -> None:
        await self._client.aclose()
