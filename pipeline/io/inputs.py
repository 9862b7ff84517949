"""The checks on what a request carries, before anything acts on it: its id, model name and
version, its rows (floats, or integer ids) and its named inputs, each within the request limits;
and :func:`safe_text`, for echoing back what a client sent. A refusal is a RequestError with a
stable code; an id that cannot be answered is UnreadableMessage (the dead-letter topic).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.config import LimitSettings
from pipeline.errors import ConfigError, RequestError, UnreadableMessage
from pipeline.names import check_name

MAX_ID_CHARS = 256
MAX_INT64 = 2**63 - 1
#: How much of an invalid model name a result echoes.
MAX_ECHO_CHARS = 64


def safe_text(value: object, limit: int) -> str:
    """``value`` as text that can always be sent back: lone surrogates escaped, at most
    ``limit`` characters (cut ones end in an ellipsis). For echoing what a client sent."""
    text = value if isinstance(value, str) else ""
    if len(text) > limit:
        text = text[: limit - 1] + "\u2026"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")[:limit]
    return text


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_id(value: object) -> str:
    """A request id that results can carry back, or UnreadableMessage (nothing to answer to)."""
    if not isinstance(value, str) or not value or len(value) > MAX_ID_CHARS:
        raise UnreadableMessage(
            f"request id must be a non-empty string of at most {MAX_ID_CHARS} characters",
            code="missing_id",
        )
    if not _encodable(value):
        raise UnreadableMessage(
            "request id is not valid Unicode (it holds a lone surrogate)", code="missing_id"
        )
    return value


def check_model(value: object) -> str:
    """A model name by the one naming rule (:func:`pipeline.names.check_name`), or raise."""
    if not isinstance(value, str) or not value:
        raise RequestError("request has no model name", code="bad_request")
    try:
        return check_name(value, "model")
    except ConfigError as exc:
        raise RequestError(str(exc), code="bad_request") from None


def check_version(value: object) -> int | None:
    """A pinned version (a positive int64), None when none is asked for; or raise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_INT64:
        raise RequestError("version must be a positive integer", code="bad_request")
    return value


_F32_MAX = float(np.finfo(np.float32).max)


def _matrix(raw: Any, what: str, kinds: str, kind_name: str, limits: LimitSettings) -> Any:
    """``raw`` as a non-empty 2-D array of the given dtype kinds within the limits, or raise."""
    try:
        arr = np.asarray(raw)
    except (ValueError, TypeError) as exc:
        raise RequestError(f"{what} are not a rectangular array: {exc}", code="bad_shape") from None
    if arr.dtype.kind not in kinds:
        raise RequestError(f"{what} must be {kind_name}, got dtype {arr.dtype}", code="bad_dtype")
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise RequestError(
            f"{what} must be a non-empty list of rows (2-D), got shape {arr.shape}",
            code="bad_shape",
        )
    if arr.size > limits.max_elements or arr.shape[0] > limits.max_rows:
        raise RequestError(
            f"{what} of shape {arr.shape} are over the limits ({limits.max_rows} rows, "
            f"{limits.max_elements} elements)",
            code="too_large",
        )
    return arr


def check_inputs(raw: Any, limits: LimitSettings) -> npt.NDArray[np.float32]:
    """Turn rows of numbers into a finite float32 matrix within the limits, or raise."""
    arr = _matrix(raw, "inputs", "iuf", "numbers", limits)
    if arr.dtype == np.float32:
        out: npt.NDArray[np.float32] = np.ascontiguousarray(arr)
        finite = bool(np.isfinite(out).all())
    else:
        # Checked before the cast, so the cast never overflows (no warning to silence: an
        # np.errstate per request cost more than the check). NaN fails the comparison too.
        finite = arr.dtype.kind != "f" or bool(np.abs(arr).max() <= _F32_MAX)
        out = arr.astype(np.float32) if finite else arr
    if not finite:
        raise RequestError("inputs contain NaN or infinity (in float32)", code="non_finite")
    return out


def check_ids(raw: Any, limits: LimitSettings) -> npt.NDArray[np.int64]:
    """Turn rows of integer ids into an int64 matrix within the limits, or raise."""
    arr = _matrix(raw, "ids", "iu", "integers", limits)
    if arr.dtype.kind == "u" and arr.max() > np.iinfo(np.int64).max:
        raise RequestError("ids are out of range", code="bad_ids")
    ids: npt.NDArray[np.int64] = np.ascontiguousarray(arr, dtype=np.int64)
    return ids


#: At most this many named inputs in one request, and this many axes per input.
MAX_NAMED_INPUTS = 64
MAX_INPUT_AXES = 8


def check_named(raw: Any, limits: LimitSettings) -> dict[str, npt.NDArray[Any]]:
    """Named inputs (``{"name": array, ...}``, rows on the first axis) as int64 or finite
    float64 arrays with one row count, within the limits together; or raise."""
    if not isinstance(raw, dict) or not raw:
        raise RequestError("named inputs must be a non-empty object", code="bad_request")
    if len(raw) > MAX_NAMED_INPUTS:
        raise RequestError(
            f"{len(raw)} named inputs is over the limit of {MAX_NAMED_INPUTS}", code="too_large"
        )
    out: dict[str, npt.NDArray[Any]] = {}
    rows: int | None = None
    elements = 0
    for name, value in raw.items():
        shown = safe_text(name, MAX_ECHO_CHARS)
        if (
            not isinstance(name, str)
            or not name
            or len(name) > MAX_ID_CHARS
            or not _encodable(name)
        ):
            raise RequestError(f"input name {shown!r} is not a usable name", code="bad_request")
        try:
            arr = np.asarray(value)
        except (ValueError, TypeError) as exc:
            raise RequestError(
                f"input {shown!r} is not a rectangular array: {exc}", code="bad_shape"
            ) from None
        if arr.dtype.kind not in "iuf":
            raise RequestError(
                f"input {shown!r} must be numbers, got dtype {arr.dtype}", code="bad_dtype"
            )
        if not 1 <= arr.ndim <= MAX_INPUT_AXES or 0 in arr.shape:
            raise RequestError(
                f"input {shown!r} must hold rows on its first axis (1 to {MAX_INPUT_AXES} axes, "
                f"none empty), got shape {arr.shape}",
                code="bad_shape",
            )
        if rows is not None and arr.shape[0] != rows:
            raise RequestError(
                f"input {shown!r} has {arr.shape[0]} rows; the others have {rows}",
                code="bad_shape",
            )
        rows = int(arr.shape[0])
        elements += int(arr.size)
        if elements > limits.max_elements or rows > limits.max_rows:
            raise RequestError(
                f"the named inputs are over the limits ({limits.max_rows} rows, "
                f"{limits.max_elements} elements)",
                code="too_large",
            )
        if arr.dtype.kind in "iu":
            if arr.dtype.kind == "u" and arr.max() > np.iinfo(np.int64).max:
                raise RequestError(f"input {shown!r} is out of range", code="bad_input")
            out[name] = np.ascontiguousarray(arr, dtype=np.int64)
        elif not bool(np.isfinite(arr).all()):
            raise RequestError(f"input {shown!r} contains NaN or infinity", code="non_finite")
        else:  # float64 until the model packs it: exact for its integer inputs, range-checked
            out[name] = np.ascontiguousarray(arr, dtype=np.float64)
    return out
