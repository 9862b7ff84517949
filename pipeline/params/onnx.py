"""The ``onnx`` model kind: published ONNX graphs, their weights in Redis, run by onnxruntime.

Serving (:class:`OnnxModel`, registered as the kind ``onnx`` through the same kind registry as
any plugin): one onnxruntime ``InferenceSession`` per (model, version), built lazily under a
lock in the compute thread from the graph bytes, with every initializer supplied from the
parameter arrays (``SessionOptions.add_external_initializers``, which uses the arrays' memory:
no weight file on disk; the stored graph is checked again first, so a stub onnxruntime would
have to read from a file is refused rather than opened), ``KVPIPE_BLAS_THREADS`` intra-op
threads and one inter-op thread (the worker's compute threads are the parallelism). A session
that cannot be built is a ``model_unusable`` error for every batch of that version, never a crash.
What a graph must be to be published, and its split into tensors and a weightless graph, is
:mod:`pipeline.params.onnx_graph`.

``onnxruntime`` (the optional extra ``kvpipe[onnx]``) is imported only here, and only when a
session is built.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Final

import numpy as np
import numpy.typing as npt
import structlog

from pipeline.errors import ConfigError, KvpipeError, ParamsCorrupt, RequestError
from pipeline.params.models import Params, TensorSpec, one_line, register_model
from pipeline.params.onnx_graph import (
    INSTALL_HINT,
    ONNX_KIND,
    check_stored_graph,
    import_onnx,
    shown_dims,
)

__all__ = [
    "GRAPH_PARAM",
    "UNUSABLE",
    "OnnxModel",
    "check_session",
    "set_session_threads",
]

log = structlog.get_logger("kvpipe.onnx")

#: The name the graph's bytes travel under among a version's parameters; never a tensor name
#: (tensor names start with a letter).
GRAPH_PARAM: Final = "@graph"
#: The code of the error a version whose graph onnxruntime refuses answers with.
UNUSABLE: Final = "model_unusable"

_HEX = frozenset("0123456789abcdef")
#: The largest integer a float64 holds exactly (named integer inputs are packed as float64).
_EXACT_INT: Final = 2**53


def _import_ort() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise KvpipeError(
            f"this worker cannot run ONNX models: {INSTALL_HINT}", code=UNUSABLE
        ) from None
    return onnxruntime


def check_session(data: bytes) -> None:
    """ConfigError, in one line, when onnxruntime cannot build a session for an ONNX file that
    :func:`~pipeline.params.onnx_graph.prepare_onnx` accepted (an operator it lacks, shapes
    its kernels refuse): refused at publish rather than found by the first worker. Only for
    checked files: they reference nothing outside themselves."""
    try:
        ort = _import_ort()
    except KvpipeError as exc:
        raise ConfigError(f"cannot check the graph with onnxruntime: {exc}") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    try:
        ort.InferenceSession(bytes(data), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ConfigError(
            f"onnxruntime cannot build a session for this ONNX graph: {one_line(exc)}"
        ) from None


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
            f"{shown_dims([None, *slot.rest])} (or rows of {width} values)",
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
            onnx = import_onnx()
        except ConfigError as exc:
            raise KvpipeError(f"this worker cannot run ONNX models: {exc}", code=UNUSABLE) from None
        try:
            names = frozenset(i.name for i in self.initializers.values())
            check_stored_graph(onnx, graph, names)
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
