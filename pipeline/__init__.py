"""kvpipe: streaming inference on Kafka with parameters in Redis behind an async cache."""

from pipeline.cache import CacheStats, ParamCache, Source
from pipeline.client import InferenceClient, ResultStream, ResultTimeout
from pipeline.config import (
    CacheSettings,
    KafkaSettings,
    LimitSettings,
    RedisSettings,
    Settings,
    WorkerSettings,
    settings_from_env,
)
from pipeline.errors import (
    BrokerUnavailable,
    ConfigError,
    KvpipeError,
    LocalServiceError,
    ModelNotFound,
    ParamsCorrupt,
    ParamsError,
    ParamsUnavailable,
    RequestError,
    ServiceError,
    StoreOutOfMemory,
    StoreUnavailable,
    UnreadableMessage,
    VersionNotFound,
)
from pipeline.kv import KeyValue, open_kv
from pipeline.metrics import StatusServer, WorkerMetrics
from pipeline.models import MLP, EmbeddingScorer, LinearHeads, Model, build_model, preset
from pipeline.registry import ModelRegistry, Resolved
from pipeline.singleflight import SingleFlight
from pipeline.store import Manifest, ParamStore
from pipeline.updates import Announcement, UpdateListener
from pipeline.wire import Request, Result
from pipeline.worker import Worker, WorkerStats

__all__ = [
    "MLP",
    "Announcement",
    "BrokerUnavailable",
    "CacheSettings",
    "CacheStats",
    "ConfigError",
    "EmbeddingScorer",
    "InferenceClient",
    "KafkaSettings",
    "KeyValue",
    "KvpipeError",
    "LimitSettings",
    "LinearHeads",
    "LocalServiceError",
    "Manifest",
    "Model",
    "ModelNotFound",
    "ModelRegistry",
    "ParamCache",
    "ParamStore",
    "ParamsCorrupt",
    "ParamsError",
    "ParamsUnavailable",
    "RedisSettings",
    "Request",
    "RequestError",
    "Resolved",
    "Result",
    "ResultStream",
    "ResultTimeout",
    "ServiceError",
    "Settings",
    "SingleFlight",
    "Source",
    "StatusServer",
    "StoreOutOfMemory",
    "StoreUnavailable",
    "UnreadableMessage",
    "UpdateListener",
    "VersionNotFound",
    "Worker",
    "WorkerMetrics",
    "WorkerSettings",
    "WorkerStats",
    "build_model",
    "open_kv",
    "preset",
    "settings_from_env",
]
