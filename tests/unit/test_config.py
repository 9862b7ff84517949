"""Settings from env: parsing, validation, redaction."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from typing import Any, Literal, get_args, get_origin, get_type_hints

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


# -- one source of truth: each setting's env name, parser, help, choices and flag -------------


def _leaves(cls: type[Any], prefix: str = "") -> Iterator[tuple[str, dataclasses.Field[Any], Any]]:
    """Every non-group field under ``cls`` as (dotted path, field, resolved type)."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            yield from _leaves(hint, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, hint


def test_every_env_setting_has_exactly_one_name_parser_and_help() -> None:
    by_path = {v.path: v for v in ENV_VARS}
    assert len(by_path) == len(ENV_VARS), "two variables fill one setting"
    names = [v.name for v in ENV_VARS]
    assert len(set(names)) == len(names), "one variable name used twice"
    leaves = {path: (f, hint) for path, f, hint in _leaves(Settings)}
    from_env = {path for path, (f, _) in leaves.items() if f.metadata}
    assert set(by_path) == from_env, "ENV_VARS is exactly the fields declared with setting()"
    for path, var in by_path.items():
        f, _ = leaves[path]
        assert var.name.startswith("KVPIPE_") and var.name.isupper(), var.name
        assert callable(var.parse), var.name
        assert var.help and "{choices}" not in var.help, var.name
        assert var.secret == (not f.repr), f"{var.name}: a secret is never in a repr"
        default = "" if f.default is None else f.default
        raw = ",".join(default) if isinstance(default, tuple) else str(default)
        if raw:  # the default survives its own parser: env and code agree
            assert var.parse(raw) == f.default, var.name


def test_choices_come_from_the_literal_and_a_bad_value_names_them() -> None:
    for path, _f, hint in _leaves(Settings):
        var = next((v for v in ENV_VARS if v.path == path), None)
        if var is None or get_origin(hint) is not Literal:
            continue
        assert var.choices == get_args(hint), var.name
        for choice in var.choices:
            assert choice in var.help, f"{var.name}: help does not name {choice}"
            assert var.parse(choice) == choice
        with pytest.raises(ConfigError, match=re.escape(f"{var.name}='nope': must be one of")):
            settings_from_env({var.name: "nope"})
    with pytest.raises(ConfigError, match=r"must be one of lru, lfu, wtinylfu$"):
        settings_from_env({"KVPIPE_CACHE_POLICY": "fifo"})
    with pytest.raises(ConfigError, match=r"must be one of debug, info, warning, error$"):
        settings_from_env({"KVPIPE_LOG_LEVEL": "verbose"})


def test_every_cli_flag_maps_to_a_real_field_with_its_choices() -> None:
    from pipeline.cli import _FLAG_PATHS, build_parser

    leaves = {path for path, _f, _hint in _leaves(Settings)}
    by_path = {v.path: v for v in ENV_VARS}
    assert _FLAG_PATHS and set(_FLAG_PATHS.values()) <= leaves
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    seen: set[str] = set()
    for name, command in sub.choices.items():  # type: ignore[union-attr]
        for action in command._actions:
            if action.dest not in _FLAG_PATHS:
                continue
            var = by_path[_FLAG_PATHS[action.dest]]
            assert var.flag in action.option_strings, (name, action.dest)
            assert tuple(action.choices or ()) == var.choices, (name, var.flag)
            seen.add(action.dest)
    assert seen == set(_FLAG_PATHS), "a settings flag no command takes"


def test_flags_override_the_environment_with_the_same_parsers(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from pipeline.cli import build_parser, build_settings

    parser = build_parser()
    args = parser.parse_args(
        ["serve", "--cache-policy", "wtinylfu", "--cache-bytes", "1024", "--log-level", "debug"]
    )
    s = build_settings(args, {"KVPIPE_CACHE_POLICY": "lfu", "KVPIPE_CACHE_TTL": "9"})
    assert s.cache.policy == "wtinylfu" and s.cache.capacity_bytes == 1024
    assert s.cache.ttl_s == 9.0 and s.log_level == "debug"
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--cache-bytes=-1"])
    assert "argument --cache-bytes: must be a positive integer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--cache-policy", "fifo"])
    assert "'lru', 'lfu', 'wtinylfu'" in capsys.readouterr().err


def test_help_lists_every_variable_with_its_help() -> None:
    from pipeline.cli import build_parser

    epilog = build_parser().epilog or ""
    for var in ENV_VARS:
        assert re.search(rf"^  {var.name} +{re.escape(var.help)}$", epilog, re.M), var.name
