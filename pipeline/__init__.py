"""kvpipe: streaming inference on Kafka with parameters in Redis behind an async cache.

The public API is the few names below; everything else is imported from its subpackage
(``pipeline.serving``, ``pipeline.params``, ``pipeline.cache``, ``pipeline.io``...). Importing
this package loads no Redis client, no bench, plotting or local-service module, and changes no
other library's global state.
"""

from pipeline.client import InferenceClient, ResultStream, ResultTimeout, SyncClient
from pipeline.config import Settings, settings_from_env
from pipeline.errors import ConfigError, KvpipeError, RequestError, ServiceError
from pipeline.io.kv import KeyValue, open_kv
from pipeline.io.wire import Request, Result
from pipeline.params.store import ParamStore

__all__ = [
    "ConfigError",
    "InferenceClient",
    "KeyValue",
    "KvpipeError",
    "ParamStore",
    "Request",
    "RequestError",
    "Result",
    "ResultStream",
    "ResultTimeout",
    "ServiceError",
    "Settings",
    "SyncClient",
    "open_kv",
    "settings_from_env",
]
