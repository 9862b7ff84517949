"""Settings: frozen, keyword-only objects built once at the edge (CLI flags, env) and passed down.

Library code never reads ``os.environ``; :func:`settings_from_env` is called by the CLI and
the processes in ``consumers/`` with the mapping they choose to pass.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

from pipeline.errors import ConfigError
from pipeline.redact import redact_url

RedisBackend = Literal["redis-py", "asyncio-redis"]
EvictionPolicy = Literal["lru", "lfu", "wtinylfu"]
LogFormat = Literal["auto", "json", "console"]
KafkaSecurity = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]

MiB = 1024 * 1024
#: A host name in a Kafka bootstrap list (IPv6 addresses are checked apart).
_HOST_NAME = re.compile(r"[A-Za-z0-9._-]+")


@dataclass(frozen=True, kw_only=True)
class RedisSettings:
    """Where parameters live and how hard to try reaching them."""

    url: str = "redis://127.0.0.1:6379/0"
    backend: RedisBackend = "redis-py"
    key_prefix: str = "kvpipe"
    timeout_s: float = 2.0
    connect_timeout_s: float = 2.0
    pool_size: int = 8

    def redacted_url(self) -> str:
        """The URL with any password replaced, safe to log."""
        return redact_url(self.url)

    def __repr__(self) -> str:
        shown = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        shown["url"] = self.redacted_url()
        return f"RedisSettings({', '.join(f'{k}={v!r}' for k, v in shown.items())})"


@dataclass(frozen=True, kw_only=True)
class KafkaSettings:
    """The broker, topic names and the worker group."""

    bootstrap: str = "127.0.0.1:9092"
    topic_prefix: str = "kvpipe"
    partitions: int = 4
    group_id: str = "kvpipe-workers"
    client_id: str = "kvpipe"
    request_timeout_s: float = 10.0
    max_message_bytes: int = 4 * MiB
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 1_000
    fetch_max_wait_ms: int = 30
    partition_fetch_bytes: int = 4 * MiB
    linger_ms: int = 5
    producer_batch_bytes: int = 1 * MiB
    security_protocol: KafkaSecurity = "PLAINTEXT"
    sasl_mechanism: SaslMechanism = "PLAIN"
    sasl_username: str = ""
    sasl_password: str = field(default="", repr=False)
    ssl_cafile: str = ""
    #: Topics a request may name in ``kvpipe-reply-to``: shell-style patterns, ``{prefix}``
    #: standing for ``topic_prefix``.
    reply_topics: tuple[str, ...] = ("{prefix}.results", "{prefix}.replies.*")

    @property
    def requests_topic(self) -> str:
        return f"{self.topic_prefix}.requests"

    @property
    def results_topic(self) -> str:
        return f"{self.topic_prefix}.results"

    @property
    def dlq_topic(self) -> str:
        return f"{self.topic_prefix}.dlq"

    @property
    def updates_topic(self) -> str:
        return f"{self.topic_prefix}.updates"

    @property
    def training_topic(self) -> str:
        return f"{self.topic_prefix}.training"

    def reply_allowed(self, topic: str) -> bool:
        """Whether results may go to ``topic`` because a request asked: it matches an allowed
        pattern and is none of the topics kvpipe itself reads or dead-letters into."""
        if topic in (self.requests_topic, self.updates_topic, self.training_topic, self.dlq_topic):
            return False
        prefix = self.topic_prefix
        return any(fnmatchcase(topic, p.replace("{prefix}", prefix)) for p in self.reply_topics)


@dataclass(frozen=True, kw_only=True)
class CacheSettings:
    """The in-process parameter cache."""

    capacity_bytes: int = 512 * MiB
    ttl_s: float = 300.0
    version_ttl_s: float = 2.0
    policy: EvictionPolicy = "lru"
    result_models: tuple[str, ...] = ()
    result_bytes: int = 64 * MiB
    result_shared_ttl_s: float = 0.0


@dataclass(frozen=True, kw_only=True)
class LimitSettings:
    """What a single request may ask for; larger requests get a ``too_large`` error."""

    max_request_bytes: int = 4 * MiB
    max_elements: int = 1_000_000
    max_rows: int = 4096


@dataclass(frozen=True, kw_only=True)
class WorkerSettings:
    """The inference loop: batching, concurrency, commits and shutdown."""

    max_batch_size: int = 128
    max_wait_ms: float = 0.0
    max_in_flight: int = 4096
    fetch_max_records: int = 1000
    compute_threads: int = 2
    blas_threads: int = 1
    commit_interval_s: float = 0.2
    send_timeout_s: float = 10.0
    shutdown_timeout_s: float = 20.0
    watchdog_s: float = 30.0
    topic_check_s: float = 5.0
    worker_id: str = ""
    listen_updates: bool = True
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything a kvpipe process needs, in one immutable value."""

    redis: RedisSettings = field(default_factory=RedisSettings)
    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    log_format: LogFormat = "auto"
    log_level: str = "info"


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise ValueError("must be a positive integer")
    return value


def _non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError("must be zero or a positive integer")
    return value


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0:
        raise ValueError("must be a positive number")
    return value


def _names(raw: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in raw.split(",") if n.strip())


def _port(raw: str) -> int:
    value = int(raw)
    if not 0 <= value <= 65535:
        raise ValueError("must be a port number, 0 for any free port")
    return value


def _flag(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be 1/0, true/false, yes/no or on/off")


def _non_negative_float(raw: str) -> float:
    value = float(raw)
    if not value >= 0:
        raise ValueError("must be zero or a positive number")
    return value


def _choice(*options: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return raw

    return parse


@dataclass(frozen=True)
class EnvVar:
    """One environment variable: the setting it fills and how it is parsed."""

    name: str
    path: str
    parse: Callable[[str], Any]
    help: str
    secret: bool = False


ENV_VARS: tuple[EnvVar, ...] = (
    EnvVar(
        "KVPIPE_KAFKA", "kafka.bootstrap", str, "Kafka bootstrap servers, host:port[,host:port]"
    ),
    EnvVar(
        "KVPIPE_REDIS", "redis.url", str, "Redis URL, redis://[user:pass@]host:port/db", secret=True
    ),
    EnvVar(
        "KVPIPE_REDIS_BACKEND",
        "redis.backend",
        _choice("redis-py", "asyncio-redis"),
        "Redis client: redis-py (default) or asyncio-redis",
    ),
    EnvVar(
        "KVPIPE_REDIS_TIMEOUT",
        "redis.timeout_s",
        _positive_float,
        "Seconds any Redis command may take",
    ),
    EnvVar("KVPIPE_KEY_PREFIX", "redis.key_prefix", str, "Prefix of every Redis key"),
    EnvVar(
        "KVPIPE_TOPIC_PREFIX",
        "kafka.topic_prefix",
        str,
        "Prefix of the topic names (PREFIX.requests, .results, .dlq, .updates)",
    ),
    EnvVar(
        "KVPIPE_PARTITIONS",
        "kafka.partitions",
        _positive_int,
        "Partitions of topics the worker creates",
    ),
    EnvVar("KVPIPE_GROUP", "kafka.group_id", str, "Consumer group of the workers"),
    EnvVar(
        "KVPIPE_REPLY_TOPICS",
        "kafka.reply_topics",
        _names,
        "Topics a request may name as kvpipe-reply-to: comma-separated patterns, {prefix} for "
        "KVPIPE_TOPIC_PREFIX (never the requests, updates, training or DLQ topic)",
    ),
    EnvVar(
        "KVPIPE_SESSION_TIMEOUT_MS",
        "kafka.session_timeout_ms",
        _positive_int,
        "Consumer group session timeout (ms); a join takes about half of it on Tansu",
    ),
    EnvVar(
        "KVPIPE_KAFKA_SECURITY",
        "kafka.security_protocol",
        _choice("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"),
        "Kafka security protocol: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL",
    ),
    EnvVar(
        "KVPIPE_KAFKA_SASL_MECHANISM",
        "kafka.sasl_mechanism",
        _choice("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"),
        "SASL mechanism: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512",
    ),
    EnvVar("KVPIPE_KAFKA_SASL_USERNAME", "kafka.sasl_username", str, "SASL user name"),
    EnvVar("KVPIPE_KAFKA_SASL_PASSWORD", "kafka.sasl_password", str, "SASL password", secret=True),
    EnvVar(
        "KVPIPE_KAFKA_SSL_CAFILE",
        "kafka.ssl_cafile",
        str,
        "CA bundle to verify the brokers with SSL (default: the system's)",
    ),
    EnvVar(
        "KVPIPE_HEARTBEAT_MS",
        "kafka.heartbeat_interval_ms",
        _positive_int,
        "Consumer heartbeat interval (ms); at most a third of the session timeout",
    ),
    EnvVar(
        "KVPIPE_FETCH_MAX_WAIT_MS",
        "kafka.fetch_max_wait_ms",
        _non_negative_int,
        "Longest a fetch waits at the broker for data (ms); on Tansu also a latency floor",
    ),
    EnvVar(
        "KVPIPE_FETCH_PARTITION_BYTES",
        "kafka.partition_fetch_bytes",
        _positive_int,
        "Most bytes one fetch returns per partition",
    ),
    EnvVar(
        "KVPIPE_LINGER_MS",
        "kafka.linger_ms",
        _non_negative_int,
        "Longest the producer holds a message to fill a batch (ms)",
    ),
    EnvVar(
        "KVPIPE_PRODUCER_BATCH_BYTES",
        "kafka.producer_batch_bytes",
        _positive_int,
        "Largest producer batch per partition in bytes",
    ),
    EnvVar(
        "KVPIPE_CACHE_BYTES",
        "cache.capacity_bytes",
        _positive_int,
        "Parameter cache capacity in bytes",
    ),
    EnvVar(
        "KVPIPE_CACHE_TTL",
        "cache.ttl_s",
        _positive_float,
        "Seconds a cached parameter lives after it was loaded",
    ),
    EnvVar(
        "KVPIPE_VERSION_TTL",
        "cache.version_ttl_s",
        _positive_float,
        "Seconds a cached serving-version pointer lives",
    ),
    EnvVar(
        "KVPIPE_CACHE_POLICY",
        "cache.policy",
        _choice("lru", "lfu", "wtinylfu"),
        "Eviction policy: lru, lfu or wtinylfu",
    ),
    EnvVar(
        "KVPIPE_RESULT_CACHE",
        "cache.result_models",
        _names,
        "Dense models whose outputs are memoized by (model, version, input digest); * for all",
    ),
    EnvVar(
        "KVPIPE_RESULT_CACHE_BYTES",
        "cache.result_bytes",
        _positive_int,
        "Byte budget of the result cache",
    ),
    EnvVar(
        "KVPIPE_RESULT_CACHE_SHARED_TTL",
        "cache.result_shared_ttl_s",
        _non_negative_float,
        "Seconds memoized outputs are also kept in Redis for the fleet (0: this worker only)",
    ),
    EnvVar(
        "KVPIPE_MAX_BATCH",
        "worker.max_batch_size",
        _positive_int,
        "Largest micro-batch the worker computes at once",
    ),
    EnvVar(
        "KVPIPE_MAX_WAIT_MS",
        "worker.max_wait_ms",
        _non_negative_float,
        "Longest a request waits for its micro-batch to fill (0: run what each fetch brings)",
    ),
    EnvVar(
        "KVPIPE_MAX_IN_FLIGHT",
        "worker.max_in_flight",
        _positive_int,
        "Requests a worker holds before it stops fetching",
    ),
    EnvVar(
        "KVPIPE_COMPUTE_THREADS",
        "worker.compute_threads",
        _positive_int,
        "Threads running numpy compute",
    ),
    EnvVar(
        "KVPIPE_BLAS_THREADS",
        "worker.blas_threads",
        _positive_int,
        "BLAS threads per compute thread (1: parallelism comes from the compute threads)",
    ),
    EnvVar(
        "KVPIPE_WATCHDOG_S",
        "worker.watchdog_s",
        _non_negative_float,
        "Restart the consumer after this many seconds behind with nothing fetched (0: off)",
    ),
    EnvVar(
        "KVPIPE_TOPIC_CHECK_S",
        "worker.topic_check_s",
        _positive_float,
        "Seconds between checks that the results and DLQ topics exist (created again if not)",
    ),
    EnvVar(
        "KVPIPE_LISTEN_UPDATES",
        "worker.listen_updates",
        _flag,
        "Apply training announcements from PREFIX.updates (off: the pointer TTL alone)",
    ),
    EnvVar(
        "KVPIPE_METRICS_PORT",
        "worker.metrics_port",
        _port,
        "Serve /metrics, /healthz and /readyz on this port (unset: off; 0: any free port)",
    ),
    EnvVar(
        "KVPIPE_METRICS_HOST",
        "worker.metrics_host",
        str,
        "Address the status server listens on (0.0.0.0 in containers)",
    ),
    EnvVar("KVPIPE_WORKER_ID", "worker.worker_id", str, "Name of this worker in results and logs"),
    EnvVar(
        "KVPIPE_LOG_FORMAT",
        "log_format",
        _choice("auto", "json", "console"),
        "Log format: auto (pretty on a TTY, JSON otherwise), json or console",
    ),
    EnvVar(
        "KVPIPE_LOG_LEVEL", "log_level", _choice("debug", "info", "warning", "error"), "Log level"
    ),
)


def with_values(settings: Settings, values: Mapping[str, Any]) -> Settings:
    """Return ``settings`` with dotted paths (``"redis.url"``) replaced by ``values``."""
    groups: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for path, value in values.items():
        if value is None:
            continue
        if "." in path:
            group, name = path.split(".", 1)
            groups.setdefault(group, {})[name] = value
        else:
            top[path] = value
    for group, changes in groups.items():
        top[group] = dataclasses.replace(getattr(settings, group), **changes)
    return dataclasses.replace(settings, **top)


def settings_to_env(settings: Settings) -> dict[str, str]:
    """The ``KVPIPE_*`` variables that rebuild ``settings`` (for child processes)."""
    env: dict[str, str] = {}
    for var in ENV_VARS:
        value: Any = settings
        for part in var.path.split("."):
            value = getattr(value, part)
        if isinstance(value, tuple):
            value = ",".join(value)
        if value not in ("", None):
            env[var.name] = str(value)
    return env


def settings_from_env(environ: Mapping[str, str], base: Settings | None = None) -> Settings:
    """Build settings from ``KVPIPE_*`` variables in ``environ`` on top of ``base``."""
    values: dict[str, Any] = {}
    for var in ENV_VARS:
        raw = environ.get(var.name)
        if raw is None or raw == "":
            continue
        try:
            values[var.path] = var.parse(raw)
        except ValueError as exc:
            shown = "***" if var.secret else repr(raw)
            raise ConfigError(f"{var.name}={shown}: {exc}") from None
    return validate(with_values(base or Settings(), values))


def _port_ok(text: str) -> bool:
    return text.isascii() and text.isdigit() and 1 <= int(text) <= 65535


def check_redis_url(url: str) -> None:
    """Refuse, in one line naming only the redacted URL, what redis-py would crash on or
    misread: bad scheme, port, brackets, host, database, whitespace or control characters."""
    shown = f"Redis URL {redact_url(url)!r}"
    if any(ch.isspace() or not ch.isprintable() for ch in url):
        raise ConfigError(f"{shown} contains whitespace or control characters; percent-encode them")
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ConfigError(
            f"{shown} cannot be parsed: check the [brackets] of an IPv6 host and percent-encode "
            "special characters in the password"
        ) from None
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(f"{shown} must start with redis://, rediss:// or unix://")
    dbs = parse_qs(parts.query).get("db")
    db = dbs[0] if dbs else None
    if parts.scheme == "unix":
        if not parts.path:
            raise ConfigError(f"{shown} has no socket path; use unix:///path/to/redis.sock")
    else:
        try:
            port = parts.port
        except ValueError:
            port = 0
        if port == 0:
            raise ConfigError(f"{shown} has a port that is not a number from 1 to 65535")
        if not parts.hostname:
            raise ConfigError(f"{shown} names no host; use redis://host:port/db")
        if db is None and parts.path not in ("", "/"):
            db = parts.path[1:]
    if db is not None and not (db.isascii() and db.isdigit()):
        raise ConfigError(f"{shown} selects database {db!r}, which is not a number")


def _bootstrap_problem(entry: str) -> str | None:
    """What is wrong with one ``host:port`` of a bootstrap list, or None (aiokafka's forms)."""
    if not entry:
        return "an entry is empty"
    port: str | None = None
    if entry.startswith("["):
        host, close, rest = entry[1:].partition("]")
        if not close:
            return "an IPv6 address has no closing ']'"
        if rest:
            if not rest.startswith(":"):
                return "expected :port after ']'"
            port = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return f"{host!r} in brackets is not an IPv6 address"
    else:
        with contextlib.suppress(ValueError):
            ipaddress.IPv6Address(entry)
            return None
        host, colon, after = entry.rpartition(":")
        if not colon:
            host = after
        else:
            port = after
        if not _HOST_NAME.fullmatch(host):
            return f"host {redact_url(host)!r} is not a host name"
    if port is not None and not _port_ok(port):
        return f"port {port!r} is not a number from 1 to 65535"
    return None


def check_bootstrap(bootstrap: str) -> None:
    """Refuse, in one line, a Kafka bootstrap list aiokafka would crash on."""
    if not bootstrap.strip():
        raise ConfigError("Kafka bootstrap address is empty; set KVPIPE_KAFKA=host:port")
    for entry in bootstrap.split(","):
        problem = _bootstrap_problem(entry.strip())
        if problem is not None:
            raise ConfigError(
                f"Kafka bootstrap {redact_url(bootstrap)!r}: {problem}; "
                "use host:port[,host:port] (KVPIPE_KAFKA or --kafka)"
            )


def validate(settings: Settings) -> Settings:
    """Check the settings as a whole; raise :class:`ConfigError` with one clear line."""
    check_redis_url(settings.redis.url)
    check_bootstrap(settings.kafka.bootstrap)
    k = settings.kafka
    if k.security_protocol.startswith("SASL") and not (k.sasl_username and k.sasl_password):
        raise ConfigError(
            f"KVPIPE_KAFKA_SECURITY={k.security_protocol} needs KVPIPE_KAFKA_SASL_USERNAME and "
            "KVPIPE_KAFKA_SASL_PASSWORD"
        )
    if k.ssl_cafile and not k.security_protocol.endswith("SSL"):
        raise ConfigError("KVPIPE_KAFKA_SSL_CAFILE is set but the security protocol has no SSL")
    if settings.kafka.heartbeat_interval_ms * 3 > settings.kafka.session_timeout_ms:
        raise ConfigError("heartbeat interval must be at most a third of the session timeout")
    if settings.worker.max_batch_size > settings.worker.max_in_flight:
        raise ConfigError("max batch size cannot exceed max in-flight requests")
    return settings


def env_table() -> str:
    """The Markdown table of environment variables the README carries (checked by a test)."""
    defaults = Settings()
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for var in ENV_VARS:
        value: Any = defaults
        for part in var.path.split("."):
            value = getattr(value, part)
        if var.path == "worker.worker_id":
            shown = "(host-pid)"
        elif value is None or value in ("", ()):
            shown = "(off)"
        else:
            shown = f"`{','.join(value) if isinstance(value, tuple) else value}`"
        rows.append(f"| `{var.name}` | {shown} | {var.help} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(env_table())
