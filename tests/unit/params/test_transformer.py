"""The numpy transformer: chunked prefill, batched decode and reused keys/values all give the
logits and greedy tokens of one prefill from scratch."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from pipeline.cache.cache import ParamCache
from pipeline.errors import ConfigError, RequestError
from pipeline.io.kv.memory import MemoryKV
from pipeline.params.models import build_model, preset
from pipeline.params.registry import ModelRegistry
from pipeline.params.store import ParamStore
from pipeline.params.transformer import EOS, VOCAB, Transformer, sample, transformer_of

MODEL = preset("gen-tiny")
T = transformer_of(MODEL)
assert T is not None
PARAMS = MODEL.init(0)
PROMPT = list(b"The quick brown fox jumps over the lazy dog, then naps in the sun.")


def greedy(t: Transformer, params: Any, prompt: list[int], n: int, state: Any = None) -> list[int]:
    state = state or t.new_state()
    logits = t.prefill(params, prompt[state.length :], state)
    out: list[int] = []
    for _ in range(n):
        out.append(int(np.argmax(logits)))
        logits = t.decode(params, [out[-1]], [state])[0]
    return out


def test_chunked_prefill_gives_the_logits_and_keys_of_one_prefill() -> None:
    whole, chunked = T.new_state(), T.new_state()
    full = T.prefill(PARAMS, PROMPT, whole)
    for lo in range(0, len(PROMPT), T.kv_chunk):
        last = T.prefill(PARAMS, PROMPT[lo : lo + T.kv_chunk], chunked)
    np.testing.assert_allclose(last, full, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(chunked.kv, whole.kv, rtol=1e-4, atol=1e-5)
    assert whole.length == len(PROMPT) and whole.kv.shape == (2, 2, 4, len(PROMPT), 8)


def test_batched_decode_equals_each_sequence_alone() -> None:
    lengths = [5, 17, 33]
    states = [T.new_state() for _ in lengths]
    for n, s in zip(lengths, states, strict=True):
        T.prefill(PARAMS, PROMPT[:n], s)
    batch = T.decode(PARAMS, [65, 66, 67], states)
    for i, n in enumerate(lengths):
        alone = T.new_state()
        expected = T.prefill(PARAMS, [*PROMPT[:n], 65 + i], alone)
        np.testing.assert_allclose(batch[i], expected, rtol=1e-4, atol=1e-4)
        assert states[i].length == n + 1


def test_generation_from_reused_chunks_equals_generation_from_scratch() -> None:
    scratch = greedy(T, PARAMS, PROMPT, 24)
    assert len(set(scratch)) > 3  # varied text, so equality means something
    donor = T.new_state()
    T.prefill(PARAMS, PROMPT, donor)
    for reused in (1, 2, 3):  # chunk boundaries: 16, 32, 48 tokens reused
        chunks = [donor.span(i * 16, (i + 1) * 16) for i in range(reused)]
        assert greedy(T, PARAMS, PROMPT, 24, T.state_of(chunks)) == scratch


def test_sampling_is_greedy_at_zero_temperature_and_seeded_otherwise() -> None:
    logits = np.linspace(0, 1, VOCAB).astype(np.float32)
    rng = np.random.default_rng(0)
    assert sample(logits, temperature=0.0, top_k=0, rng=rng) == VOCAB - 1
    a = [sample(logits, temperature=1.0, top_k=5, rng=np.random.default_rng(7)) for _ in range(3)]
    b = [sample(logits, temperature=1.0, top_k=5, rng=np.random.default_rng(7)) for _ in range(3)]
    assert a == b and all(x >= VOCAB - 5 for x in a)


def test_arch_is_checked() -> None:
    with pytest.raises(ConfigError, match="multiple of n_heads"):
        build_model({"kind": "transformer", "d_model": 30, "n_layers": 1, "n_heads": 4,
                     "n_ctx": 64})  # fmt: skip
    with pytest.raises(ConfigError, match="positive integer"):
        build_model({"kind": "transformer", "d_model": 32, "n_layers": 0, "n_heads": 4,
                     "n_ctx": 64})  # fmt: skip
    assert EOS == 257 and T.output_dim == VOCAB


def test_sizes_of_the_presets() -> None:
    small = transformer_of(preset("gen-small"))
    assert small is not None
    assert small.kv_bytes_per_token == 8 * 2 * 512 * 4  # 32 KiB a token
    assert small.flops_per_token > 1000 * small.kv_bytes_per_token  # compute >> bytes


async def test_published_like_any_dense_model_and_resolved_by_the_registry() -> None:
    store = ParamStore(MemoryKV(), prefix="t")
    await store.publish("gpt", MODEL.arch, PARAMS)
    registry = ModelRegistry(store, ParamCache(capacity_bytes=10**8, ttl_s=60.0))
    resolved = await registry.resolve("gpt")
    t = transformer_of(resolved.model)
    assert t is not None and t.arch == T.arch
    assert greedy(t, resolved.params, PROMPT, 8) == greedy(T, PARAMS, PROMPT, 8)
    # as a dense model: a row of one token id in, its next-token logits out
    y = resolved.model.forward(resolved.params, np.asarray([[72.0]], np.float32))
    assert y.shape == (1, VOCAB)


@pytest.mark.parametrize("temperature", [5e-324, 1e-300, 1e-9])
def test_a_tiny_temperature_samples_the_best_token_never_nan(temperature: float) -> None:
    logits = np.linspace(-3, 4, VOCAB).astype(np.float32)
    got = sample(logits, temperature=temperature, top_k=0, rng=np.random.default_rng(1))
    assert got == VOCAB - 1


@pytest.mark.parametrize("row", [[300.0], [-1.0], [65.5]])
def test_dense_rows_of_token_ids_out_of_range_are_the_requests_bad_ids(row: list[float]) -> None:
    with pytest.raises(RequestError) as info:
        MODEL.forward(PARAMS, np.array([row], np.float32))
    assert info.value.code == "bad_ids"
