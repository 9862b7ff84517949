"""Prefix keys/values: chained names, the checked chunk format, the two-level lookup, single-
flight, the byte budget and the TTL of Redis keys."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from pipeline.errors import ParamsCorrupt
from pipeline.io.kv.memory import MemoryKV
from pipeline.params.keys import PrefixKey
from pipeline.params.models import preset
from pipeline.params.prefix import PrefixCache, chunk_keys, chunk_shape, decode_chunk, encode_chunk
from pipeline.params.transformer import transformer_of

T = transformer_of(preset("gen-tiny"))
assert T is not None
PARAMS = preset("gen-tiny").init(0)
C = T.kv_chunk


def _prompt(n: int, seed: int = 0) -> list[int]:
    return [int(x) for x in np.random.default_rng(seed).integers(0, 256, n)]


def _kv(tokens: list[int]) -> Any:
    state = T.new_state()
    T.prefill(PARAMS, tokens, state)
    return state


def test_names_chain_every_token_and_the_version() -> None:
    a, b = _prompt(64), _prompt(64)
    b[40] ^= 1  # differs in chunk 2
    ka, kb = chunk_keys("m", 1, C, a, 4), chunk_keys("m", 1, C, b, 4)
    assert ka[:2] == kb[:2] and all(x != y for x, y in zip(ka[2:], kb[2:], strict=True))
    assert not set(chunk_keys("m", 2, C, a, 4)) & set(ka)  # a new version reuses nothing
    assert not set(chunk_keys("n", 1, C, a, 4)) & set(ka)
    assert chunk_keys("m", 1, C, a[:32], 2) == ka[:2]  # a prefix names the same chunks


def test_a_chunk_reads_back_and_damage_is_refused() -> None:
    key = PrefixKey("m", 1, "ab" * 32)
    kv = _kv(_prompt(C)).span(0, C)
    blob = encode_chunk(key, kv)
    np.testing.assert_array_equal(decode_chunk(key, blob, chunk_shape(T)), kv)
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0x10
    with pytest.raises(ParamsCorrupt, match="checksum"):
        decode_chunk(key, bytes(flipped), chunk_shape(T))
    with pytest.raises(ParamsCorrupt, match="truncated"):
        decode_chunk(key, blob[:20], chunk_shape(T))
    with pytest.raises(ParamsCorrupt, match="another chunk"):
        decode_chunk(PrefixKey("m", 2, key.digest), blob, chunk_shape(T))
    with pytest.raises(ParamsCorrupt, match="checksum"):
        decode_chunk(key, b"\x80\x04\x95" + blob[3:], chunk_shape(T))  # a pickle is just damage


async def _fill(cache: PrefixCache, tokens: list[int], version: int = 1) -> None:
    state = _kv(tokens)
    for i, key in enumerate(chunk_keys("m", version, C, tokens, len(tokens) // C)):
        cache.keep(key, state.span(i * C, (i + 1) * C))
    await cache.flush()


async def test_lookup_local_first_then_redis_for_a_worker_with_an_empty_cache() -> None:
    kv = MemoryKV()
    prompt = _prompt(70)  # 4 full chunks; 4 usable ((70 - 1) // 16)
    async with (
        PrefixCache(kv, key_prefix="t", capacity_bytes=10**7, ttl_s=60) as a,
        PrefixCache(kv, key_prefix="t", capacity_bytes=10**7, ttl_s=60) as b,
    ):
        await _fill(a, prompt)
        here = await a.lookup("m", 1, T, prompt)
        assert (here.local, here.redis, here.bytes_read) == (4, 0, 0)
        there = await b.lookup("m", 1, T, prompt)
        assert (there.local, there.redis) == (0, 4) and there.bytes_read > 4 * C * 512
        again = await b.lookup("m", 1, T, prompt)
        assert (again.local, again.redis) == (4, 0)
        for got, want in zip(there.chunks, here.chunks, strict=True):
            np.testing.assert_array_equal(got, want)
        # a prompt of exactly 4 chunks reuses 3: its last token is always computed
        exact = await b.lookup("m", 1, T, prompt[:64])
        assert exact.local == 3 and len(exact.keys) == 4
        assert (await b.lookup("m", 2, T, prompt)).chunks == []  # another version


async def test_lookup_stops_at_the_first_miss_and_at_a_damaged_chunk() -> None:
    kv = MemoryKV()
    prompt = _prompt(80)
    async with PrefixCache(kv, key_prefix="t", capacity_bytes=10**7, ttl_s=60) as a:
        await _fill(a, prompt)
    keys = chunk_keys("m", 1, C, prompt, 5)
    cache_key = f"t:m:v1:kv:{keys[2].digest}"
    good = await kv.get(cache_key)
    assert good is not None
    await kv.set(cache_key, good[:-1] + bytes([good[-1] ^ 1]))
    async with PrefixCache(kv, key_prefix="t", capacity_bytes=10**7, ttl_s=60) as b:
        reuse = await b.lookup("m", 1, T, prompt)
        assert (reuse.redis, reuse.damaged) == (2, 1)  # chunks 0 and 1; 2 damaged; 3 unused
        await kv.delete(f"t:m:v1:kv:{keys[0].digest}")
    async with PrefixCache(kv, key_prefix="t", capacity_bytes=10**7, ttl_s=60) as c:
        assert (await c.lookup("m", 1, T, prompt)).chunks == []


async def test_concurrent_requests_compute_a_missing_chunk_once() -> None:
    runs = 0
    value = _kv(_prompt(C)).span(0, C)

    async def run() -> Any:
        nonlocal runs
        runs += 1
        await asyncio.sleep(0.02)
        return value.copy()

    key = chunk_keys("m", 1, C, _prompt(C), 1)[0]
    async with PrefixCache(MemoryKV(), key_prefix="t", capacity_bytes=10**7, ttl_s=60) as cache:
        outs = await asyncio.gather(*(cache.compute(key, run) for _ in range(5)))
        await cache.flush()
        assert cache.stats.writes == 0 and cache.cached(key) is not None  # kept, not yet shared
        cache.share(key, outs[0][0])
        await cache.flush()
    assert runs == 1 and sorted(leader for _, leader in outs) == [False] * 4 + [True]
    assert cache.stats.computed == 1 and cache.stats.joined == 4 and cache.stats.writes == 1


async def test_byte_budget_holds_under_a_chat_trace_and_redis_keys_expire() -> None:
    clock = [0.0]
    kv = MemoryKV(clock=lambda: clock[0])
    chunk_bytes = int(np.prod(chunk_shape(T))) * 4
    budget = 5 * chunk_bytes + 5 * 560
    async with PrefixCache(kv, key_prefix="t", capacity_bytes=budget, ttl_s=30) as cache:
        conversation: list[int] = []
        peak = 0
        for turn in range(6):  # each turn extends the conversation by 40 tokens
            conversation += _prompt(40, seed=turn)
            reuse = await cache.lookup("m", 1, T, conversation)
            before = (len(conversation) - 40) // C  # chunks the earlier turns wrote
            assert len(reuse.chunks) == min(before, (len(conversation) - 1) // C)
            assert reuse.local + reuse.redis == len(reuse.chunks)
            await _fill(cache, conversation)
            peak = max(peak, cache.local.stats.bytes)
        assert peak <= budget and cache.local.stats.evictions > 0
        keys = [k for k in list(kv.keys()) if ":kv:" in k]
        assert len(keys) == 240 // C
        assert all(0 < (kv.ttl(k) or 0) <= 30 for k in keys)
        clock[0] += 31
        assert [k for k in list(kv.keys()) if ":kv:" in k] == []


async def test_switched_off_it_neither_looks_up_nor_keeps() -> None:
    kv = MemoryKV()
    prompt = _prompt(70)
    async with PrefixCache(kv, key_prefix="t", capacity_bytes=10**7, ttl_s=60) as cache:
        await _fill(cache, prompt)
        cache.enabled = False
        assert (await cache.lookup("m", 1, T, prompt)).chunks == []
        key = chunk_keys("m", 1, C, _prompt(16, seed=3), 1)[0]
        runs = 0

        async def run() -> Any:
            nonlocal runs
            runs += 1
            return _kv(_prompt(C)).span(0, C)

        await cache.compute(key, run)
        await cache.compute(key, run)
        await cache.flush()
        assert runs == 2 and cache.cached(key) is None and cache.stats.writes == 4
