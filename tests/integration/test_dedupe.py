"""Dedupe's records and lookups on a real Redis: both backends, and a Redis Cluster."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from pipeline.config import Settings
from pipeline.io.kv import open_kv
from pipeline.serving.dedupe import Dedupe

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("redis_url", "backend"),
    [("single", "redis-py"), ("single", "asyncio-redis"), ("cluster", "redis-py")],
    indirect=["redis_url"],
)  # asyncio-redis refuses a cluster (tests/unit/io/test_cluster_url.py)
async def test_recorded_ids_are_found_and_expire_with_their_bucket(
    make_settings: Callable[..., Settings], redis_url: str, backend: str
) -> None:
    settings = make_settings(redis__backend=backend)
    async with open_kv(settings.redis) as kv:
        d = Dedupe(
            kv, key_prefix=settings.redis.key_prefix, topic="t.requests", group="g", ttl_s=60.0
        )
        ids = [f"r{i}" for i in range(300)] + ["ünïcødé", "a:b{c}", "x" * 256]
        entries = [(rid, f"fp-{rid}".encode()) for rid in ids]
        await d.record(entries)
        asked = [*entries, ("never", b"fp"), ("r1", b"another message under a recorded id")]
        assert await d.answered(asked) == [True] * len(ids) + [False, False]
        assert d.stats.failures == 0
        # the bucket's hash lives two TTLs at most, so Redis forgets on its own
        key = d.key(d.bucket())
        assert await kv.exists(key)
        assert await kv.expire(key, 0.001) is True  # still had an expiry to shorten
