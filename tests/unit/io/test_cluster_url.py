"""Cluster URLs: parsed into seeds and credentials, refused with one line where they cannot
be used, never echoing a password."""

from __future__ import annotations

import pytest

from pipeline.config import RedisSettings
from pipeline.errors import ConfigError
from pipeline.io.kv import open_kv
from pipeline.io.kv.redis_cluster import RedisClusterKV, is_cluster_url, parse_cluster_url
from pipeline.redact import redact_url, url_secrets


def test_seeds_credentials_and_tls() -> None:
    target = parse_cluster_url(
        "redis+cluster://alice:p%40ss@10.0.0.1:7000,10.0.0.2:7001,[::1]:7002"
    )
    assert target.nodes == (("10.0.0.1", 7000), ("10.0.0.2", 7001), ("::1", 7002))
    assert (target.username, target.password, target.ssl) == ("alice", "p@ss", False)
    tls = parse_cluster_url("rediss+cluster://:secret@h/0")
    assert tls.nodes == (("h", 6379),) and tls.password == "secret" and tls.ssl
    assert tls.username is None
    assert is_cluster_url("REDIS+CLUSTER://h:1") and not is_cluster_url("redis://h:1/0")


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+cluster://:hunter2@h:7000/3", "database"),
        ("redis+cluster://:hunter2@h:notaport", "port"),
        ("redis+cluster://:hunter2@", "no node"),
        ("redis+cluster://:hunter2@h:7000?timeout=1", "query"),
    ],
)
def test_bad_cluster_urls_are_one_line_without_the_password(url: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says) as caught:
        parse_cluster_url(url)
    assert "hunter2" not in str(caught.value) and "\n" not in str(caught.value)


def test_open_kv_picks_the_cluster_adapter() -> None:
    kv = open_kv(RedisSettings(url="redis+cluster://127.0.0.1:7000,127.0.0.1:7001"))
    assert isinstance(kv, RedisClusterKV) and kv.cluster and kv.backend == "redis-py"


@pytest.mark.parametrize(
    "url", ["redis+cluster://:hunter2@h:7000", "rediss+cluster://:hunter2@h:7000,h:7001/0"]
)
def test_asyncio_redis_refuses_a_cluster_with_one_line(url: str) -> None:
    settings = RedisSettings(url=url, backend="asyncio-redis")
    with pytest.raises(ConfigError, match="KVPIPE_REDIS_BACKEND=redis-py") as caught:
        open_kv(settings)
    message = str(caught.value)
    assert "Redis Cluster" in message and "hunter2" not in message and "\n" not in message


def test_a_cluster_url_is_redacted() -> None:
    url = "redis+cluster://alice:s3cret@10.0.0.1:7000,10.0.0.2:7001"
    assert redact_url(url) == "redis+cluster://alice:***@10.0.0.1:7000,10.0.0.2:7001"
    assert "s3cret" in url_secrets(url)
