"""Open Inference Protocol (V2, as KServe, MLServer, Triton and Seldon Core 2 speak it) bodies:
request tensors read and checked, response and error bodies written.

Over Kafka, MLServer's server takes the V2 inference request as the JSON value, the model from
the ``mlserver-model`` header, its version from ``mlserver-version`` and the request id from
the message key when there is one (before the body's ``id``); it sends no content-type
header (``parameters.content_type`` in a body names one of MLServer's codecs, ``np`` for a
numpy tensor, not the wire format). :mod:`pipeline.io.wire` recognises a V2 request by the
``mlserver-model`` header (or the content type :data:`OIP`) and uses this module for the body.

Tensors: ``{"name", "shape", "datatype", "data", "parameters"?}``, ``data`` flat in row-major
order or nested as ``shape`` says. Datatypes BOOL, INT8-64, UINT8-64, FP16, FP32 and FP64;
BYTES is refused (``unsupported_datatype``): kvpipe's models take numbers. The first axis is
the rows (a batch forms along it). Everything is checked against the request limits before an
array is built at its declared size.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from pipeline.config import LimitSettings
from pipeline.errors import RequestError

#: The content type of V2 results (and accepted on requests, beside ``mlserver-model`` alone).
OIP = "application/vnd.oip.v2+json"
H_MODEL = "mlserver-model"
H_VERSION = "mlserver-version"
H_METHOD = "mlserver-method"

#: V2 datatype -> numpy dtype (BYTES has none here: refused on input).
DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
_NAMES = {dtype: name for name, dtype in DATATYPES.items()}
#: The one MLServer codec this reader understands (a numpy tensor); none given means the same.
NUMPY_CODEC = "np"
MAX_TENSORS = 64
MAX_AXES = 8
MAX_NAME_CHARS = 256
#: What a V2 version header may say: ``3`` or ``v3``.
MAX_VERSION_CHARS = 20
#: The largest version (or any integer) kvpipe writes back: int64.
_MAX_INT64 = 2**63 - 1


@dataclass(slots=True)
class V2Request:
    """A V2 inference request's body, checked: its tensors by name, rows on the first axis."""

    id: str | None
    inputs: dict[str, npt.NDArray[Any]]
    #: The outputs asked for by name, in order (None: all of them).
    outputs: tuple[str, ...] | None

    @property
    def rows(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])


def _name(raw: object, what: str) -> str:
    if not isinstance(raw, str) or not raw or len(raw) > MAX_NAME_CHARS:
        raise RequestError(
            f"{what} name must be a non-empty string of at most {MAX_NAME_CHARS} characters",
            code="bad_request",
        )
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(f"{what} name is not valid Unicode", code="bad_request") from None
    return raw


def _codec(parameters: object, where: str) -> None:
    """Refuse parameters that are not an object, or a content type other than a numpy tensor."""
    if parameters is None:
        return
    if not isinstance(parameters, dict):
        raise RequestError(f"{where} parameters must be an object", code="bad_request")
    codec = parameters.get("content_type")
    if codec is not None and codec != NUMPY_CODEC:
        shown = str(codec)[:40] if isinstance(codec, str) else type(codec).__name__
        raise RequestError(
            f"{where} content_type {shown!r} is not served: kvpipe reads numeric tensors "
            f"(content_type {NUMPY_CODEC!r} or none)",
            code="unsupported_content_type",
        )
    if "binary_data_size" in parameters:
        raise RequestError(
            f"{where} uses the binary data extension; send data as JSON", code="bad_request"
        )


def _shape(raw: object, shown: str, limits: LimitSettings) -> tuple[int, ...]:
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_AXES:
        raise RequestError(
            f"input {shown!r}: shape must be a list of 1 to {MAX_AXES} sizes", code="bad_shape"
        )
    size = 1
    for dim in raw:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise RequestError(
                f"input {shown!r}: shape {str(raw)[:80]} must hold positive integers",
                code="bad_shape",
            )
        size *= dim
        if size > limits.max_elements:
            raise RequestError(
                f"input {shown!r} of shape {str(raw)[:80]} is over the limit of "
                f"{limits.max_elements} elements",
                code="too_large",
            )
    if raw[0] > limits.max_rows:
        raise RequestError(
            f"input {shown!r} has {raw[0]} rows; the limit is {limits.max_rows}", code="too_large"
        )
    return tuple(raw)


def _data(raw: object, dtype: np.dtype[Any], shape: tuple[int, ...], shown: str) -> Any:
    """``data`` as an array of ``dtype`` and ``shape``: values checked to fit the dtype."""
    if not isinstance(raw, list):
        raise RequestError(f"input {shown!r}: data must be a list", code="bad_request")
    try:
        arr = np.asarray(raw)
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise RequestError(
            f"input {shown!r}: data is not a rectangular array: {str(exc)[:120]}",
            code="bad_shape",
        ) from None
    want = int(np.prod(shape))
    if arr.size != want or (arr.ndim != 1 and arr.shape != shape):
        raise RequestError(
            f"input {shown!r}: data of shape {arr.shape} does not fill shape {list(shape)} "
            f"({want} values, flat or nested)",
            code="bad_shape",
        )
    kind = arr.dtype.kind
    exact_ints = False  # Python ints only, some past int64 (range-checked below)
    if dtype.kind in "iu" and kind in "fO":  # integers past int64 make numpy choose floats
        exact = np.asarray(raw, dtype=object).reshape(-1)
        if all(type(v) is int for v in exact):
            arr, exact_ints = exact, True
    if dtype.kind == "b":
        ok = kind == "b"
    elif dtype.kind in "iu":
        ok = kind in "iu" or exact_ints  # never null, objects or floats
    else:
        ok = kind in "iuf"
    if not ok:
        raise RequestError(
            f"input {shown!r}: data does not hold {_NAMES[dtype]} values (read as {arr.dtype})",
            code="bad_dtype",
        )
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        low, high = int(arr.min()), int(arr.max())
        if low < info.min or high > info.max:
            raise RequestError(
                f"input {shown!r}: values outside the range of {_NAMES[dtype]}",
                code="bad_input",
            )
    elif dtype.kind == "f":
        with np.errstate(over="ignore", invalid="ignore"):
            cast = arr.astype(dtype)
        if not bool(np.isfinite(cast).all()):
            raise RequestError(
                f"input {shown!r} contains NaN or infinity (in {_NAMES[dtype]})",
                code="non_finite",
            )
        return cast.reshape(shape)
    return arr.astype(dtype).reshape(shape)


def _tensor(raw: object, limits: LimitSettings) -> tuple[str, npt.NDArray[Any]]:
    if not isinstance(raw, dict):
        raise RequestError("each input must be an object (a named tensor)", code="bad_request")
    name = _name(raw.get("name"), "input")
    shown = name[:64]
    datatype = raw.get("datatype")
    if datatype == "BYTES":
        raise RequestError(
            f"input {shown!r} is BYTES; kvpipe models take numeric tensors "
            "(BOOL, INT8-64, UINT8-64, FP16, FP32, FP64)",
            code="unsupported_datatype",
        )
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise RequestError(
            f"input {shown!r}: datatype {str(datatype)[:20]!r} is not a V2 datatype",
            code="bad_dtype",
        )
    _codec(raw.get("parameters"), f"input {shown!r}")
    shape = _shape(raw.get("shape"), shown, limits)
    return name, _data(raw.get("data"), DATATYPES[datatype], shape, shown)


def read_request(body: object, limits: LimitSettings) -> V2Request:
    """A V2 inference request body, checked (the caller has bounded its bytes); or raise
    :class:`RequestError` with a stable code."""
    if not isinstance(body, dict):
        raise RequestError("a V2 inference request must be a JSON object", code="bad_request")
    rid = body.get("id")
    if rid is not None and not isinstance(rid, str):
        raise RequestError("id must be a string", code="bad_request")
    _codec(body.get("parameters"), "request")
    raw_inputs = body.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise RequestError("inputs must be a non-empty list of tensors", code="bad_request")
    if len(raw_inputs) > MAX_TENSORS:
        raise RequestError(
            f"{len(raw_inputs)} inputs is over the limit of {MAX_TENSORS}", code="too_large"
        )
    inputs: dict[str, npt.NDArray[Any]] = {}
    elements = 0
    for raw in raw_inputs:
        name, arr = _tensor(raw, limits)
        if name in inputs:
            raise RequestError(f"input {name[:64]!r} is given twice", code="bad_request")
        first = next(iter(inputs.values()), None)
        if first is not None and arr.shape[0] != first.shape[0]:
            raise RequestError(
                f"input {name[:64]!r} has {arr.shape[0]} rows; the others have {first.shape[0]}",
                code="bad_shape",
            )
        elements += arr.size
        if elements > limits.max_elements:
            raise RequestError(
                f"the inputs are over the limit of {limits.max_elements} elements",
                code="too_large",
            )
        inputs[name] = arr
    return V2Request(rid, inputs, _wanted(body.get("outputs")))


def _wanted(raw: object) -> tuple[str, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or len(raw) > MAX_TENSORS:
        raise RequestError(
            f"outputs must be a list of at most {MAX_TENSORS} objects", code="bad_request"
        )
    names: list[str] = []
    for item in raw:
        if not isinstance(item, dict):
            raise RequestError("each requested output must be an object", code="bad_request")
        _codec(item.get("parameters"), "output")
        names.append(_name(item.get("name"), "output"))
    return tuple(dict.fromkeys(names)) or None


def read_version(raw: str | None) -> int | None:
    """``mlserver-version``: kvpipe's versions are positive integers, written ``3`` or ``v3``."""
    if raw is None or raw == "":
        return None
    text = raw[1:] if raw[:1] in ("v", "V") else raw
    if (
        len(raw) > MAX_VERSION_CHARS
        or not (text.isascii() and text.isdigit())
        or not 1 <= int(text) <= _MAX_INT64
    ):
        raise RequestError(
            f"{H_VERSION} {raw[:MAX_VERSION_CHARS]!r}: kvpipe model versions are positive "
            "integers (3 or v3)",
            code="bad_request",
        )
    return int(text)


def datatype_of(arr: npt.NDArray[Any]) -> str:
    """The V2 datatype of an output array (strings are BYTES)."""
    name = _NAMES.get(arr.dtype)
    if name is not None:
        return name
    if arr.dtype.kind in "US":
        return "BYTES"
    raise ValueError(f"an output of dtype {arr.dtype} has no V2 datatype")


def _output(name: str, arr: npt.NDArray[Any]) -> dict[str, Any]:
    datatype = datatype_of(arr)
    flat: Any = np.ascontiguousarray(arr).reshape(-1)
    if datatype == "BYTES":
        flat = [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in flat]
    return {"name": name, "shape": list(arr.shape), "datatype": datatype, "data": flat}


def response_body(
    *,
    model: str,
    version: int | None,
    id: str,
    outputs: Mapping[str, npt.NDArray[Any]],
    wanted: tuple[str, ...] | None = None,
) -> bytes:
    """A V2 inference response: the outputs asked for (all when ``wanted`` is None), each
    with its shape, datatype and data flat in row-major order. Raises :class:`RequestError`
    (``unknown_output``) when an output asked for does not exist."""
    names = list(outputs) if wanted is None else list(wanted)
    missing = [n for n in names if n not in outputs]
    if missing:
        raise RequestError(
            f"output {missing[0][:64]!r} does not exist; this model's outputs are "
            f"{', '.join(list(outputs)[:16])}",
            code="unknown_output",
        )
    body = {
        "model_name": model,
        "model_version": None if version is None else str(version),
        "id": id,
        "outputs": [_output(n, outputs[n]) for n in names],
    }
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


def error_body(*, id: str, model: str, code: str, message: str) -> bytes:
    """A V2 error: ``{"error": message}``, with the request id, model and kvpipe's stable code
    beside it (extra fields a V2 reader ignores)."""
    return orjson.dumps({"error": message, "id": id, "model_name": model, "code": code})


def read_response(body: bytes) -> tuple[dict[str, Any], dict[str, npt.NDArray[Any]]]:
    """A V2 response body: its fields, and its outputs as arrays by name (for kvpipe's client
    and tests; raises ValueError or KeyError when it is not one)."""
    parsed = orjson.loads(body)
    if not isinstance(parsed, dict):
        raise ValueError("a V2 response must be a JSON object")
    outputs: dict[str, npt.NDArray[Any]] = {}
    for out in parsed.get("outputs") or ():
        datatype = out["datatype"]
        dtype: Any = DATATYPES[datatype] if datatype != "BYTES" else np.str_
        outputs[str(out["name"])] = np.asarray(out["data"], dtype=dtype).reshape(out["shape"])
    return parsed, outputs
