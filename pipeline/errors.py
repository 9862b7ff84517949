"""The exception tree: one root, a few families, each error with a stable code.

Foreign errors (aiokafka, redis-py, asyncio-redis) are translated where they enter, so
callers above the adapters only ever catch :class:`KvpipeError` and its families.
"""

from __future__ import annotations


class KvpipeError(Exception):
    """Root of every error kvpipe raises on purpose."""

    code: str = "internal"
    retryable: bool = False
    #: True only when the store could not be asked at all: then an expired cached value may
    #: be served (marked stale). Never when the store answered that the data is gone.
    serve_stale: bool = False

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self)


class ConfigError(KvpipeError):
    """Settings that cannot work; fix the flag or environment variable named."""

    code = "config"


class ServiceError(KvpipeError):
    """A backing service (Redis, the broker) is absent, unreachable or misbehaving."""

    code = "service_unavailable"
    retryable = True


class StoreUnavailable(ServiceError):
    """Redis could not be reached or did not answer in time."""

    code = "params_unavailable"
    serve_stale = True


class StoreOutOfMemory(ServiceError):
    """Redis refused a write because it is at ``maxmemory``; retrying soon will not help."""

    code = "store_out_of_memory"
    retryable = False


class BrokerUnavailable(ServiceError):
    """The Kafka-protocol broker could not be reached or did not answer in time."""

    code = "broker_unavailable"


class LocalServiceError(ServiceError):
    """A local Redis or broker process could not be found or started."""

    code = "local_service"
    retryable = False


class ParamsError(KvpipeError):
    """Model parameters are missing or unusable."""

    code = "params_error"


class ModelNotFound(ParamsError):
    """No model (or no such version of it) is published."""

    code = "unknown_model"


class VersionNotFound(ModelNotFound):
    """The model exists but the requested version does not (or has expired)."""

    code = "unknown_version"


class ParamsCorrupt(ParamsError):
    """Stored bytes fail their manifest check (sha256, dtype, shape)."""

    code = "params_corrupt"


class ParamsUnavailable(ParamsError):
    """Parameters are not cached and cannot be loaded right now; try again later."""

    code = "params_unavailable"
    retryable = True


class RequestError(KvpipeError):
    """A request that was read but cannot be answered as asked (bad shape, unknown model...)."""

    code = "bad_request"


class UnreadableMessage(KvpipeError):
    """Bytes that cannot be read as a request at all; they go to the dead-letter topic."""

    code = "unreadable"
