"""InferenceClient against a running worker: request-reply at scale, streams, pinning."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.client import InferenceClient, ResultTimeout, SyncClient
from pipeline.config import settings_to_env, with_values
from pipeline.errors import ConfigError
from pipeline.io.kafka import ensure_topics, list_topics
from pipeline.io.kv import open_kv
from pipeline.io.wire import Result
from pipeline.params.models import build_model, preset
from pipeline.params.store import ParamStore

pytestmark = pytest.mark.integration


async def test_thousand_concurrent_infer_calls(
    make_settings: Any, start_worker: Any, make_client: Any
) -> None:
    settings = make_settings()
    model = preset("mlp")
    params = model.init(2)
    async with open_kv(settings.redis) as kv:
        await ParamStore(kv, prefix=settings.redis.key_prefix).publish("m", model.arch, params)
    await make_client(settings)  # creates the topics
    await start_worker(settings)
    x = np.random.default_rng(3).standard_normal((1000, 32)).astype(np.float32)
    async with InferenceClient(settings.kafka) as client:
        results = await asyncio.gather(
            *(client.infer("m", x[i : i + 1], timeout=60) for i in range(1000))
        )
    expected = model.forward(params, x)
    assert len({r.id for r in results}) == 1000
    for i, r in enumerate(results):
        assert r.ok and r.version == 1
        np.testing.assert_allclose(r.outputs[0], expected[i], rtol=1e-4, atol=1e-5)  # type: ignore[index]


async def test_infer_pins_versions_and_times_out_cleanly(
    make_settings: Any, start_worker: Any, make_client: Any
) -> None:
    settings = make_settings()
    model = preset("mlp")
    async with open_kv(settings.redis) as kv:
        store = ParamStore(kv, prefix=settings.redis.key_prefix)
        await store.publish("m", model.arch, model.init(1))
        await store.publish("m", model.arch, model.init(2))
    await make_client(settings)
    await start_worker(settings)
    async with InferenceClient(settings.kafka) as client:
        old = await client.infer("m", np.ones((1, 32)), version=1, timeout=30)
        new = await client.infer("m", np.ones((1, 32)), timeout=30)
        assert (old.version, new.version) == (1, 2)
        np.testing.assert_allclose(
            old.outputs,
            model.forward(
                model.init(1),
                np.ones(
                    (1, 32),  # type: ignore[arg-type]
                    dtype=np.float32,
                ),
            ),
            rtol=1e-5,
        )
        unknown = await client.infer("ghost", np.ones((1, 32)), timeout=30)
        assert unknown.error_code == "unknown_model"
    other = make_settings()  # no worker listens on these topics
    await make_client(other)
    async with InferenceClient(other.kafka) as lonely:
        with pytest.raises(ResultTimeout):
            await lonely.infer("m", np.ones((1, 32)), timeout=0.5)


# -- request-reply without leaking topics (issue 15, item 1) ---------------------------------


async def _publish_mlp(settings: Any) -> tuple[Any, Any]:
    model = preset("mlp")
    params = model.init(2)
    async with open_kv(settings.redis) as kv:
        await ParamStore(kv, prefix=settings.redis.key_prefix).publish("m", model.arch, params)
    return model, params


def _replies(topics: frozenset[str], settings: Any) -> set[str]:
    return {t for t in topics if t.startswith(f"{settings.kafka.topic_prefix}.replies.")}


async def test_ten_client_lifetimes_leave_no_reply_topic_behind(
    make_settings: Any, start_worker: Any, make_client: Any
) -> None:
    """Each client's own reply topic is gone after its close, also after the worker's
    producer refreshed its metadata for the next client's topic (Tansu creates any topic a
    metadata request names, so a deleted topic the worker still tracked would come back)."""
    settings = make_settings()
    model, params = await _publish_mlp(settings)
    await make_client(settings)
    await start_worker(settings)
    before = await list_topics(settings.kafka)
    x = np.random.default_rng(5).standard_normal((10, 32)).astype(np.float32)
    used = []
    for i in range(10):
        async with InferenceClient(settings.kafka) as client:
            result = await client.infer("m", x[i : i + 1], timeout=60)
            assert result.ok, result.error_message
            np.testing.assert_allclose(
                result.outputs[0],  # type: ignore[index]
                model.forward(params, x[i : i + 1])[0],
                rtol=1e-4,
                atol=1e-5,
            )
            assert client.owns_reply_topic
            assert client.reply_topic in await list_topics(settings.kafka)
            used.append(client.reply_topic)
    assert len(set(used)) == 10
    # One more answer makes the worker's producer ask for metadata of what it tracks.
    async with InferenceClient(settings.kafka) as last:
        assert (await last.infer("m", x[:1], timeout=60)).ok
    after = await list_topics(settings.kafka)
    assert _replies(after, settings) == set(), sorted(_replies(after, settings))
    assert after == before
    print(f"\nten infer() client lifetimes: {len(used)} reply topics made, "
          f"{len(_replies(after, settings))} left; topics before {len(before)}, "
          f"after {len(after)}")  # fmt: skip


async def test_close_twice_and_cancelled_close_still_delete_the_reply_topic(
    make_settings: Any, start_worker: Any, make_client: Any
) -> None:
    settings = make_settings()
    await _publish_mlp(settings)
    await make_client(settings)
    await start_worker(settings)
    client = InferenceClient(settings.kafka)
    await client.start()
    assert (await client.infer("m", np.ones((1, 32)), timeout=60)).ok
    assert client.reply_topic in await list_topics(settings.kafka)
    closing = asyncio.ensure_future(client.aclose())
    await asyncio.sleep(0)  # the clean-up has started
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    assert client.reply_topic not in await list_topics(settings.kafka)
    await client.aclose()  # twice: nothing happens
    await client.aclose()
    with pytest.raises(ConfigError, match="closed"):
        await client.infer("m", np.ones((1, 32)))
    never_used = InferenceClient(settings.kafka)  # closed without a start or an infer
    await never_used.aclose()
    await never_used.aclose()
    assert _replies(await list_topics(settings.kafka), settings) == set()


async def test_a_shared_reply_topic_is_filtered_by_id_and_never_deleted(
    make_settings: Any, start_worker: Any, make_client: Any
) -> None:
    settings = make_settings()
    shared = f"{settings.kafka.topic_prefix}.replies.shared"
    settings = with_values(settings, {"kafka.reply_topic": shared})
    model, params = await _publish_mlp(settings)
    await make_client(settings)
    await ensure_topics(settings.kafka, [shared], partitions=3)
    await start_worker(settings)
    before = await list_topics(settings.kafka)
    x = np.random.default_rng(7).standard_normal((40, 32)).astype(np.float32)
    async with InferenceClient(settings.kafka) as a, InferenceClient(settings.kafka) as b:
        assert a.reply_topic == b.reply_topic == shared and not a.owns_reply_topic
        results = await asyncio.gather(
            *((a if i % 2 else b).infer("m", x[i : i + 1], timeout=60) for i in range(40))
        )
    expected = model.forward(params, x)
    for i, r in enumerate(results):
        assert r.ok
        np.testing.assert_allclose(r.outputs[0], expected[i], rtol=1e-4, atol=1e-5)  # type: ignore[index]
    assert await list_topics(settings.kafka) == before, "a shared client created or deleted"
    absent = f"{settings.kafka.topic_prefix}.replies.fresh"
    async with InferenceClient(settings.kafka, reply_topic=absent) as c:
        assert (await c.infer("m", x[:1], timeout=60)).ok
    assert absent in await list_topics(settings.kafka), "created when absent, kept on close"
    async with InferenceClient(settings.kafka, reply_topic=settings.kafka.requests_topic) as bad:
        with pytest.raises(ConfigError, match="KVPIPE_REPLY_TOPICS"):
            await bad.infer("m", x[:1])
        await bad.submit("m", x[:1])  # fire and forget needs no reply topic


async def test_infer_sends_ids_to_an_embedding_model(
    make_settings: Any, start_worker: Any, make_client: Any
) -> None:
    settings = make_settings()
    arch = {"kind": "embedding", "users": 50, "items": 60, "dim": 4}
    scorer = build_model(arch)
    assert scorer.kind == "embedding"
    tables = scorer.init_tables(0)
    async with open_kv(settings.redis) as kv:
        store = ParamStore(kv, prefix=settings.redis.key_prefix)
        await store.publish("rec", arch, scorer.init(0), tables=tables)
    await make_client(settings)
    await start_worker(settings)
    ids = np.array([[3, 7], [49, 0]])
    async with InferenceClient(settings.kafka) as client:
        result = await client.infer("rec", ids=ids, timeout=60)
        bad = await client.infer("rec", ids=[[0, 60]], timeout=60)
    expected = scorer.forward(
        {"user": tables["user"][ids[:, 0]], "item": tables["item"][ids[:, 1]],
         "bias": np.zeros(1, np.float32)}, ids)  # fmt: skip
    assert result.ok
    np.testing.assert_allclose(np.asarray(result.outputs), expected, rtol=1e-5)
    assert bad.error_code == "bad_ids"


async def test_sync_client_answers_from_plain_code(
    make_settings: Any, start_worker: Any, make_client: Any
) -> None:
    settings = make_settings()
    model, params = await _publish_mlp(settings)
    await make_client(settings)
    await start_worker(settings)
    x = np.random.default_rng(9).standard_normal((3, 32)).astype(np.float32)

    def script() -> tuple[list[Result], str]:  # what a user's script does, no asyncio in sight
        with SyncClient(settings.kafka) as client:
            return [client.infer("m", x[i : i + 1], timeout=60) for i in range(3)], (
                client.reply_topic
            )

    # the worker runs on this test's loop: the blocking script runs in a thread meanwhile
    results, topic = await asyncio.to_thread(script)
    for i, r in enumerate(results):
        np.testing.assert_allclose(r.outputs[0], model.forward(params, x)[i], rtol=1e-4, atol=1e-5)  # type: ignore[index]
    assert topic not in await list_topics(settings.kafka)
    closed = SyncClient(settings.kafka)
    closed.close()
    closed.close()
    with pytest.raises(ConfigError):
        closed.infer("m", x[:1])


def readme_python_client() -> str:
    """The README's Python client example (the ```python block after "From Python")."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    after = readme[readme.index("From Python") :]
    start = after.index("```python\n") + len("```python\n")
    return after[start : after.index("```", start)]


async def test_the_readme_python_client_runs_as_written(
    make_settings: Any, start_worker: Any, make_client: Any
) -> None:
    settings = make_settings()
    model = preset("mlp")
    async with open_kv(settings.redis) as kv:
        store = ParamStore(kv, prefix=settings.redis.key_prefix)
        await store.publish("clf", model.arch, model.init(1))
    await make_client(settings)
    await start_worker(settings)
    code = readme_python_client()
    assert len(code.strip().splitlines()) <= 4, code
    out = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", code],
        env={**os.environ, **settings_to_env(settings)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    expected = model.forward(model.init(1), np.full((1, 32), 0.5, np.float32))
    printed = np.array(out.stdout.replace("[", " ").replace("]", " ").split(), dtype=np.float32)
    np.testing.assert_allclose(printed, expected.ravel(), rtol=1e-4, atol=1e-6)
    assert _replies(await list_topics(settings.kafka), settings) == set()
