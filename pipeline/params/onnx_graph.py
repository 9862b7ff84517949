"""ONNX graphs as a publish accepts them: the checks a file passes and its split for Redis.

Publishing (:func:`prepare_onnx`, called by :meth:`ParamStore.publish_onnx
<pipeline.params.store.ParamStore.publish_onnx>`) treats the file as untrusted input: size
limits first, then a refusal of anything that would reach outside the graph (external data
or a ``location`` path on any tensor, local functions, operator domains other than ONNX's own,
training info), then ``onnx.checker``. Every numeric initializer of the main graph with more
than :data:`INLINE_MAX_ELEMENTS` elements (the weights) becomes a versioned tensor (its own
key, content-addressed in the cache like every other tensor); what remains is the graph without
its weights, stored as one more key of the version, its sha256 in the arch. Each moved
initializer stays in it as a stub (name, type, dims) marked as external data at
:data:`IN_MEMORY`, a location onnxruntime never opens: the session is given every one of them
from memory. Before a worker builds a session it checks the stored graph again
(:func:`check_stored_graph`); serving is :mod:`pipeline.params.onnx`.

``onnx`` (the optional extra ``kvpipe[onnx]``) is imported only here, and only when a graph is
checked.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from pipeline.errors import ConfigError
from pipeline.params.models import one_line

__all__ = [
    "DEFAULT_DOMAINS",
    "INLINE_MAX_ELEMENTS",
    "INSTALL_HINT",
    "IN_MEMORY",
    "MAX_INPUTS",
    "ONNX_KIND",
    "OnnxLimits",
    "PreparedOnnx",
    "check_stored_graph",
    "import_onnx",
    "prepare_onnx",
    "shown_dims",
]

ONNX_KIND: Final = "onnx"
#: Operator domains a published graph may use: ONNX's own, nothing custom.
DEFAULT_DOMAINS: Final = frozenset({"", "ai.onnx", "ai.onnx.ml"})
#: Initializers of at most this many elements stay inline in the graph: onnxruntime reads
#: small constants (shapes, axes, pads, scales) while it resolves the graph, before the
#: in-memory initializers are in place. Weights are larger and go to Redis.
INLINE_MAX_ELEMENTS: Final = 64
#: The external-data location of the initializer stubs in a stored graph: never a file, every
#: stub is given to onnxruntime from memory.
IN_MEMORY: Final = "kvpipe:redis-tensor"

#: What to install when the ONNX packages are missing.
INSTALL_HINT: Final = "ONNX models need the onnx extra: pip install 'kvpipe[onnx]'"
_MAX_TENSOR_NAME = 64
#: A served graph has at most this many inputs.
MAX_INPUTS: Final = 64


@dataclass(frozen=True)
class OnnxLimits:
    """The largest graph a publish accepts."""

    max_file_bytes: int = 256 * 1024**2
    max_nodes: int = 20_000
    #: Every initializer's declared size added up (the weights going to Redis and the rest).
    max_initializer_bytes: int = 256 * 1024**2
    #: The graph without its weights (Constant nodes and inline initializers included).
    max_graph_bytes: int = 16 * 1024**2


@dataclass(frozen=True)
class PreparedOnnx:
    """What a checked ONNX file becomes: an arch, the tensors for Redis, the weightless graph."""

    arch: dict[str, Any]
    tensors: dict[str, npt.NDArray[Any]]
    graph: bytes


def import_onnx() -> Any:
    """The ``onnx`` package, imported at first use; ConfigError saying what to install."""
    try:
        import onnx
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    return onnx


def _refuse(why: str) -> ConfigError:
    return ConfigError(f"ONNX graph refused: {why}")


class _Walk:
    """Every node, tensor and subgraph of a model, checked for what may not be in it."""

    def __init__(self, onnx: Any, limits: OnnxLimits, stubs: frozenset[str] = frozenset()) -> None:
        self.onnx = onnx
        self.limits = limits
        self.nodes = 0
        #: Initializers of the main graph that may be kvpipe's own in-memory stubs.
        self.stubs = stubs

    def tensor(self, t: Any, where: str, *, top: bool = False) -> None:
        external = self.onnx.TensorProto.EXTERNAL
        if t.data_location == external or len(t.external_data) > 0:
            if top and t.name in self.stubs and _is_stub(t):
                return
            paths = [e.value for e in t.external_data if e.key == "location"]
            shown = f" ({one_line(paths[0])})" if paths else ""
            raise _refuse(
                f"{where} {t.name!r} references external data{shown}; a graph is served from "
                "Redis alone, save it with its weights inside (onnx.save_model(..., "
                "save_as_external_data=False))"
            )

    def sparse(self, s: Any, where: str) -> None:
        self.tensor(s.values, where)
        self.tensor(s.indices, where)

    def graph(self, g: Any, where: str, *, top: bool = False) -> None:
        for t in g.initializer:
            self.tensor(t, f"initializer of {where}", top=top)
        for s in g.sparse_initializer:
            self.sparse(s, f"sparse initializer of {where}")
        for node in g.node:
            self.nodes += 1
            if self.nodes > self.limits.max_nodes:
                raise _refuse(f"more than {self.limits.max_nodes} nodes")
            if node.domain not in DEFAULT_DOMAINS:
                raise _refuse(
                    f"node {node.name or node.op_type!r} uses operator domain "
                    f"{one_line(node.domain)!r}; only ONNX's own domains are served "
                    f"({', '.join(repr(d) for d in sorted(DEFAULT_DOMAINS))})"
                )
            for a in node.attribute:
                at = f"attribute {a.name!r} of node {node.name or node.op_type!r}"
                if a.ref_attr_name:
                    raise _refuse(f"{at} refers to a function attribute")
                if a.HasField("t"):
                    self.tensor(a.t, at)
                for t in a.tensors:
                    self.tensor(t, at)
                if a.HasField("sparse_tensor"):
                    self.sparse(a.sparse_tensor, at)
                for s in a.sparse_tensors:
                    self.sparse(s, at)
                if a.HasField("g"):
                    self.graph(a.g, f"subgraph {a.name!r}")
                for sub in a.graphs:
                    self.graph(sub, f"subgraph {a.name!r}")


def _is_stub(t: Any) -> bool:
    """Whether ``t`` is a stub of kvpipe's: its data elsewhere, at :data:`IN_MEMORY` only."""
    entries = [(e.key, e.value) for e in t.external_data]
    return entries == [("location", IN_MEMORY)] and not t.raw_data


def _np_dtype(onnx: Any, elem_type: int) -> np.dtype[Any] | None:
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, TypeError, ValueError):
        return None
    return dtype if dtype.kind in "fiub" and dtype.itemsize <= 8 else None


def _value_info(onnx: Any, v: Any, role: str) -> tuple[np.dtype[Any], list[int | None]]:
    """The numeric dtype and dims (None where dynamic) of a graph input or output."""
    if v.type.WhichOneof("value") != "tensor_type":
        raise _refuse(
            f"{role} {v.name!r} is not a tensor (a sequence or map: for scikit-learn "
            "classifiers convert with options={id(model): {'zipmap': False}})"
        )
    tt = v.type.tensor_type
    dtype = _np_dtype(onnx, tt.elem_type)
    if dtype is None:
        name = onnx.TensorProto.DataType.Name(tt.elem_type) if tt.elem_type else "unknown"
        raise _refuse(f"{role} {v.name!r} has element type {name}; only numbers are served")
    if not tt.HasField("shape"):
        raise _refuse(f"{role} {v.name!r} has no shape; give it [batch, width]")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
    return dtype, dims


def _width(dims: list[int | None], role: str, name: str) -> int:
    """Columns of one row: the product of every axis after the batch axis, all fixed."""
    if not dims:
        raise _refuse(f"{role} {name!r} is a scalar; it needs a batch axis first")
    rest = dims[1:]
    if any(d is None or d <= 0 for d in rest):
        raise _refuse(
            f"{role} {name!r} has shape {shown_dims(dims)}; every axis after the batch axis must "
            "be fixed to serve it as rows"
        )
    return math.prod(d for d in rest if d is not None)


def shown_dims(dims: Sequence[int | None]) -> str:
    """Dims as a shape in a message: ``[N, 8]``, ``N`` where the axis is dynamic."""
    return "[" + ", ".join("N" if d is None else str(d) for d in dims) + "]"


def _layout(
    onnx: Any, values: Sequence[Any], role: str
) -> tuple[list[dict[str, Any]], int, set[int | None]]:
    """The row layout of graph inputs or outputs: each one's name, dtype, shape and the columns
    it takes side by side in a row; the total width; the set of their batch dims."""
    layout: list[dict[str, Any]] = []
    column = 0
    batches: set[int | None] = set()
    for v in values:
        dtype, dims = _value_info(onnx, v, role)
        width = _width(dims, role, v.name)
        batches.add(dims[0])
        layout.append(
            {
                "name": v.name,
                "dtype": dtype.name,
                "shape": dims,
                "columns": [column, column + width],
            }
        )
        column += width
    return layout, column, batches


def _tensor_names(names: Sequence[str]) -> list[str]:
    """Names for the tensors in Redis: the initializer's own when it is a plain name, else
    ``init{i}``; never two alike."""
    out: list[str] = []
    taken: set[str] = set()
    for i, name in enumerate(names):
        plain = (
            0 < len(name) <= _MAX_TENSOR_NAME
            and name[0].isascii()
            and name[0].isalpha()
            and all(c.isascii() and (c.isalnum() or c in "_.-") for c in name)
        )
        chosen = name if plain and name not in taken else f"init{i}"
        while chosen in taken:
            chosen = f"{chosen}_"
        taken.add(chosen)
        out.append(chosen)
    return out


def prepare_onnx(data: bytes, limits: OnnxLimits | None = None) -> PreparedOnnx:
    """Check an ONNX file and split it into an arch, tensors and the weightless graph.

    ConfigError, in one line, for a file that is not ONNX, fails ``onnx.checker``, exceeds
    ``limits``, reaches outside itself (external data, custom domains, functions) or cannot be
    served as rows (several inputs, non-numeric or dynamically wide inputs and outputs).
    """
    limits = limits or OnnxLimits()
    if len(data) > limits.max_file_bytes:
        raise _refuse(f"the file is {len(data)} bytes, over the limit of {limits.max_file_bytes}")
    onnx = import_onnx()
    try:
        model = onnx.load_model_from_string(bytes(data))
    except Exception as exc:
        raise ConfigError(f"not an ONNX model: {type(exc).__name__}: {one_line(exc)}") from None
    if len(model.functions) > 0:
        raise _refuse(
            f"it defines {len(model.functions)} local function(s); custom functions are not served"
        )
    if len(model.training_info) > 0:
        raise _refuse("it carries training info; export the inference graph only")
    for opset in model.opset_import:
        if opset.domain not in DEFAULT_DOMAINS:
            raise _refuse(f"it imports operator domain {one_line(opset.domain)!r}")
    walk = _Walk(onnx, limits)
    walk.graph(model.graph, "the graph", top=True)
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise _refuse(f"onnx.checker: {one_line(exc)}") from None
    g = model.graph
    if len(g.sparse_initializer) > 0:
        raise _refuse("sparse initializers are not served; store them dense")

    declared = 0
    for t in g.initializer:
        dtype = _np_dtype(onnx, t.data_type)
        itemsize = dtype.itemsize if dtype is not None else 8
        declared += math.prod(int(d) for d in t.dims) * itemsize
        if declared > limits.max_initializer_bytes:
            raise _refuse(f"its initializers hold more than {limits.max_initializer_bytes} bytes")
    moved: list[tuple[Any, npt.NDArray[Any]]] = []
    for t in g.initializer:
        dtype = _np_dtype(onnx, t.data_type)
        if dtype is None or dtype.kind == "b" or math.prod(t.dims) <= INLINE_MAX_ELEMENTS:
            continue  # strings, booleans, small constants: kept inline in the graph
        try:
            arr = np.asarray(onnx.numpy_helper.to_array(t))
        except Exception as exc:
            raise _refuse(f"initializer {t.name!r} is unreadable: {one_line(exc)}") from None
        if arr.dtype != dtype or arr.shape != tuple(t.dims):
            raise _refuse(f"initializer {t.name!r} does not match its declared type and dims")
        moved.append((t, np.ascontiguousarray(arr)))

    if not moved:
        raise _refuse(
            f"it has no weights (no initializer of more than {INLINE_MAX_ELEMENTS} elements) "
            "to keep in Redis"
        )
    init_names = {t.name for t in g.initializer}
    inputs = [v for v in g.input if v.name not in init_names]
    if not inputs:
        raise _refuse("it has no inputs")
    if len(inputs) > MAX_INPUTS:
        raise _refuse(f"it has {len(inputs)} inputs, over the limit of {MAX_INPUTS}")
    in_layout, input_dim, batches = _layout(onnx, inputs, "input")
    if len(batches) > 1 or (batches - {None, 1}):
        shown = ", ".join(
            f"{v.name!r} {shown_dims(_value_info(onnx, v, 'input')[1])}" for v in inputs
        )
        raise _refuse(
            f"its inputs have fixed batch sizes ({shown}); export them with a dynamic first "
            "axis (or 1, served row by row)"
        )
    batch = next(iter(batches))
    if not g.output:
        raise _refuse("it has no outputs")
    outputs, column, _ = _layout(onnx, list(g.output), "output")

    tensor_names = _tensor_names([t.name for t, _ in moved])
    tensors: dict[str, npt.NDArray[Any]] = {}
    initializers: dict[str, dict[str, Any]] = {}
    for tensor, (t, arr) in zip(tensor_names, moved, strict=True):
        initializers[tensor] = {"name": t.name, "dtype": arr.dtype.name, "shape": list(arr.shape)}
        tensors[tensor] = arr.reshape(arr.shape or (1,))
        # the stub the graph keeps: name, type and dims, its data given from memory
        for data_field in (
            "raw_data",
            "float_data",
            "int32_data",
            "string_data",
            "int64_data",
            "double_data",
            "uint64_data",
            "external_data",
        ):
            t.ClearField(data_field)
        t.data_location = onnx.TensorProto.EXTERNAL
        entry = t.external_data.add()
        entry.key, entry.value = "location", IN_MEMORY
    graph = model.SerializeToString()
    if len(graph) > limits.max_graph_bytes:
        raise _refuse(
            f"without its weights the graph is {len(graph)} bytes, over the limit of "
            f"{limits.max_graph_bytes} (large Constant nodes? make them initializers)"
        )
    arch: dict[str, Any] = {
        "kind": ONNX_KIND,
        "graph_sha256": hashlib.sha256(graph).hexdigest(),
        "graph_bytes": len(graph),
        "opset": {o.domain or "ai.onnx": int(o.version) for o in model.opset_import},
        "inputs": in_layout,
        "outputs": outputs,
        "batch": "dynamic" if batch is None else 1,
        "input_dim": input_dim,
        "output_dim": column,
        "initializers": initializers,
    }
    return PreparedOnnx(arch, tensors, graph)


def check_stored_graph(onnx: Any, graph: bytes, stubs: frozenset[str]) -> None:
    """A stored graph checked once more before a session is built from it (its sha256 matched,
    but Redis is not the graph's author): nothing external but the stubs of exactly the
    initializers ``stubs`` names, ONNX domains only, no local functions. ConfigError when it is
    not servable; whatever ``onnx`` raises when it does not parse."""
    model = onnx.load_model_from_string(graph)
    _Walk(onnx, OnnxLimits(max_nodes=10**9), stubs).graph(model.graph, "the graph", top=True)
    found = {t.name for t in model.graph.initializer if _is_stub(t)}
    if found != stubs or len(model.functions) > 0:
        raise ConfigError("its initializer stubs do not match the manifest")
