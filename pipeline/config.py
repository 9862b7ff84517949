"""Settings: frozen, keyword-only objects built once at the edge (CLI flags, env) and passed down.

Library code never reads ``os.environ``; :func:`settings_from_env` is called by the CLI and
the processes in ``consumers/`` with the mapping they choose to pass.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import (
    Any,
    Literal,
    TypeVar,
    dataclass_transform,
    get_args,
    get_origin,
    get_type_hints,
)
from urllib.parse import parse_qs, urlsplit

from pipeline.errors import ConfigError
from pipeline.redact import redact_url

RedisBackend = Literal["redis-py", "asyncio-redis"]
EvictionPolicy = Literal["lru", "lfu", "wtinylfu"]
LogFormat = Literal["auto", "json", "console"]
LogLevel = Literal["debug", "info", "warning", "error"]
KafkaSecurity = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
#: Which ``kvpipe`` commands take a setting's flag: every command that connects, or ``serve``.
FlagScope = Literal["common", "serve"]

MiB = 1024 * 1024
#: A host name in a Kafka bootstrap list (IPv6 addresses are checked apart).
_HOST_NAME = re.compile(r"[A-Za-z0-9._-]+")
#: The key of a field's :class:`_Spec` in its dataclass metadata.
_SPEC = "kvpipe.setting"
T = TypeVar("T")


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


def _modules(raw: str) -> tuple[str, ...]:
    names = _names(raw)
    for name in names:
        if not all(part.isidentifier() for part in name.split(".")):
            raise ValueError(f"{name!r} is not a module name; use package.module[,package.module]")
    return names


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


def _processes(raw: str) -> int:
    """A process count, or ``auto``: the cores this process may run on."""
    if raw.strip().lower() == "auto":
        return max(1, len(os.sched_getaffinity(0)))
    try:
        return _positive_int(raw)
    except ValueError:
        raise ValueError("must be a positive integer or auto") from None


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


@dataclass(frozen=True, kw_only=True)
class _Spec:
    """What :func:`setting` records beside a field (see :class:`EnvVar`)."""

    env: str
    help: str
    parse: Callable[[str], Any] | None
    secret: bool
    flag: str | None
    flag_scope: FlagScope
    metavar: str | None
    shown: str | None


#: ``parse`` may be left out for ``str`` and ``Literal`` fields, whose choices come from the
#: ``Literal`` (``{choices}`` in ``help`` names them); ``secret`` keeps the value out of reprs
#: and errors; ``flag`` is its ``kvpipe`` option, on every command that connects or on ``serve``
#: (``flag_scope``); ``shown`` stands for the default in the README table.
def setting(
    *,
    default: T,
    env: str,
    help: str,
    parse: Callable[[str], Any] | None = None,
    secret: bool = False,
    flag: str | None = None,
    flag_scope: FlagScope = "common",
    metavar: str | None = None,
    shown: str | None = None,
) -> T:
    """A settings field with, beside it, its env name, parser, help, choices and flag."""
    spec = _Spec(
        env=env,
        help=help,
        parse=parse,
        secret=secret,
        flag=flag,
        flag_scope=flag_scope,
        metavar=metavar,
        shown=shown,
    )
    return field(default=default, repr=not secret, metadata={_SPEC: spec})


@dataclass_transform(frozen_default=True, kw_only_default=True, field_specifiers=(field, setting))
def settings_class(cls: type[T]) -> type[T]:
    """A frozen, keyword-only dataclass whose :func:`setting` fields checkers understand."""
    return dataclass(frozen=True, kw_only=True)(cls)


@settings_class
class RedisSettings:
    """Where parameters live and how hard to try reaching them."""

    url: str = setting(
        default="redis://127.0.0.1:6379/0",
        env="KVPIPE_REDIS",
        help="Redis URL, redis://[user:pass@]host:port/db, or a Redis Cluster, "
        "redis+cluster://[user:pass@]host:port[,host:port...] (rediss+cluster:// for TLS)",
        secret=True,
        flag="--redis",
        metavar="URL",
    )
    backend: RedisBackend = setting(
        default="redis-py",
        env="KVPIPE_REDIS_BACKEND",
        help="Redis client: {choices}",
        flag="--redis-backend",
    )
    key_prefix: str = setting(
        default="kvpipe",
        env="KVPIPE_KEY_PREFIX",
        help="Prefix of every Redis key",
        flag="--key-prefix",
        metavar="P",
    )
    timeout_s: float = setting(
        default=2.0,
        env="KVPIPE_REDIS_TIMEOUT",
        help="Seconds any Redis command may take",
        parse=_positive_float,
    )
    emb_partitions: int = setting(
        default=8,
        env="KVPIPE_EMB_PARTITIONS",
        help="Hashes each embedding table is split into on a Redis Cluster (2-5x the "
        "primaries; a single Redis keeps one hash). Part of the key layout: trainers and "
        "workers must agree, and a change needs the tables published again",
        parse=_positive_int,
    )
    connect_timeout_s: float = 2.0
    pool_size: int = 8

    def redacted_url(self) -> str:
        """The URL with any password replaced, safe to log."""
        return redact_url(self.url)

    def __repr__(self) -> str:
        shown = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        shown["url"] = self.redacted_url()
        return f"RedisSettings({', '.join(f'{k}={v!r}' for k, v in shown.items())})"


@settings_class
class KafkaSettings:
    """The broker, topic names and the worker group."""

    bootstrap: str = setting(
        default="127.0.0.1:9092",
        env="KVPIPE_KAFKA",
        help="Kafka bootstrap servers, host:port[,host:port]",
        flag="--kafka",
        metavar="HOST:PORT[,...]",
    )
    topic_prefix: str = setting(
        default="kvpipe",
        env="KVPIPE_TOPIC_PREFIX",
        help="Prefix of the topic names (PREFIX.requests, .results, .dlq, .updates)",
        flag="--topic-prefix",
        metavar="P",
    )
    partitions: int = setting(
        default=4,
        env="KVPIPE_PARTITIONS",
        help="Partitions of topics the worker creates",
        parse=_positive_int,
        flag="--partitions",
        flag_scope="serve",
    )
    group_id: str = setting(
        default="kvpipe-workers",
        env="KVPIPE_GROUP",
        help="Consumer group of the workers",
        flag="--group",
        flag_scope="serve",
    )
    client_id: str = "kvpipe"
    request_timeout_s: float = 10.0
    max_message_bytes: int = 4 * MiB
    session_timeout_ms: int = setting(
        default=10_000,
        env="KVPIPE_SESSION_TIMEOUT_MS",
        help="Consumer group session timeout (ms); a join takes about half of it on Tansu",
        parse=_positive_int,
    )
    heartbeat_interval_ms: int = setting(
        default=1_000,
        env="KVPIPE_HEARTBEAT_MS",
        help="Consumer heartbeat interval (ms); at most a third of the session timeout",
        parse=_positive_int,
    )
    fetch_max_wait_ms: int = setting(
        default=30,
        env="KVPIPE_FETCH_MAX_WAIT_MS",
        help="Longest a fetch waits at the broker for data (ms); on Tansu also a latency floor",
        parse=_non_negative_int,
    )
    partition_fetch_bytes: int = setting(
        default=4 * MiB,
        env="KVPIPE_FETCH_PARTITION_BYTES",
        help="Most bytes one fetch returns per partition",
        parse=_positive_int,
    )
    linger_ms: int = setting(
        default=5,
        env="KVPIPE_LINGER_MS",
        help="Longest the producer holds a message to fill a batch (ms)",
        parse=_non_negative_int,
    )
    producer_batch_bytes: int = setting(
        default=1 * MiB,
        env="KVPIPE_PRODUCER_BATCH_BYTES",
        help="Largest producer batch per partition in bytes",
        parse=_positive_int,
    )
    security_protocol: KafkaSecurity = setting(
        default="PLAINTEXT", env="KVPIPE_KAFKA_SECURITY", help="Kafka security protocol: {choices}"
    )
    sasl_mechanism: SaslMechanism = setting(
        default="PLAIN", env="KVPIPE_KAFKA_SASL_MECHANISM", help="SASL mechanism: {choices}"
    )
    sasl_username: str = setting(
        default="", env="KVPIPE_KAFKA_SASL_USERNAME", help="SASL user name"
    )
    sasl_password: str = setting(
        default="", env="KVPIPE_KAFKA_SASL_PASSWORD", help="SASL password", secret=True
    )
    ssl_cafile: str = setting(
        default="",
        env="KVPIPE_KAFKA_SSL_CAFILE",
        help="CA bundle to verify the brokers with SSL (default: the system's)",
    )
    #: Topics a request may name in ``kvpipe-reply-to``: shell-style patterns, ``{prefix}``
    #: standing for ``topic_prefix``.
    reply_topics: tuple[str, ...] = setting(
        default=("{prefix}.results", "{prefix}.replies.*"),
        env="KVPIPE_REPLY_TOPICS",
        help="Topics a request may name as kvpipe-reply-to: comma-separated patterns, {prefix} "
        "for KVPIPE_TOPIC_PREFIX (never the requests, updates, training or DLQ topic)",
        parse=_names,
    )
    #: Where request-reply clients read their answers: empty for a topic per client (created
    #: on first use, deleted on close), or one shared topic read from its end, filtered by id.
    reply_topic: str = setting(
        default="",
        env="KVPIPE_REPLY_TOPIC",
        help="Shared reply topic of request-reply clients (kvpipe infer), answers filtered by "
        "id; never deleted, created only when absent. Empty: a topic per client, deleted on "
        "close (needs the right to create and delete topics)",
    )

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


@settings_class
class CacheSettings:
    """The in-process parameter cache."""

    capacity_bytes: int = setting(
        default=512 * MiB,
        env="KVPIPE_CACHE_BYTES",
        help="Parameter cache capacity in bytes",
        parse=_positive_int,
        flag="--cache-bytes",
        flag_scope="serve",
    )
    ttl_s: float = setting(
        default=300.0,
        env="KVPIPE_CACHE_TTL",
        help="Seconds a cached parameter lives after it was loaded",
        parse=_positive_float,
        flag="--cache-ttl",
        flag_scope="serve",
    )
    version_ttl_s: float = setting(
        default=2.0,
        env="KVPIPE_VERSION_TTL",
        help="Seconds a cached serving-version pointer lives",
        parse=_positive_float,
    )
    policy: EvictionPolicy = setting(
        default="lru",
        env="KVPIPE_CACHE_POLICY",
        help="Eviction policy: {choices}",
        flag="--cache-policy",
        flag_scope="serve",
    )
    result_models: tuple[str, ...] = setting(
        default=(),
        env="KVPIPE_RESULT_CACHE",
        help="Dense models whose outputs are memoized by (model, version, input digest); * for all",
        parse=_names,
    )
    result_bytes: int = setting(
        default=64 * MiB,
        env="KVPIPE_RESULT_CACHE_BYTES",
        help="Byte budget of the result cache",
        parse=_positive_int,
    )
    result_shared_ttl_s: float = setting(
        default=0.0,
        env="KVPIPE_RESULT_CACHE_SHARED_TTL",
        help="Seconds memoized outputs are also kept in Redis for the fleet (0: this worker only)",
        parse=_non_negative_float,
    )
    prefix_bytes: int = setting(
        default=256 * MiB,
        env="KVPIPE_PREFIX_CACHE_BYTES",
        help="Byte budget of the worker's cache of transformer prefix keys/values",
        parse=_positive_int,
    )
    prefix_ttl_s: float = setting(
        default=3600.0,
        env="KVPIPE_PREFIX_TTL",
        help="Seconds prefix keys/values live in Redis (and in the worker) after written",
        parse=_positive_float,
    )
    generation_kv_bytes: int = setting(
        default=1024 * MiB,
        env="KVPIPE_GENERATION_KV_BYTES",
        help="Byte budget of the keys/values of the sequences a worker generates at once (a "
        "generation starts when its prompt plus max_tokens fits, or alone)",
        parse=_positive_int,
    )
    generation_batch: int = setting(
        default=64,
        env="KVPIPE_GENERATION_BATCH",
        help="Most sequences one decode step advances together (the others take turns)",
        parse=_positive_int,
    )


@settings_class
class LimitSettings:
    """What a single request may ask for; larger requests get a ``too_large`` error."""

    max_request_bytes: int = 4 * MiB
    max_elements: int = 1_000_000
    max_rows: int = 4096


@settings_class
class WorkerSettings:
    """The inference loop: batching, concurrency, commits and shutdown."""

    max_batch_size: int = setting(
        default=128,
        env="KVPIPE_MAX_BATCH",
        help="Largest micro-batch the worker computes at once",
        parse=_positive_int,
        flag="--max-batch",
        flag_scope="serve",
    )
    max_wait_ms: float = setting(
        default=0.0,
        env="KVPIPE_MAX_WAIT_MS",
        help="Longest a request waits for its micro-batch to fill (0: run what each fetch brings)",
        parse=_non_negative_float,
    )
    max_in_flight: int = setting(
        default=4096,
        env="KVPIPE_MAX_IN_FLIGHT",
        help="Requests a worker holds before it stops fetching",
        parse=_positive_int,
    )
    fetch_max_records: int = 1000
    compute_threads: int = setting(
        default=2,
        env="KVPIPE_COMPUTE_THREADS",
        help="Threads running numpy compute",
        parse=_positive_int,
    )
    blas_threads: int = setting(
        default=1,
        env="KVPIPE_BLAS_THREADS",
        help="BLAS threads per compute thread (1: parallelism comes from the compute threads)",
        parse=_positive_int,
    )
    commit_interval_s: float = 0.2
    send_timeout_s: float = 10.0
    shutdown_timeout_s: float = 20.0
    watchdog_s: float = setting(
        default=30.0,
        env="KVPIPE_WATCHDOG_S",
        help="Restart the consumer after this many seconds behind with nothing fetched (0: off)",
        parse=_non_negative_float,
    )
    topic_check_s: float = setting(
        default=5.0,
        env="KVPIPE_TOPIC_CHECK_S",
        help="Seconds between checks that the results and DLQ topics exist (created again if not)",
        parse=_positive_float,
    )
    worker_id: str = setting(
        default="",
        env="KVPIPE_WORKER_ID",
        help="Name of this worker in results and logs",
        flag="--worker-id",
        flag_scope="serve",
        shown="(host-pid)",
    )
    listen_updates: bool = setting(
        default=True,
        env="KVPIPE_LISTEN_UPDATES",
        help="Apply training announcements from PREFIX.updates (off: the pointer TTL alone)",
        parse=_flag,
    )
    metrics_host: str = setting(
        default="127.0.0.1",
        env="KVPIPE_METRICS_HOST",
        help="Address the status server listens on (0.0.0.0 in containers)",
    )
    metrics_port: int | None = setting(
        default=None,
        env="KVPIPE_METRICS_PORT",
        help="Serve /metrics, /healthz and /readyz on this port (unset: off; 0: any free port)",
        parse=_port,
    )
    processes: int = setting(
        default=1,
        env="KVPIPE_PROCESSES",
        help="Worker processes under one supervisor, in one consumer group (auto: the cores "
        "this process may use)",
        parse=_processes,
        flag="--processes",
        flag_scope="serve",
        metavar="N|auto",
    )
    dedupe_ttl_s: float = setting(
        default=0.0,
        env="KVPIPE_DEDUPE_TTL",
        help="Seconds answered request ids are kept in Redis so a redelivered request is "
        "skipped, not answered again (0: off, at-least-once)",
        parse=_non_negative_float,
        shown="`0` (off)",
    )


#: At most this many names in ``KVPIPE_COPY_HEADERS``; headers kvpipe writes itself are never
#: copied (``kvpipe-*``, ``content-type``, and the trace headers, which tracing carries).
MAX_COPY_HEADERS = 16
_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}")
RESERVED_HEADERS = ("content-type", "traceparent", "tracestate")


def _header_names(raw: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.lower() for n in _names(raw)))
    if len(names) > MAX_COPY_HEADERS:
        raise ValueError(f"at most {MAX_COPY_HEADERS} header names")
    for name in names:
        if not _HEADER_NAME.fullmatch(name):
            raise ValueError(f"{name[:80]!r} is not a header name (64 token characters at most)")
        if name.startswith("kvpipe-") or name in RESERVED_HEADERS:
            raise ValueError(f"{name!r} is kvpipe's own header; it is never copied")
    return names


@settings_class
class TracingSettings:
    """Trace context from requests to results (W3C traceparent), and copied request headers."""

    enabled: bool = setting(
        default=True,
        env="KVPIPE_TRACING",
        help="Continue a request's traceparent/tracestate into the worker's spans and onto its "
        "result (0: neither)",
        parse=_flag,
    )
    otlp_endpoint: str = setting(
        default="",
        env="KVPIPE_OTLP_ENDPOINT",
        help="Send spans over OTLP/HTTP to this URL, e.g. http://collector:4318/v1/traces "
        "(needs kvpipe[tracing]; empty: to the process's own OpenTelemetry SDK, if any)",
    )
    copy_headers: tuple[str, ...] = setting(
        default=(),
        env="KVPIPE_COPY_HEADERS",
        help=f"Request headers copied onto results, comma-separated names (at most "
        f"{MAX_COPY_HEADERS}; never kvpipe-*, content-type or the trace headers)",
        parse=_header_names,
    )


@settings_class
class Settings:
    """Everything a kvpipe process needs, in one immutable value."""

    redis: RedisSettings = field(default_factory=RedisSettings)
    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    tracing: TracingSettings = field(default_factory=TracingSettings)
    log_format: LogFormat = setting(
        default="auto",
        env="KVPIPE_LOG_FORMAT",
        help="Log format: {choices}; auto is pretty on a TTY, JSON otherwise",
        flag="--log-format",
    )
    log_level: LogLevel = setting(
        default="info", env="KVPIPE_LOG_LEVEL", help="Log level: {choices}", flag="--log-level"
    )
    model_plugins: tuple[str, ...] = setting(
        default=(),
        env="KVPIPE_MODEL_PLUGINS",
        help="Modules of model plugins to import at start, comma-separated, each listing its "
        "classes in KVPIPE_MODELS (installed kvpipe.models entry points load anyway)",
        parse=_modules,
    )


@dataclass(frozen=True)
class EnvVar:
    """One environment variable: the setting it fills, how it is parsed, its flag if any."""

    name: str
    path: str
    parse: Callable[[str], Any]
    help: str
    secret: bool = False
    choices: tuple[str, ...] = ()
    flag: str | None = None
    flag_scope: FlagScope = "common"
    metavar: str | None = None
    shown: str | None = None


def _spoken(choices: tuple[str, ...]) -> str:
    """``a, b or c``."""
    return f"{', '.join(choices[:-1])} or {choices[-1]}" if len(choices) > 1 else choices[0]


def _env_var(path: str, spec: _Spec, hint: Any) -> EnvVar:
    """The :class:`EnvVar` of one field from its :class:`_Spec` and its type."""
    choices: tuple[str, ...] = get_args(hint) if get_origin(hint) is Literal else ()
    parse = spec.parse
    if parse is None:
        if choices:
            parse = _choice(*choices)
        elif hint is str:
            parse = str
        else:
            raise TypeError(f"{spec.env} ({path}: {hint}) needs parse=")
    text = spec.help.replace("{choices}", _spoken(choices)) if choices else spec.help
    return EnvVar(
        spec.env,
        path,
        parse,
        text,
        secret=spec.secret,
        choices=choices,
        flag=spec.flag,
        flag_scope=spec.flag_scope,
        metavar=spec.metavar,
        shown=spec.shown,
    )


def _env_vars(cls: type[Any], prefix: str = "") -> Iterator[EnvVar]:
    """Every :func:`setting` under ``cls``, nested settings groups included, in field order."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            yield from _env_vars(hint, f"{prefix}{f.name}.")
        elif _SPEC in f.metadata:
            yield _env_var(f"{prefix}{f.name}", f.metadata[_SPEC], hint)


#: Every environment variable, derived from the :func:`setting` fields of :class:`Settings`.
ENV_VARS: tuple[EnvVar, ...] = tuple(_env_vars(Settings))


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


def _check_cluster_url(netloc: str, path: str, query: str, shown: str) -> None:
    """A Redis Cluster URL: seeds ``host:port`` separated by commas, database 0 only."""
    hosts = netloc.rpartition("@")[2]
    for seed in hosts.split(","):
        host, _, port = seed.rpartition(":")
        if not host.strip("[]") or not _port_ok(port):
            raise ConfigError(
                f"{shown}: seed {seed!r} is not host:port; use "
                "redis+cluster://[user:pass@]host:port[,host:port...]"
            )
    if query or path not in ("", "/", "/0"):
        raise ConfigError(f"{shown}: a cluster has database 0 only and takes no options")


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
    if parts.scheme in ("redis+cluster", "rediss+cluster"):
        _check_cluster_url(parts.netloc, parts.path, parts.query, shown)
        return
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(
            f"{shown} must start with redis://, rediss://, unix:// or redis+cluster://"
        )
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
    if k.reply_topic and not k.reply_allowed(k.reply_topic):
        raise ConfigError(
            f"KVPIPE_REPLY_TOPIC={k.reply_topic!r} does not match KVPIPE_REPLY_TOPICS "
            f"({','.join(k.reply_topics)}): the workers would not answer there"
        )
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
        if var.shown is not None:
            shown = var.shown
        elif value is None or value in ("", ()):
            shown = "(off)"
        else:
            shown = f"`{','.join(value) if isinstance(value, tuple) else value}`"
        rows.append(f"| `{var.name}` | {shown} | {var.help} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(env_table())
