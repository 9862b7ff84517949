"""ParamStore on real Redis, through both adapter backends, and on a Redis Cluster."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import numpy as np
import pytest
import pytest_asyncio

from pipeline.config import RedisBackend, RedisSettings
from pipeline.errors import ParamsCorrupt
from pipeline.io.kv import KeyValue, open_kv
from pipeline.params.models import preset
from pipeline.params.store import ParamStore

pytestmark = [
    pytest.mark.integration,
    pytest.mark.parametrize(
        ("redis_url", "backend"),
        [("single", "redis-py"), ("single", "asyncio-redis"), ("cluster", "redis-py")],
        indirect=["redis_url"],
    ),
]


@pytest_asyncio.fixture
async def store(redis_url: str, backend: RedisBackend) -> AsyncIterator[ParamStore]:
    settings = RedisSettings(url=redis_url, backend=backend)
    async with open_kv(settings) as kv:
        yield ParamStore(kv, prefix=f"s{uuid.uuid4().hex[:8]}")


async def test_publish_load_round_trip_article(store: ParamStore) -> None:
    model = preset("article")
    params = model.init(3)
    manifest = (await store.publish("article", model.arch, params)).manifest
    assert manifest.nbytes == 2 * (1000 * 1000 + 1000) * 4
    got_manifest, loaded = await store.load("article")
    assert got_manifest == manifest
    for name, arr in params.items():
        assert loaded[name].dtype == np.float32 and np.array_equal(loaded[name], arr)


async def test_tamper_is_detected(store: ParamStore) -> None:
    model = preset("mlp")
    manifest = (await store.publish("m", model.arch, model.init(1))).manifest
    kv: KeyValue = store.kv
    key = store.tensor_key("m", manifest.version, "w1")
    raw = bytearray(await kv.get(key) or b"")
    raw[200] ^= 1
    await kv.set(key, bytes(raw))
    with pytest.raises(ParamsCorrupt, match="sha256"):
        await store.tensor(manifest, "w1")


async def test_versions_listing_and_rollback(store: ParamStore) -> None:
    model = preset("mlp")
    for seed in range(3):
        await store.publish("m", model.arch, model.init(seed))
    assert [(v.version, v.current, v.available) for v in await store.versions("m")] == [
        (1, False, True),
        (2, False, True),
        (3, True, True),
    ]
    await store.set_current("m", 2)
    _, params = await store.load("m")
    assert np.array_equal(params["w0"], model.init(1)["w0"])
