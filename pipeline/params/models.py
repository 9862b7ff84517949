"""Numpy model architectures, described by a JSON-able ``arch`` dict stored in the manifest.

``arch["kind"]`` picks a builder from the registry of kinds: the built-ins (``mlp``,
``linear_heads``, ``embedding``) and the dense :class:`ModelPlugin` classes registered at the
process edge (:mod:`pipeline.params.plugins`). An arch only ever selects a registered kind;
nothing here imports a module an arch names.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Literal, Protocol

import numpy as np
import numpy.typing as npt

from pipeline.errors import ConfigError, RequestError

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


class ModelPlugin(Protocol):
    """A dense model from outside kvpipe: what a plugin class provides (docs/plugins.md)."""

    #: The ``"kind"`` of the arch dicts this class builds; never a built-in kind.
    kind: ClassVar[str]
    #: Columns of an input row and of an output row, known once the arch is read.
    input_dim: int
    output_dim: int

    def __init__(self, arch: Mapping[str, Any]) -> None: ...

    def tensor_specs(self) -> Mapping[str, TensorSpec | tuple[int, ...]]: ...

    def forward(self, params: Params, x: Array) -> npt.ArrayLike: ...


#: How a plugin names its kind and its tensors: they are stored in manifests and Redis keys.
_PLUGIN_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}", re.ASCII)
#: Longest error text a plugin's own message contributes.
_SHOWN_CHARS = 300


def one_line(text: object) -> str:
    """``text`` on one line, cut to a readable length."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= _SHOWN_CHARS else flat[:_SHOWN_CHARS] + "..."


def _positive_int(value: object) -> int | None:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value) > 0:
        return int(value)
    return None


def _spec_of(kind: str, name: object, spec: object) -> TensorSpec:
    """A plugin's tensor spec checked: a valid tensor name, positive dims, a numeric dtype."""
    if not isinstance(name, str) or not _PLUGIN_NAME.fullmatch(name):
        raise ConfigError(
            f"model plugin {kind!r}: tensor name {name!r} must be 1-64 letters, digits, '_', "
            "'.' or '-', starting with a letter"
        )
    if isinstance(spec, tuple):
        spec = TensorSpec(spec)
    if not isinstance(spec, TensorSpec):
        raise ConfigError(
            f"model plugin {kind!r}: tensor {name!r} has spec {spec!r}; "
            "use TensorSpec(shape, dtype) or a shape tuple"
        )
    dims = [_positive_int(d) for d in spec.shape]
    if not dims or None in dims:
        raise ConfigError(
            f"model plugin {kind!r}: tensor {name!r} has shape {spec.shape!r}; "
            "use a tuple of positive ints"
        )
    try:
        dtype = np.dtype(spec.dtype)
    except TypeError:
        dtype = np.dtype(object)
    if dtype.kind not in "fiu" or dtype.itemsize > 8:
        raise ConfigError(
            f"model plugin {kind!r}: tensor {name!r} has dtype {spec.dtype!r}; "
            "use a float or integer dtype such as float32"
        )
    return TensorSpec(tuple(d for d in dims if d is not None), dtype.name)


class PluginModel:
    """A :class:`ModelPlugin` instance seen as a :class:`DenseModel`: checked once, then run.

    The plugin's answers are checked where kvpipe relies on them: positive widths, valid
    tensor specs, and outputs of shape (rows, ``output_dim``) cast to float32.
    """

    kind: Final = "dense"

    def __init__(self, plugin_class: type[ModelPlugin], arch: Mapping[str, Any]) -> None:
        name = plugin_class.kind
        try:
            plugin = plugin_class(arch)
            specs = dict(plugin.tensor_specs())
        except ConfigError as exc:
            raise ConfigError(one_line(exc)) from None
        except (KeyError, TypeError, ValueError):
            raise
        except Exception as exc:
            raise ConfigError(
                f"model plugin {name!r} cannot build {dict(arch)!r}: "
                f"{type(exc).__name__}: {one_line(exc)}"
            ) from None
        dims = getattr(plugin, "input_dim", None), getattr(plugin, "output_dim", None)
        input_dim, output_dim = _positive_int(dims[0]), _positive_int(dims[1])
        if input_dim is None or output_dim is None:
            raise ConfigError(
                f"model plugin {name!r}: input_dim and output_dim must be positive ints, "
                f"got {dims[0]!r} and {dims[1]!r}"
            )
        if not specs:
            raise ConfigError(f"model plugin {name!r}: tensor_specs() names no tensors")
        self.plugin = plugin
        self._specs = {t: _spec_of(name, t, spec) for t, spec in specs.items()}
        self.tables: dict[str, tuple[int, int]] = {}
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.arch: dict[str, Any] = {**arch, "kind": name}

    def tensor_specs(self) -> dict[str, TensorSpec]:
        return dict(self._specs)

    def init(self, seed: int) -> dict[str, Array]:
        """The plugin's own ``init(seed)`` if it has one, else seeded small normal weights."""
        own = getattr(self.plugin, "init", None)
        if callable(own):
            return {t: np.asarray(a) for t, a in dict(own(seed)).items()}
        rng = np.random.default_rng(seed)
        return {
            t: (rng.standard_normal(s.shape) * 0.1).astype(s.dtype) for t, s in self._specs.items()
        }

    @property
    def input_names(self) -> tuple[str, ...]:
        """The names of the plugin's inputs when it takes named inputs, else ()."""
        return tuple(getattr(self.plugin, "input_names", ()))

    @property
    def packed_dtype(self) -> np.dtype[Any]:
        """The dtype of the input rows ``forward`` takes (float32 unless the plugin says)."""
        return np.dtype(getattr(self.plugin, "packed_dtype", np.float32))

    def pack_inputs(self, named: Mapping[str, npt.NDArray[Any]]) -> npt.NDArray[Any]:
        """Named inputs as the rows ``forward`` takes (the plugin's ``pack_inputs``), or a
        RequestError when the plugin takes one unnamed input."""
        pack = getattr(self.plugin, "pack_inputs", None)
        if pack is None:
            raise RequestError(
                'this model takes one unnamed input: send "inputs" as a list of rows',
                code="bad_request",
            )
        return np.asarray(pack(named))

    def named_outputs(self, y: Array) -> dict[str, npt.NDArray[Any]] | None:
        """``y`` split into the plugin's named outputs (its ``named_outputs``), or None."""
        split = getattr(self.plugin, "named_outputs", None)
        return None if split is None else dict(split(y))

    def forward(self, params: Params, x: Array) -> Array:
        y = np.asarray(self.plugin.forward(params, x))
        if y.shape != (x.shape[0], self.output_dim) or y.dtype.kind not in "fiu":
            raise ValueError(
                f"model plugin {self.arch['kind']!r} returned {y.dtype} outputs of shape "
                f"{y.shape} for {x.shape[0]} rows; expected ({x.shape[0]}, {self.output_dim})"
            )
        return y.astype(np.float32, copy=False)


@dataclass(frozen=True)
class _Kind:
    """A registered architecture kind: how to build it and where it came from."""

    build: Callable[[Mapping[str, Any]], Model]
    source: str
    plugin: type[Any] | None = None


#: Every architecture kind this process can build, by the name in ``arch["kind"]``.
_KINDS: dict[str, _Kind] = {}
BUILTIN_KINDS: Final = ("mlp", "linear_heads", "embedding")


def _register(kind: str, entry: _Kind) -> None:
    """Add ``kind``; the same plugin class again is a no-op, any other clash a ConfigError."""
    known = _KINDS.get(kind)
    if known is not None:
        if entry.plugin is not None and known.plugin is entry.plugin:
            return
        if kind in BUILTIN_KINDS:
            raise ConfigError(
                f"{entry.source} names kind {kind!r}, which is built in; give it another kind"
            )
        raise ConfigError(
            f"model kind {kind!r} is registered twice, by {known.source} and by {entry.source}; "
            "remove one or rename its kind"
        )
    _KINDS[kind] = entry


def register_model(plugin_class: object, *, source: str | None = None) -> str:
    """Register a :class:`ModelPlugin` class under its ``kind``; returns the kind.

    ``source`` says where it came from in errors (default: its module and class name).
    ConfigError, in one line, when it breaks the protocol or its kind is taken.
    """
    if not isinstance(plugin_class, type):
        shown = source or repr(plugin_class)
        raise ConfigError(f"model plugin {shown} is a {type(plugin_class).__name__}, not a class")
    where = f"model plugin {plugin_class.__module__}.{plugin_class.__qualname__}"
    where = f"{where} ({source})" if source else where
    kind = getattr(plugin_class, "kind", None)
    if not isinstance(kind, str) or not _PLUGIN_NAME.fullmatch(kind):
        raise ConfigError(
            f'{where} has kind {kind!r}; set a class attribute kind = "name" (1-64 letters, '
            "digits, '_', '.' or '-', starting with a letter)"
        )
    for method in ("tensor_specs", "forward"):
        if not callable(getattr(plugin_class, method, None)):
            raise ConfigError(f"{where} has no {method}() method")
    cls: type[ModelPlugin] = plugin_class

    def build(arch: Mapping[str, Any]) -> Model:
        return PluginModel(cls, arch)

    _register(kind, _Kind(build, where, plugin_class))
    return kind


def model_kinds() -> dict[str, str]:
    """Every kind this process can build, with where it came from."""
    return {kind: entry.source for kind, entry in _KINDS.items()}


def _mlp(arch: Mapping[str, Any]) -> Model:
    return MLP(
        list(arch["layers"]),
        activation=str(arch.get("activation", "relu")),
        softmax=bool(arch.get("softmax", False)),
    )


def _embedding(arch: Mapping[str, Any]) -> Model:
    return EmbeddingScorer(users=int(arch["users"]), items=int(arch["items"]), dim=int(arch["dim"]))


def _linear_heads(arch: Mapping[str, Any]) -> Model:
    return LinearHeads(
        dim_in=int(arch["dim_in"]), dim_out=int(arch["dim_out"]), heads=int(arch.get("heads", 2))
    )


for _name, _build in zip(BUILTIN_KINDS, (_mlp, _linear_heads, _embedding), strict=True):
    _register(_name, _Kind(_build, "kvpipe (built in)"))


PRESETS: dict[str, dict[str, Any]] = {
    "article": {"kind": "linear_heads", "dim_in": 1000, "dim_out": 1000, "heads": 2},
    "mlp": {"kind": "mlp", "layers": [32, 64, 8], "activation": "relu", "softmax": False},
    "embedding": {"kind": "embedding", "users": 10_000, "items": 100_000, "dim": 16},
    # decoder-only transformers (pipeline/params/transformer.py registers the kind)
    "gen-tiny": {
        "kind": "transformer",
        "d_model": 32,
        "n_layers": 2,
        "n_heads": 4,
        "n_ctx": 512,
        "kv_chunk": 16,
    },
    "gen-small": {
        "kind": "transformer",
        "d_model": 512,
        "n_layers": 8,
        "n_heads": 8,
        "n_ctx": 4096,
        "kv_chunk": 128,
    },
}


def build_model(arch: Mapping[str, Any]) -> Model:
    """The model an ``arch`` dict describes; ConfigError when it describes none."""
    if not isinstance(arch, Mapping):
        raise ConfigError(f"an architecture is a JSON object with a kind, got {arch!r}")
    kind = arch.get("kind")
    entry = _KINDS.get(kind) if isinstance(kind, str) else None
    if entry is None:
        raise ConfigError(
            f"unknown architecture kind {one_line(repr(kind))}; known: {', '.join(_KINDS)} "
            "(a plugin kind must be installed as a kvpipe.models entry point or named in "
            "KVPIPE_MODEL_PLUGINS in every process that builds it)"
        )
    try:
        return entry.build(arch)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(
            f"architecture {one_line(repr(dict(arch)))} is incomplete: {one_line(exc)}"
        ) from None


def preset(name: str) -> Model:
    """A named architecture: ``article`` (2 heads of 1000x1000), ``mlp`` (32-64-8) or
    ``embedding`` (10k users x 100k items, dim 16)."""
    try:
        return build_model(PRESETS[name])
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; use one of {sorted(PRESETS)}") from None
