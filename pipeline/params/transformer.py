"""A decoder-only transformer in numpy: byte-level tokens, pre-norm blocks, causal attention.

Tokens are the 256 byte values plus two specials (``BOS``, ``EOS``), so no tokenizer is ever
downloaded. Positions are learned (``wpe``); the output head is tied to the token embedding.
Attention keys and values are kept per sequence in a :class:`KVState` of shape
``(layers, 2, heads, tokens, head_dim)`` (float32): :meth:`Transformer.prefill` extends one
sequence by any number of tokens after an optional past, :meth:`Transformer.decode` advances
many sequences by one token each in one numpy step (projections and MLP batched, attention per
sequence over its own past).

The kind registers itself as ``transformer`` (a dense model to the rest of kvpipe: a row of
one token id in, that token's next-token logits out), so ``kvpipe publish --preset gen-tiny``
and the registry handle it like any dense model; generation goes through
:mod:`pipeline.serving.generation`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Final

import numpy as np
import numpy.typing as npt

from pipeline.errors import ConfigError, RequestError
from pipeline.params.models import PRESETS, Params, TensorSpec, register_model

Array = npt.NDArray[np.float32]

#: Byte tokens 0..255, then the specials.
BOS: Final = 256
EOS: Final = 257
VOCAB: Final = 258
#: The largest context a transformer arch may declare (bounds wpe and every request).
MAX_CONTEXT: Final = 16_384

#: Named sizes (arch dicts in :data:`pipeline.params.models.PRESETS`): ``gen-tiny`` for tests,
#: ``gen-small`` where a long prefill costs clearly more than fetching its keys/values (README,
#: "Generation": the arithmetic and the measured figures).
GEN_PRESETS: Final = {k: v for k, v in PRESETS.items() if v["kind"] == "transformer"}


class KVState:
    """The attention keys and values of one sequence, grown in place (amortised doubling)."""

    __slots__ = ("_buf", "length")

    def __init__(self, layers: int, heads: int, head_dim: int, capacity: int = 64) -> None:
        self._buf: Array = np.empty((layers, 2, heads, max(capacity, 1), head_dim), np.float32)
        self.length = 0

    @classmethod
    def of(cls, arrays: Sequence[Array], layers: int, heads: int, head_dim: int) -> KVState:
        """A state holding ``arrays`` (each ``(layers, 2, heads, n, head_dim)``) in order."""
        total = sum(a.shape[3] for a in arrays)
        state = cls(layers, heads, head_dim, capacity=total + 64)
        for a in arrays:
            state.append(a)
        return state

    @property
    def kv(self) -> Array:
        """A view of the filled part: ``(layers, 2, heads, length, head_dim)``."""
        return self._buf[:, :, :, : self.length]

    def span(self, start: int, stop: int) -> Array:
        """A copy of the keys/values of tokens ``start:stop`` (a chunk to cache)."""
        return np.ascontiguousarray(self._buf[:, :, :, start:stop])

    def reserve(self, extra: int) -> None:
        need = self.length + extra
        if need > self._buf.shape[3]:
            cap = max(need, 2 * self._buf.shape[3])
            grown = np.empty((*self._buf.shape[:3], cap, self._buf.shape[4]), np.float32)
            grown[:, :, :, : self.length] = self._buf[:, :, :, : self.length]
            self._buf = grown

    def append(self, kv: Array) -> None:
        n = kv.shape[3]
        self.reserve(n)
        self._buf[:, :, :, self.length : self.length + n] = kv
        self.length += n

    def write(self, layer: int, k: Array, v: Array) -> None:
        """Write one layer's new keys/values ``(heads, n, head_dim)`` after ``length``
        (``length`` moves only in :meth:`advance`, once every layer is written)."""
        n = k.shape[1]
        self._buf[layer, 0, :, self.length : self.length + n] = k
        self._buf[layer, 1, :, self.length : self.length + n] = v

    def upto(self, layer: int, stop: int) -> tuple[Array, Array]:
        return self._buf[layer, 0, :, :stop], self._buf[layer, 1, :, :stop]

    def advance(self, n: int) -> None:
        self.length += n

    @property
    def nbytes(self) -> int:
        return int(self._buf[:, :, :, : self.length].nbytes)


def _positive(arch: Mapping[str, Any], name: str, default: int | None = None) -> int:
    raw = arch.get(name, default)
    if isinstance(raw, bool) or not isinstance(raw, int) or raw <= 0:
        raise ConfigError(f"transformer arch: {name} must be a positive integer, got {raw!r}")
    return raw


def _layer_norm(x: Array, g: Array, b: Array) -> Array:
    mu = x.mean(axis=-1, keepdims=True)
    xc = x - mu
    var = (xc * xc).mean(axis=-1, keepdims=True)
    out: Array = xc / np.sqrt(var + 1e-5) * g + b
    return out


def _gelu(x: Array) -> Array:
    inner = np.float32(0.7978845608) * (x + np.float32(0.044715) * x * x * x)
    out = np.float32(0.5) * x * (np.float32(1.0) + np.tanh(inner))
    return out.astype(np.float32, copy=False)


def _softmax_rows(x: Array) -> Array:
    x = x - x.max(axis=-1, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(axis=-1, keepdims=True)
    return x


class Transformer:
    """A GPT-style decoder; ``arch``: ``d_model``, ``n_layers``, ``n_heads``, ``n_ctx``,
    ``kv_chunk`` (tokens per cached prefix chunk: part of the version, so every worker cuts
    prompts alike) and optionally ``d_ff`` (default ``4 * d_model``)."""

    kind: ClassVar[str] = "transformer"

    def __init__(self, arch: Mapping[str, Any]) -> None:
        self.d_model = _positive(arch, "d_model")
        self.n_layers = _positive(arch, "n_layers")
        self.n_heads = _positive(arch, "n_heads")
        self.n_ctx = _positive(arch, "n_ctx")
        self.kv_chunk = _positive(arch, "kv_chunk", 64)
        self.d_ff = _positive(arch, "d_ff", 4 * self.d_model)
        if self.d_model % self.n_heads:
            raise ConfigError("transformer arch: d_model must be a multiple of n_heads")
        if self.n_ctx > MAX_CONTEXT:
            raise ConfigError(f"transformer arch: n_ctx is at most {MAX_CONTEXT}")
        if self.kv_chunk > self.n_ctx:
            raise ConfigError("transformer arch: kv_chunk must not exceed n_ctx")
        self.head_dim = self.d_model // self.n_heads
        self.vocab = VOCAB
        self.input_dim = 1
        self.output_dim = VOCAB
        self.arch: dict[str, Any] = {
            "kind": self.kind,
            "d_model": self.d_model,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_ctx": self.n_ctx,
            "kv_chunk": self.kv_chunk,
            "d_ff": self.d_ff,
        }

    # -- sizes ------------------------------------------------------------------------------

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of keys and values one token adds (all layers, float32)."""
        return self.n_layers * 2 * self.d_model * 4

    @property
    def flops_per_token(self) -> int:
        """Multiply-adds x 2 of one token's projections and MLP (attention not counted)."""
        d, f = self.d_model, self.d_ff
        return 2 * self.n_layers * (4 * d * d + 2 * d * f) + 2 * d * self.vocab

    def new_state(self, capacity: int = 64) -> KVState:
        return KVState(self.n_layers, self.n_heads, self.head_dim, capacity)

    def state_of(self, chunks: Sequence[Array]) -> KVState:
        return KVState.of(chunks, self.n_layers, self.n_heads, self.head_dim)

    # -- parameters -------------------------------------------------------------------------

    def tensor_specs(self) -> dict[str, TensorSpec]:
        d, f = self.d_model, self.d_ff
        specs = {"wte": TensorSpec((VOCAB, d)), "wpe": TensorSpec((self.n_ctx, d))}
        for i in range(self.n_layers):
            specs.update({
                f"h{i}.ln1_g": TensorSpec((d,)),
                f"h{i}.ln1_b": TensorSpec((d,)),
                f"h{i}.wqkv": TensorSpec((d, 3 * d)),
                f"h{i}.bqkv": TensorSpec((3 * d,)),
                f"h{i}.wo": TensorSpec((d, d)),
                f"h{i}.bo": TensorSpec((d,)),
                f"h{i}.ln2_g": TensorSpec((d,)),
                f"h{i}.ln2_b": TensorSpec((d,)),
                f"h{i}.w1": TensorSpec((d, f)),
                f"h{i}.b1": TensorSpec((f,)),
                f"h{i}.w2": TensorSpec((f, d)),
                f"h{i}.b2": TensorSpec((d,)),
            })  # fmt: skip
        specs["lnf_g"] = TensorSpec((d,))
        specs["lnf_b"] = TensorSpec((d,))
        return specs

    def init(self, seed: int) -> dict[str, Array]:
        """Seeded random weights, scaled so an untrained model still says varied things
        (matrices ``1.7 / sqrt(fan_in)``, embeddings 0.5): greedy text that is not one repeated
        byte makes the equality tests of cached and fresh generation mean something."""
        rng = np.random.default_rng(seed)
        out: dict[str, Array] = {}
        for name, spec in self.tensor_specs().items():
            short = name.rsplit(".", 1)[-1]
            if short.endswith("_g"):
                arr = np.ones(spec.shape, np.float32)
            elif short.startswith("b") or short.endswith("_b"):
                arr = np.zeros(spec.shape, np.float32)
            else:
                std = 0.5 if short in ("wte", "wpe") else 1.7 / np.sqrt(spec.shape[0])
                arr = (rng.standard_normal(spec.shape) * std).astype(np.float32)
            out[name] = arr
        return out

    # -- compute ----------------------------------------------------------------------------

    def forward(self, params: Params, x: Array) -> Array:
        """Dense use: each row one token id, answered with its next-token logits alone."""
        raw = np.asarray(x).reshape(-1)
        if raw.size and (raw.min() < 0 or raw.max() >= VOCAB or not np.all(raw == np.rint(raw))):
            raise RequestError(f"token ids must be whole numbers in 0..{VOCAB - 1}", code="bad_ids")
        ids = raw.astype(np.int64)
        rows = [self.prefill(params, [int(t)], self.new_state(1)) for t in ids]
        return np.stack(rows) if rows else np.empty((0, VOCAB), np.float32)

    def prefill(self, params: Params, tokens: Sequence[int], state: KVState) -> Array:
        """Run ``tokens`` after the ``state.length`` tokens already in ``state`` (extended in
        place); returns the logits after the last of them ``(vocab,)``."""
        n = len(tokens)
        if n == 0:
            raise ValueError("prefill needs at least one token")
        start = state.length
        if start + n > self.n_ctx:
            raise ValueError(f"{start + n} tokens exceed the context of {self.n_ctx}")
        ids = np.asarray(tokens, dtype=np.int64)
        h: Array = params["wte"][ids] + params["wpe"][start : start + n]
        state.reserve(n)
        hd, nh = self.head_dim, self.n_heads
        scale = np.float32(1.0 / np.sqrt(hd))
        # causal mask of the new tokens over past + new: new token j sees 0..start+j
        mask = np.triu(np.full((n, start + n), -np.inf, np.float32), k=start + 1)
        for i in range(self.n_layers):
            p = f"h{i}."
            a = _layer_norm(h, params[p + "ln1_g"], params[p + "ln1_b"])
            qkv = a @ params[p + "wqkv"] + params[p + "bqkv"]
            q, k, v = (qkv[:, j * self.d_model : (j + 1) * self.d_model] for j in range(3))
            q = q.reshape(n, nh, hd).transpose(1, 0, 2)
            state.write(
                i, k.reshape(n, nh, hd).transpose(1, 0, 2), v.reshape(n, nh, hd).transpose(1, 0, 2)
            )
            keys, values = state.upto(i, start + n)
            att = (q @ keys.transpose(0, 2, 1)) * scale + mask
            ctx = _softmax_rows(att) @ values
            h = (
                h
                + ctx.transpose(1, 0, 2).reshape(n, self.d_model) @ params[p + "wo"]
                + params[p + "bo"]
            )
            m = _layer_norm(h, params[p + "ln2_g"], params[p + "ln2_b"])
            h = (
                h
                + _gelu(m @ params[p + "w1"] + params[p + "b1"]) @ params[p + "w2"]
                + params[p + "b2"]
            )
        state.advance(n)
        last = _layer_norm(h[-1:], params["lnf_g"], params["lnf_b"])
        logits: Array = (last @ params["wte"].T)[0]
        return logits

    def decode(self, params: Params, tokens: Sequence[int], states: Sequence[KVState]) -> Array:
        """Advance every sequence by its one token in one step; logits ``(batch, vocab)``.

        Projections and MLP run as one matrix product over the batch; attention runs per
        sequence over its own past (lengths differ)."""
        b = len(tokens)
        if b != len(states) or b == 0:
            raise ValueError("decode needs one token per state, at least one")
        pos = np.asarray([s.length for s in states], dtype=np.int64)
        if int(pos.max()) >= self.n_ctx:
            raise ValueError(f"a sequence is at the context limit of {self.n_ctx}")
        for s in states:
            s.reserve(1)
        ids = np.asarray(tokens, dtype=np.int64)
        h: Array = params["wte"][ids] + params["wpe"][pos]
        hd, nh, d = self.head_dim, self.n_heads, self.d_model
        scale = np.float32(1.0 / np.sqrt(hd))
        for i in range(self.n_layers):
            p = f"h{i}."
            a = _layer_norm(h, params[p + "ln1_g"], params[p + "ln1_b"])
            qkv = a @ params[p + "wqkv"] + params[p + "bqkv"]
            ctx = np.empty((b, d), np.float32)
            for j, s in enumerate(states):
                q = qkv[j, :d].reshape(nh, 1, hd)
                s.write(i, qkv[j, d : 2 * d].reshape(nh, 1, hd), qkv[j, 2 * d :].reshape(nh, 1, hd))
                keys, values = s.upto(i, s.length + 1)
                att = _softmax_rows((q @ keys.transpose(0, 2, 1)) * scale)
                ctx[j] = (att @ values).reshape(d)
            h = h + ctx @ params[p + "wo"] + params[p + "bo"]
            m = _layer_norm(h, params[p + "ln2_g"], params[p + "ln2_b"])
            h = (
                h
                + _gelu(m @ params[p + "w1"] + params[p + "b1"]) @ params[p + "w2"]
                + params[p + "b2"]
            )
        for s in states:
            s.advance(1)
        out: Array = _layer_norm(h, params["lnf_g"], params["lnf_b"]) @ params["wte"].T
        return out


def sample(logits: Array, *, temperature: float, top_k: int, rng: np.random.Generator) -> int:
    """The next token: argmax when ``temperature`` is 0, else a draw from the softmax of the
    ``top_k`` best (0: all) at that temperature with ``rng`` (seeded per request)."""
    if temperature <= 0.0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64)
    with np.errstate(over="ignore"):  # the best is 0: a tiny temperature gives -inf, not NaN
        z = (z - z.max()) / temperature
    if 0 < top_k < z.size:
        cut = np.partition(z, -top_k)[-top_k]
        z = np.where(z >= cut, z, -np.inf)
    p = np.exp(z)
    p /= p.sum()
    return int(rng.choice(z.size, p=p))


def transformer_of(model: object) -> Transformer | None:
    """The transformer behind a registry model (a plugin-wrapped kind), or None."""
    plugin = getattr(model, "plugin", None)
    return plugin if isinstance(plugin, Transformer) else None


register_model(Transformer, source="kvpipe (built in)")
