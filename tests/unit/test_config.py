"""Settings from env: parsing, validation, redaction."""

from __future__ import annotations

import dataclasses

import pytest

from pipeline.config import ENV_VARS, Settings, settings_from_env
from pipeline.errors import ConfigError
from pipeline.redact import redact_url


def test_env_overrides_defaults() -> None:
    s = settings_from_env(
        {
            "KVPIPE_KAFKA": "k1:9092,k2:9092",
            "KVPIPE_REDIS": "redis://u:pw@r:6380/2",
            "KVPIPE_CACHE_BYTES": "1024",
            "KVPIPE_CACHE_POLICY": "lfu",
            "KVPIPE_TOPIC_PREFIX": "x",
        }
    )
    assert s.kafka.bootstrap == "k1:9092,k2:9092"
    assert s.cache.capacity_bytes == 1024 and s.cache.policy == "lfu"
    assert s.kafka.requests_topic == "x.requests" and s.kafka.dlq_topic == "x.dlq"
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.kafka.bootstrap = "other"  # type: ignore[misc]


def test_bad_values_give_one_line_naming_the_variable() -> None:
    with pytest.raises(ConfigError, match="KVPIPE_CACHE_BYTES='-1'"):
        settings_from_env({"KVPIPE_CACHE_BYTES": "-1"})
    with pytest.raises(ConfigError, match="lru, lfu"):
        settings_from_env({"KVPIPE_CACHE_POLICY": "fifo"})
    with pytest.raises(ConfigError, match="must start with redis"):
        settings_from_env({"KVPIPE_REDIS": "http://x"})


def test_secrets_never_appear_in_errors() -> None:
    assert redact_url("redis://user:s3cret@host:1/0") == "redis://user:***@host:1/0"
    assert redact_url("redis://host:1/0") == "redis://host:1/0"
    with pytest.raises(ConfigError) as info:
        settings_from_env({"KVPIPE_REDIS": "ftp://u:s3cret@h"})
    assert "s3cret" not in str(info.value)


def test_every_env_var_names_a_real_setting() -> None:
    s = Settings()
    for var in ENV_VARS:
        obj: object = s
        for part in var.path.split("."):
            assert hasattr(obj, part), var.name
            obj = getattr(obj, part)


def test_settings_round_trip_through_env() -> None:
    from pipeline.config import settings_to_env, with_values

    s = with_values(
        Settings(), {"kafka.topic_prefix": "p", "cache.policy": "lfu", "worker.worker_id": "w1"}
    )
    assert settings_from_env(settings_to_env(s)) == s


def test_kafka_security_is_passed_through_and_never_shown() -> None:
    from pipeline.io.kafka import _options

    s = settings_from_env(
        {
            "KVPIPE_KAFKA_SECURITY": "SASL_SSL",
            "KVPIPE_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "KVPIPE_KAFKA_SASL_USERNAME": "svc",
            "KVPIPE_KAFKA_SASL_PASSWORD": "kafka-s3cret",
        }
    )
    options = _options(s.kafka)
    assert options["security_protocol"] == "SASL_SSL"
    assert options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert options["sasl_plain_username"] == "svc"
    assert options["sasl_plain_password"] == "kafka-s3cret"
    assert options["ssl_context"] is not None
    assert "kafka-s3cret" not in repr(s)
    assert "security_protocol" in _options(Settings().kafka)
    assert "sasl_plain_password" not in _options(Settings().kafka)


def test_kafka_security_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="needs KVPIPE_KAFKA_SASL_USERNAME"):
        settings_from_env({"KVPIPE_KAFKA_SECURITY": "SASL_PLAINTEXT"})
    with pytest.raises(ConfigError, match="no SSL"):
        settings_from_env({"KVPIPE_KAFKA_SSL_CAFILE": "/tmp/ca.pem"})
