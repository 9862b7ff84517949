"""Generation through Tansu and a real Redis: tokens stream to the client as they are made,
the client drops a redelivered request's duplicates, a second worker reuses through Redis what
the first computed, and chunk keys carry their TTL."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from typing import Any

import numpy as np
import pytest
import redis.asyncio as redis_py

from pipeline.client import InferenceClient
from pipeline.config import settings_to_env
from pipeline.io.kv import open_kv
from pipeline.io.stream import encode_generation
from pipeline.io.wire import H_CONTENT_TYPE, H_REPLY_TO
from pipeline.params.models import preset
from pipeline.params.store import ParamStore
from pipeline.params.transformer import transformer_of

pytestmark = pytest.mark.integration

MODEL = preset("gen-tiny")
T = transformer_of(MODEL)
assert T is not None
PARAMS = MODEL.init(5)
SYSTEM = "System: you answer questions about the kvpipe project, briefly and exactly. " * 2


def greedy(prompt: str, n: int) -> list[int]:
    state = T.new_state()
    logits = T.prefill(PARAMS, list(prompt.encode()), state)
    out: list[int] = []
    for _ in range(n):
        out.append(int(np.argmax(logits)))
        if len(out) < n:
            logits = T.decode(PARAMS, [out[-1]], [state])[0]
    return out


async def _publish(settings: Any) -> None:
    async with open_kv(settings.redis) as kv:
        await ParamStore(kv, prefix=settings.redis.key_prefix).publish("gpt", MODEL.arch, PARAMS)


async def test_tokens_stream_and_a_second_worker_reuses_the_first_ones_prefix(
    make_settings: Any, start_worker: Any, make_client: Any
) -> None:
    settings = make_settings(cache__prefix_ttl_s=120.0)
    await _publish(settings)
    await make_client(settings)
    first = await start_worker(settings)
    async with InferenceClient(settings.kafka) as client:
        pieces = [p async for p in client.generate("gpt", SYSTEM + "Q: what?", max_tokens=24)]
        final = pieces[-1].final
        assert final is not None and final.ok and final.finish_reason == "length"
        assert len(pieces) >= 2  # streamed, not one answer at the end
        tokens = [t for p in pieces for t in p.tokens]
        assert tokens == final.tokens == greedy(SYSTEM + "Q: what?", 24)
        assert final.prefix["reused_tokens"] == 0
        await first.stop()
        second = await start_worker(settings)  # its own, empty caches
        pieces = [p async for p in client.generate("gpt", SYSTEM + "Q: why?", max_tokens=24)]
        final = pieces[-1].final
        assert final is not None and final.ok
        shared = len(SYSTEM) // T.kv_chunk * T.kv_chunk
        assert final.prefix["redis_tokens"] == shared and final.prefix["local_tokens"] == 0
        assert final.tokens == greedy(SYSTEM + "Q: why?", 24)
        assert second.worker.generation.prefix.stats.redis_chunks == shared // T.kv_chunk
    client_redis = redis_py.from_url(settings.redis.url)
    try:
        keys = await client_redis.keys(f"{settings.redis.key_prefix}:gpt:v1:kv:*")
        assert len(keys) >= shared // T.kv_chunk
        ttls = [await client_redis.pttl(k) for k in keys]
        assert all(0 < ttl <= 120_000 for ttl in ttls)
    finally:
        await client_redis.aclose()


async def test_the_client_drops_the_duplicates_of_a_redelivered_request(
    make_settings: Any, start_worker: Any, make_client: Any
) -> None:
    settings = make_settings()
    await _publish(settings)
    await make_client(settings)
    await start_worker(settings)
    async with InferenceClient(settings.kafka) as client:
        value = encode_generation(id="dup", model="gpt", prompt="Hello there", max_tokens=30)
        headers = [(H_CONTENT_TYPE, b"application/json"), (H_REPLY_TO, client.reply_topic.encode())]
        pieces = []
        async for piece in client.generate("gpt", "Hello there", max_tokens=30, id="dup"):
            if not pieces:  # the same request again, as after a redelivery
                await client.submit_raw(value, key=b"dup", headers=headers)
                await client.flush()
            pieces.append(piece)
        final = pieces[-1].final
        assert final is not None and final.ok
        tokens = [t for p in pieces for t in p.tokens]
        assert tokens == final.tokens == greedy("Hello there", 30)  # each token once
        async with client.stream(from_beginning=True, topic=client.reply_topic) as stream:
            seen: list[Any] = []
            for _ in range(40):
                seen += await stream.next_batch(0.5)
                if sum(r.id == "dup" for r in seen) >= 62:
                    break
        assert sum(r.id == "dup" for r in seen) == 62  # two answers of 31 messages each


async def test_bad_generation_requests_are_answered_with_their_codes(
    make_settings: Any, start_worker: Any, make_client: Any
) -> None:
    settings = make_settings()
    await _publish(settings)
    await make_client(settings)
    await start_worker(settings)
    async with InferenceClient(settings.kafka) as client:
        codes = {}
        for name, kwargs in {
            "context_too_long": {"prompt": "x" * 600},
            "bad_sampling": {"prompt": "hi", "top_k": -3},
            "unknown_model": {"prompt": "hi", "model": "nope"},
        }.items():
            model = kwargs.pop("model", "gpt")
            pieces = [p async for p in client.generate(model, max_tokens=8, **kwargs)]
            final = pieces[-1].final
            assert final is not None and not final.ok
            codes[name] = final.error_code
    assert codes == {k: k for k in codes}
    assert json.dumps(codes)


async def _spawn(settings: Any, worker_id: str) -> asyncio.subprocess.Process:
    env = {
        **os.environ,
        **settings_to_env(settings),
        "KVPIPE_WORKER_ID": worker_id,
        "KVPIPE_LOG_FORMAT": "json",
    }
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "consumers.inference",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )


async def test_worker_process_b_reuses_what_worker_process_a_computed(
    make_settings: Any, make_client: Any
) -> None:
    settings = make_settings()
    await _publish(settings)
    await make_client(settings)
    procs = []
    try:
        async with InferenceClient(settings.kafka) as client:
            procs.append(await _spawn(settings, "proc-a"))
            pieces = [p async for p in client.generate("gpt", SYSTEM + "A?", max_tokens=8)]
            first = pieces[-1].final
            assert first is not None and first.ok and first.worker == "proc-a"
            procs[0].send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(procs[0].wait(), 40) == 0
            procs.append(await _spawn(settings, "proc-b"))
            pieces = [p async for p in client.generate("gpt", SYSTEM + "B?", max_tokens=8)]
            second = pieces[-1].final
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), 40)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
    assert second is not None and second.ok and second.worker == "proc-b"
    shared = len(SYSTEM) // T.kv_chunk * T.kv_chunk
    assert second.prefix["redis_tokens"] == shared and second.prefix["local_tokens"] == 0
    assert second.tokens == greedy(SYSTEM + "B?", 8)
