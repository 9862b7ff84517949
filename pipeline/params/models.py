"""Numpy model architectures, described by a JSON-able ``arch`` dict stored in the manifest."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol

import numpy as np
import numpy.typing as npt

from pipeline.errors import ConfigError

Array = npt.NDArray[np.float32]
Params = Mapping[str, npt.NDArray[Any]]

ACTIVATIONS = ("relu", "tanh", "sigmoid", "identity")


@dataclass(frozen=True)
class TensorSpec:
    """The shape and dtype a named parameter tensor must have."""

    shape: tuple[int, ...]
    dtype: str = "float32"

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


class _Architecture(Protocol):
    """What every model kind has: parameters come in, outputs go out, no state kept."""

    arch: dict[str, Any]
    tables: dict[str, tuple[int, int]]
    input_dim: int
    output_dim: int

    def tensor_specs(self) -> dict[str, TensorSpec]: ...

    def init(self, seed: int) -> dict[str, Array]: ...

    def forward(self, params: Params, x: Array) -> Array: ...


class DenseModel(_Architecture, Protocol):
    """A model whose every parameter is a versioned tensor; float32 rows in, rows out."""

    @property
    def kind(self) -> Literal["dense"]: ...


class EmbeddingModel(_Architecture, Protocol):
    """A model that scores integer ids: besides its tensors, tables of rows read a few at a time.

    ``tables`` maps a table name to its (rows, row width); ``forward`` gets the rows of the
    batch as ``params[table]``.
    """

    @property
    def kind(self) -> Literal["embedding"]: ...

    def init_tables(self, seed: int) -> dict[str, Array]: ...

    def check_ids(self, ids: npt.NDArray[Any]) -> str | None: ...


#: A stateless architecture; ``model.kind == "embedding"`` narrows it to an EmbeddingModel.
Model = DenseModel | EmbeddingModel


def _activate(name: str, x: Array) -> Array:
    if name == "relu":
        return np.maximum(x, 0, out=x)
    if name == "tanh":
        return np.tanh(x, out=x)
    if name == "sigmoid":
        np.negative(x, out=x)
        np.exp(x, out=x)
        x += 1
        return np.reciprocal(x, out=x)
    return x


def _softmax(x: Array) -> Array:
    x = x - x.max(axis=-1, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(axis=-1, keepdims=True)
    return x


def _glorot(rng: np.random.Generator, fan_in: int, fan_out: int) -> Array:
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=(fan_in, fan_out)).astype(np.float32)


class MLP:
    """Dense layers ``x @ W_i + b_i`` with an activation between them, optional softmax head.

    Tensors are named ``w0, b0, w1, b1, ...``; ``W_i`` has shape (in, out).
    """

    kind: Final = "dense"

    def __init__(
        self, layers: list[int], *, activation: str = "relu", softmax: bool = False
    ) -> None:
        if len(layers) < 2 or any(int(n) <= 0 for n in layers):
            raise ConfigError(f"an MLP needs at least two positive layer sizes, got {layers}")
        if activation not in ACTIVATIONS:
            raise ConfigError(f"unknown activation {activation!r}; use one of {ACTIVATIONS}")
        self.layers = [int(n) for n in layers]
        self.activation = activation
        self.softmax = softmax
        self.tables: dict[str, tuple[int, int]] = {}
        self.input_dim = self.layers[0]
        self.output_dim = self.layers[-1]
        self.arch: dict[str, Any] = {
            "kind": "mlp",
            "layers": self.layers,
            "activation": activation,
            "softmax": softmax,
        }

    def tensor_specs(self) -> dict[str, TensorSpec]:
        specs: dict[str, TensorSpec] = {}
        for i, (n_in, n_out) in enumerate(zip(self.layers, self.layers[1:], strict=False)):
            specs[f"w{i}"] = TensorSpec((n_in, n_out))
            specs[f"b{i}"] = TensorSpec((n_out,))
        return specs

    def init(self, seed: int) -> dict[str, Array]:
        rng = np.random.default_rng(seed)
        params: dict[str, Array] = {}
        for i, (n_in, n_out) in enumerate(zip(self.layers, self.layers[1:], strict=False)):
            params[f"w{i}"] = _glorot(rng, n_in, n_out)
            params[f"b{i}"] = (rng.standard_normal(n_out) * 0.1).astype(np.float32)
        return params

    def forward(self, params: Params, x: Array) -> Array:
        h = x
        last = len(self.layers) - 2
        for i in range(last + 1):
            h = h @ params[f"w{i}"]
            h += params[f"b{i}"]
            if i < last:
                h = _activate(self.activation, h)
        return _softmax(h) if self.softmax else h


class LinearHeads:
    """Several linear heads on one input, outputs side by side: the article's example.

    Tensors ``weight1, bias1, weight2, bias2, ...``; output is ``[x@W1+b1, x@W2+b2, ...]``
    concatenated on the last axis.
    """

    kind: Final = "dense"

    def __init__(self, *, dim_in: int, dim_out: int, heads: int = 2) -> None:
        if min(dim_in, dim_out, heads) <= 0:
            raise ConfigError("linear heads need positive dim_in, dim_out and heads")
        self.dim_in = int(dim_in)
        self.dim_out = int(dim_out)
        self.heads = int(heads)
        self.tables: dict[str, tuple[int, int]] = {}
        self.input_dim = self.dim_in
        self.output_dim = self.dim_out * self.heads
        self.arch: dict[str, Any] = {
            "kind": "linear_heads",
            "dim_in": self.dim_in,
            "dim_out": self.dim_out,
            "heads": self.heads,
        }

    def tensor_specs(self) -> dict[str, TensorSpec]:
        specs: dict[str, TensorSpec] = {}
        for h in range(1, self.heads + 1):
            specs[f"weight{h}"] = TensorSpec((self.dim_in, self.dim_out))
            specs[f"bias{h}"] = TensorSpec((self.dim_out,))
        return specs

    def init(self, seed: int) -> dict[str, Array]:
        rng = np.random.default_rng(seed)
        params: dict[str, Array] = {}
        for h in range(1, self.heads + 1):
            params[f"weight{h}"] = _glorot(rng, self.dim_in, self.dim_out)
            params[f"bias{h}"] = (rng.standard_normal(self.dim_out) * 0.1).astype(np.float32)
        return params

    def forward(self, params: Params, x: Array) -> Array:
        out = np.empty((x.shape[0], self.output_dim), dtype=np.float32)
        for h in range(self.heads):
            cols = out[:, h * self.dim_out : (h + 1) * self.dim_out]
            np.matmul(x, params[f"weight{h + 1}"], out=cols)
            cols += params[f"bias{h + 1}"]
        return out


class EmbeddingScorer:
    """Scores (user, item) id pairs: ``sigmoid(u . v + b_u + b_v + bias)``.

    The user and item tables live in Redis row by row, each row ``dim`` floats then its bias
    (``dim + 1`` float32); only the global ``bias`` is a versioned tensor. Inputs are integer
    rows ``[user_id, item_id]``; the output is one probability per row.
    """

    kind: Final = "embedding"

    def __init__(self, *, users: int, items: int, dim: int) -> None:
        if min(users, items, dim) <= 0:
            raise ConfigError("an embedding scorer needs positive users, items and dim")
        self.users, self.items, self.dim = int(users), int(items), int(dim)
        self.tables: dict[str, tuple[int, int]] = {
            "user": (self.users, self.dim + 1),
            "item": (self.items, self.dim + 1),
        }
        self.input_dim = 2
        self.output_dim = 1
        self.arch: dict[str, Any] = {
            "kind": "embedding",
            "users": self.users,
            "items": self.items,
            "dim": self.dim,
        }

    def tensor_specs(self) -> dict[str, TensorSpec]:
        return {"bias": TensorSpec((1,))}

    def init(self, seed: int) -> dict[str, Array]:
        return {"bias": np.zeros(1, dtype=np.float32)}

    def init_tables(self, seed: int) -> dict[str, Array]:
        """Seeded random tables: small vectors, zero biases."""
        rng = np.random.default_rng(seed)
        out: dict[str, Array] = {}
        for name, (rows, width) in self.tables.items():
            table = (rng.standard_normal((rows, width)) * 0.1).astype(np.float32)
            table[:, -1] = 0.0
            out[name] = table
        return out

    def check_ids(self, ids: npt.NDArray[Any]) -> str | None:
        """Why ``ids`` cannot be scored (wrong width, out of range), or None when they can."""
        if ids.ndim != 2 or ids.shape[1] != 2:
            return f"ids must be rows of [user_id, item_id], got shape {ids.shape}"
        if ids.size and (
            ids.min() < 0 or ids[:, 0].max() >= self.users or ids[:, 1].max() >= self.items
        ):
            return f"ids out of range: users 0..{self.users - 1}, items 0..{self.items - 1}"
        return None

    def forward(self, params: Params, x: npt.NDArray[Any]) -> Array:
        u, v = params["user"], params["item"]
        d = self.dim
        logits = np.einsum("ij,ij->i", u[:, :d], v[:, :d]) + u[:, d] + v[:, d] + params["bias"][0]
        scores: Array = (1.0 / (1.0 + np.exp(-np.clip(logits, -60, 60)))).astype(np.float32)
        return scores.reshape(-1, 1)


PRESETS: dict[str, dict[str, Any]] = {
    "article": {"kind": "linear_heads", "dim_in": 1000, "dim_out": 1000, "heads": 2},
    "mlp": {"kind": "mlp", "layers": [32, 64, 8], "activation": "relu", "softmax": False},
    "embedding": {"kind": "embedding", "users": 10_000, "items": 100_000, "dim": 16},
}


def build_model(arch: Mapping[str, Any]) -> Model:
    """The model an ``arch`` dict describes; ConfigError when it describes none."""
    kind = arch.get("kind")
    try:
        if kind == "mlp":
            return MLP(
                list(arch["layers"]),
                activation=str(arch.get("activation", "relu")),
                softmax=bool(arch.get("softmax", False)),
            )
        if kind == "embedding":
            return EmbeddingScorer(
                users=int(arch["users"]), items=int(arch["items"]), dim=int(arch["dim"])
            )
        if kind == "linear_heads":
            return LinearHeads(
                dim_in=int(arch["dim_in"]),
                dim_out=int(arch["dim_out"]),
                heads=int(arch.get("heads", 2)),
            )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"architecture {dict(arch)!r} is incomplete: {exc}") from None
    raise ConfigError(f"unknown architecture kind {kind!r}; known: mlp, linear_heads, embedding")


def preset(name: str) -> Model:
    """A named architecture: ``article`` (2 heads of 1000x1000), ``mlp`` (32-64-8) or
    ``embedding`` (10k users x 100k items, dim 16)."""
    try:
        return build_model(PRESETS[name])
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; use one of {sorted(PRESETS)}") from None
