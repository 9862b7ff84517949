"""kvpipe: streaming inference on Kafka with parameters in Redis behind an async cache."""

from pipeline.cache.cache import CacheStats, ParamCache, Source
from pipeline.cache.singleflight import SingleFlight
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
from pipeline.io.kv import KeyValue, open_kv
from pipeline.io.wire import Request, Result
from pipeline.metrics import StatusServer, WorkerMetrics
from pipeline.params.models import MLP, EmbeddingScorer, LinearHeads, Model, build_model, preset
from pipeline.params.registry import ModelRegistry, Resolved
from pipeline.params.store import Manifest, ParamStore
from pipeline.params.updates import Announcement, UpdateListener
from pipeline.serving.worker import Worker, WorkerStats

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
