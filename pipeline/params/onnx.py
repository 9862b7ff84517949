"""ONNX models whose weights live in Redis: the publish checks and the ``onnx`` model kind.

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
from memory.

Serving (:class:`OnnxModel`, registered as the kind ``onnx`` through the same kind registry as
any plugin): one onnxruntime ``InferenceSession`` per (model, version), built lazily under a
lock in the compute thread from the graph bytes, with every initializer supplied from the
parameter arrays (``SessionOptions.add_external_initializers``, which uses the arrays' memory:
no weight file on disk; the stored graph is checked again first, so a stub onnxruntime would
have to read from a file is refused rather than opened), ``KVPIPE_BLAS_THREADS`` intra-op
threads and one inter-op thread (the worker's compute threads are the parallelism). A session
that cannot be built is a ``model_unusable`` error for every batch of that version, never a crash.

``onnx`` and ``onnxruntime`` (the optional extra ``kvpipe[onnx]``) are imported only here, and
only when a graph is published or a session built.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Final

import numpy as np
import numpy.typing as npt
import structlog

from pipeline.errors import ConfigError, KvpipeError, ParamsCorrupt, RequestError
from pipeline.params.models import Params, TensorSpec, one_line, register_model

__all__ = [
    "DEFAULT_DOMAINS",
    "GRAPH_PARAM",
    "ONNX_KIND",
    "OnnxLimits",
    "OnnxModel",
    "PreparedOnnx",
    "prepare_onnx",
    "set_session_threads",
]

log = structlog.get_logger("kvpipe.onnx")

ONNX_KIND: Final = "onnx"
#: The name the graph's bytes travel under among a version's parameters; never a tensor name
#: (tensor names start with a letter).
GRAPH_PARAM: Final = "@graph"
#: Operator domains a published graph may use: ONNX's own, nothing custom.
DEFAULT_DOMAINS: Final = frozenset({"", "ai.onnx", "ai.onnx.ml"})
#: The code of the error a version whose graph onnxruntime refuses answers with.
UNUSABLE: Final = "model_unusable"
#: Initializers of at most this many elements stay inline in the graph: onnxruntime reads
#: small constants (shapes, axes, pads, scales) while it resolves the graph, before the
#: in-memory initializers are in place. Weights are larger and go to Redis.
INLINE_MAX_ELEMENTS: Final = 64
#: The external-data location of the initializer stubs in a stored graph: never a file, every
#: stub is given to onnxruntime from memory.
IN_MEMORY: Final = "kvpipe:redis-tensor"

_INSTALL = "ONNX models need the onnx extra: pip install 'kvpipe[onnx]'"
_HEX = frozenset("0123456789abcdef")
_MAX_TENSOR_NAME = 64
#: The largest integer a float64 holds exactly (named integer inputs are packed as float64).
_EXACT_INT: Final = 2**53
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


def _import_onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise ConfigError(_INSTALL) from None
    return onnx


def _import_ort() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise KvpipeError(
            f"this worker cannot run ONNX models: {_INSTALL}", code=UNUSABLE
        ) from None
    return onnxruntime


# --- publishing -------------------------------------------------------------------------------


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
            f"{role} {name!r} has shape {_shown(dims)}; every axis after the batch axis must be "
            "fixed to serve it as rows"
        )
    return math.prod(d for d in rest if d is not None)


def _shown(dims: Sequence[int | None]) -> str:
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
    onnx = _import_onnx()
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
        shown = ", ".join(f"{v.name!r} {_shown(_value_info(onnx, v, 'input')[1])}" for v in inputs)
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


# --- serving ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Initializer:
    name: str  # the graph's own name
    dtype: str
    shape: tuple[int, ...]


def _field(arch: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = arch.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ConfigError(f"onnx arch: {key!r} is missing or not a {kind}")
    return value


def _dims(raw: object, where: str) -> list[int | None]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"onnx arch: {where} has no shape")
    dims: list[int | None] = []
    for d in raw:
        if d is not None and (not isinstance(d, int) or isinstance(d, bool) or d <= 0):
            raise ConfigError(f"onnx arch: {where} has a bad dimension {d!r}")
        dims.append(d)
    return dims


def _run_error(exc: Exception) -> KvpipeError:
    """onnxruntime's error from running a graph, in kvpipe's terms: inputs the graph refuses
    (an index out of range, a shape its nodes do not take) are the request's ``bad_input``;
    anything else ``model_failed``."""
    if type(exc).__name__ == "InvalidArgument":
        return RequestError(
            f"the ONNX graph refuses these inputs: {one_line(exc)}", code="bad_input"
        )
    return KvpipeError(f"the ONNX graph failed: {one_line(exc)}", code="model_failed")


def _check_slot(slot: _Slot, arr: npt.NDArray[Any], *, exact_ints: bool) -> None:
    """RequestError unless ``arr`` (rows first) fits ``slot``: its shape per row, integers
    (whole and within the input's dtype) for an integer input, finite values for a float one."""
    width = slot.stop - slot.start
    if arr.shape[1:] not in (slot.rest, (width,)) and not (arr.ndim == 1 and width == 1):
        raise RequestError(
            f"input {slot.name!r} has shape {list(arr.shape)}; the model takes "
            f"{_shown([None, *slot.rest])} (or rows of {width} values)",
            code="bad_shape",
        )
    if slot.dtype.kind in "iub":
        if arr.dtype.kind == "f" and not bool(np.all(arr == np.rint(arr))):
            raise RequestError(
                f"input {slot.name!r} takes integers ({slot.dtype}); got fractions",
                code="bad_dtype",
            )
        info = np.iinfo(np.int8 if slot.dtype.kind == "b" else slot.dtype)
        low, high = (0, 1) if slot.dtype.kind == "b" else (int(info.min), int(info.max))
        if exact_ints:
            low, high = max(low, -_EXACT_INT), min(high, _EXACT_INT)
        if float(arr.min()) < low or float(arr.max()) > high:
            raise RequestError(
                f"input {slot.name!r} takes {slot.dtype} values from {low} to {high}",
                code="bad_input",
            )
    elif float(np.abs(arr).max()) > float(np.finfo(slot.dtype).max):
        raise RequestError(
            f"input {slot.name!r} holds values beyond {slot.dtype}'s range", code="non_finite"
        )


@dataclass(frozen=True)
class _Slot:
    """One graph input or output in a row: its name, dtype, shape after the batch axis, and
    the columns ``[start, stop)`` it takes among the others set side by side."""

    name: str
    dtype: np.dtype[Any]
    rest: tuple[int, ...]
    start: int
    stop: int


def _slots(raw: list[Any], role: str, width: int) -> list[_Slot]:
    """The arch's inputs or outputs, checked to tile ``[0, width)`` in order."""
    slots: list[_Slot] = []
    for entry in raw:
        if not isinstance(entry, Mapping):
            raise ConfigError(f"onnx arch: an {role} is not an object")
        name = str(entry.get("name"))
        try:
            dtype = np.dtype(str(entry.get("dtype")))
        except TypeError:
            raise ConfigError(f"onnx arch: {role} {name!r} has a bad dtype") from None
        if dtype.kind not in "fiub":
            raise ConfigError(f"onnx arch: {role} {name!r} is not numeric")
        dims = _dims(entry.get("shape"), f"{role} {name!r}")
        if any(d is None for d in dims[1:]):
            raise ConfigError(f"onnx arch: {role} {name!r} has a dynamic axis after the batch")
        rest = tuple(d for d in dims[1:] if d is not None)
        cols = entry.get("columns")
        start = slots[-1].stop if slots else 0
        if cols != [start, start + math.prod(rest)]:
            raise ConfigError(f"onnx arch: {role} {name!r} has bad columns")
        slots.append(_Slot(name, dtype, rest, start, start + math.prod(rest)))
    if not slots or slots[-1].stop != width or len({s.name for s in slots}) != len(slots):
        raise ConfigError(f"onnx arch: the {role}s do not fill {role}_dim once each")
    return slots


@dataclass(slots=True)
class _Threads:
    intra_op: int = 1


_threads = _Threads()


def set_session_threads(intra_op: int) -> None:
    """Threads each onnxruntime session computes with (the worker passes its BLAS threads per
    compute thread: like BLAS, the compute threads are the parallelism); later sessions only."""
    _threads.intra_op = max(1, int(intra_op))


class OnnxModel:
    """A published ONNX graph, served with onnxruntime (a :class:`ModelPlugin` of kind ``onnx``).

    Built from the arch alone (cheap, per version); the session is built at the first
    :meth:`forward`, from the graph bytes that come with the parameters (``GRAPH_PARAM``).
    Outputs are every graph output flattened per row and set side by side in graph order
    (``arch["outputs"][i]["columns"]`` says where each one is), cast to float32.
    """

    kind: ClassVar[str] = ONNX_KIND

    def __init__(self, arch: Mapping[str, Any]) -> None:
        sha = _field(arch, "graph_sha256", str)
        if len(sha) != 64 or not set(sha) <= _HEX:
            raise ConfigError("onnx arch: graph_sha256 is not a sha256 hex digest")
        self.graph_sha256: str = sha
        self.input_dim: int = _field(arch, "input_dim", int)
        self.output_dim: int = _field(arch, "output_dim", int)
        inputs = _field(arch, "inputs", list)
        if len(inputs) == 1 and isinstance(inputs[0], Mapping) and "columns" not in inputs[0]:
            inputs = [{**inputs[0], "columns": [0, self.input_dim]}]  # published before names
        self.inputs = _slots(inputs, "input", self.input_dim)
        self.outputs = _slots(_field(arch, "outputs", list), "output", self.output_dim)
        #: The dtype named inputs are packed into: float32 unless an input needs more.
        self.packed_dtype = np.dtype(
            np.float32
            if all(i.dtype.kind == "f" and i.dtype.itemsize <= 4 for i in self.inputs)
            else np.float64
        )
        batch = arch.get("batch")
        if batch not in ("dynamic", 1):
            raise ConfigError("onnx arch: batch must be 'dynamic' or 1")
        self.row_by_row = batch == 1
        self.initializers: dict[str, _Initializer] = {}
        for tensor, spec in _field(arch, "initializers", Mapping).items():
            if not isinstance(spec, Mapping):
                raise ConfigError(f"onnx arch: initializer {tensor!r} is not an object")
            shape = spec.get("shape")
            if not isinstance(shape, list) or not all(
                isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape
            ):
                raise ConfigError(f"onnx arch: initializer {tensor!r} has a bad shape")
            self.initializers[str(tensor)] = _Initializer(
                str(spec.get("name")), str(spec.get("dtype")), tuple(shape)
            )
        self._lock = threading.Lock()
        self._session: Any = None
        self._failure: KvpipeError | None = None
        self._keep: list[Any] = []  # the arrays and OrtValues the session's weights live in

    def tensor_specs(self) -> dict[str, TensorSpec]:
        """One tensor per initializer held in Redis (a scalar is stored with shape (1,))."""
        return {t: TensorSpec(i.shape or (1,), i.dtype) for t, i in self.initializers.items()}

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(i.name for i in self.inputs)

    def pack_inputs(self, named: Mapping[str, npt.NDArray[Any]]) -> npt.NDArray[Any]:
        """Named inputs as one matrix, each input flattened per row into its columns (in
        ``packed_dtype``: exact for integers up to 2**53); RequestError when they do not fit."""
        missing = [i.name for i in self.inputs if i.name not in named]
        extra = [repr(k[:64]) for k in named if k not in self.input_names]
        if missing or extra:
            raise RequestError(
                f"this model's inputs are {', '.join(self.input_names)}"
                + (f"; missing {', '.join(missing)}" if missing else "")
                + (f"; not inputs of it: {', '.join(extra[:5])}" if extra else ""),
                code="bad_input",
            )
        rows = next(iter(named.values())).shape[0]
        for slot in self.inputs:  # every input checked before the matrix is allocated
            _check_slot(slot, named[slot.name], exact_ints=self.packed_dtype == np.float64)
        out = np.empty((rows, self.input_dim), dtype=self.packed_dtype)
        for slot in self.inputs:
            out[:, slot.start : slot.stop] = named[slot.name].reshape(rows, slot.stop - slot.start)
        return out

    def named_outputs(self, y: npt.NDArray[Any]) -> dict[str, npt.NDArray[Any]]:
        """Each output of ``y`` (rows side by side, as :meth:`forward` returns them) in its own
        shape and dtype; integers are exact up to 2**24 (they travel as float32)."""
        n = y.shape[0]
        out: dict[str, npt.NDArray[Any]] = {}
        for slot in self.outputs:
            cols = y[:, slot.start : slot.stop].reshape((n, *slot.rest))
            if slot.dtype.kind == "b":
                out[slot.name] = cols != 0
            elif slot.dtype.kind in "iu":
                out[slot.name] = np.rint(cols).astype(slot.dtype)
            else:
                out[slot.name] = cols.astype(slot.dtype, copy=False)
        return out

    def forward(self, params: Params, x: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        """Outputs of ``x`` (rows with the inputs side by side), every graph output flattened
        per row and side by side as float32."""
        session = self._session_for(params)
        n = x.shape[0]
        feed = {
            i.name: np.ascontiguousarray(x[:, i.start : i.stop].reshape((n, *i.rest)), i.dtype)
            for i in self.inputs
        }
        names = [o.name for o in self.outputs]
        try:
            if self.row_by_row:
                rows = [
                    session.run(names, {k: v[r : r + 1] for k, v in feed.items()}) for r in range(n)
                ]
                results = [np.concatenate([r[k] for r in rows]) for k in range(len(names))]
            else:
                results = list(session.run(names, feed))
        except Exception as exc:
            raise _run_error(exc) from None
        out = np.empty((n, self.output_dim), dtype=np.float32)
        for o, value in zip(self.outputs, results, strict=True):
            arr = np.asarray(value)
            if arr.size != n * (o.stop - o.start):
                raise KvpipeError(
                    f"ONNX output {o.name!r} has shape {arr.shape} for {n} rows; the arch says "
                    f"{o.stop - o.start} values per row",
                    code="model_failed",
                )
            out[:, o.start : o.stop] = arr.reshape(n, o.stop - o.start)
        return out

    def _session_for(self, params: Params) -> Any:
        """The version's session, built once (single-flight under the lock); a failure to
        build is remembered and raised again for every later batch of this version."""
        with self._lock:
            if self._failure is not None:
                raise self._failure
            if self._session is None:
                try:
                    self._session = self._build(params)
                except KvpipeError as exc:
                    self._failure = exc
                    raise
            return self._session

    def _check_stored(self, graph: bytes) -> None:
        """The stored graph once more (its sha256 matched, but Redis is not the graph's author):
        nothing external but the stubs of exactly this arch's initializers, ONNX domains only."""
        try:
            onnx = _import_onnx()
        except ConfigError as exc:
            raise KvpipeError(f"this worker cannot run ONNX models: {exc}", code=UNUSABLE) from None
        try:
            model = onnx.load_model_from_string(graph)
            names = frozenset(i.name for i in self.initializers.values())
            _Walk(onnx, OnnxLimits(max_nodes=10**9), names).graph(
                model.graph, "the graph", top=True
            )
            stubs = {t.name for t in model.graph.initializer if _is_stub(t)}
            if stubs != names or len(model.functions) > 0:
                raise ConfigError("its initializer stubs do not match the manifest")
        except ConfigError as exc:
            raise ParamsCorrupt(f"the stored ONNX graph is not servable: {exc}") from None
        except Exception as exc:
            raise ParamsCorrupt(f"the stored ONNX graph is unreadable: {one_line(exc)}") from None

    def _build(self, params: Params) -> Any:
        ort = _import_ort()
        stored = params.get(GRAPH_PARAM)
        if stored is None:
            raise KvpipeError("the ONNX graph was not loaded with the parameters", code=UNUSABLE)
        graph = np.asarray(stored).tobytes()
        started = time.perf_counter()
        self._check_stored(graph)
        options = ort.SessionOptions()
        options.intra_op_num_threads = _threads.intra_op
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        keep: list[Any] = []
        names: list[str] = []
        values: list[Any] = []
        for tensor, init in self.initializers.items():
            arr = np.ascontiguousarray(params[tensor]).reshape(init.shape)
            names.append(init.name)
            values.append(ort.OrtValue.ortvalue_from_numpy(arr))
            keep.append(arr)
        if names:
            options.add_external_initializers(names, values)
        keep += values
        try:
            session = ort.InferenceSession(
                graph,
                sess_options=options,
                providers=["CPUExecutionProvider"],
            )
        except Exception as exc:
            raise KvpipeError(
                f"onnxruntime cannot build a session for this ONNX graph: {one_line(exc)}",
                code=UNUSABLE,
            ) from None
        self._keep = keep
        log.info(
            "onnx_session_built",
            graph=self.graph_sha256[:12],
            initializers=len(self.initializers),
            ms=round((time.perf_counter() - started) * 1000, 3),
        )
        if self.row_by_row:
            log.info(
                "onnx_row_by_row",
                graph=self.graph_sha256[:12],
                reason="the graph's input has a fixed batch size of 1",
            )
        return session


register_model(OnnxModel, source="built in; publishing and serving need kvpipe[onnx]")
