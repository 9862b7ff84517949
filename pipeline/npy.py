"""``.npy`` bytes in and out, never unpickling, with size checks before any allocation."""

from __future__ import annotations

import io

import numpy as np
import numpy.typing as npt

_ALLOWED_KINDS = frozenset("biuf")


def to_npy(array: npt.ArrayLike) -> bytes:
    """Encode an array as ``.npy`` bytes (object arrays are refused)."""
    arr = np.asarray(array)
    if arr.dtype.kind not in _ALLOWED_KINDS:
        raise ValueError(f"dtype {arr.dtype} cannot be stored; use a numeric dtype")
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def from_npy(
    data: bytes, *, max_bytes: int | None = None, max_elements: int | None = None
) -> npt.NDArray[np.generic]:
    """Decode ``.npy`` bytes; raise ValueError for anything but a plain numeric array.

    The header is read and checked (dtype kind, element count, byte size) before the array
    body is touched, and ``allow_pickle=False`` always.
    """
    if max_bytes is not None and len(data) > max_bytes:
        raise ValueError(f"npy payload of {len(data)} bytes is over the limit of {max_bytes}")
    buf = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buf)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(buf)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(buf)
        else:
            raise ValueError(f"unsupported npy version {version}")
    except ValueError as exc:
        raise ValueError(f"not a readable npy array: {exc}") from None
    if dtype.kind not in _ALLOWED_KINDS or dtype.hasobject or dtype.fields is not None:
        raise ValueError(f"npy dtype {dtype} is not allowed; send a numeric array")
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if max_elements is not None and count > max_elements:
        raise ValueError(f"npy array of {count} elements is over the limit of {max_elements}")
    body = len(data) - buf.tell()
    if body != count * dtype.itemsize:
        raise ValueError(
            f"npy body is {body} bytes but shape {shape} of {dtype} needs {count * dtype.itemsize}"
        )
    buf.seek(0)
    try:
        arr: npt.NDArray[np.generic] = np.load(buf, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(f"not a readable npy array: {exc}") from None
    if not isinstance(arr, np.ndarray):  # pragma: no cover - np.load of .npy is an ndarray
        raise ValueError("npy payload is not a single array")
    if fortran:
        arr = np.ascontiguousarray(arr)
    return arr
