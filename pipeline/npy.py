"""``.npy`` bytes in and out, never unpickling, with size checks before any allocation."""

from __future__ import annotations

import io
import re
import struct

import numpy as np
import numpy.typing as npt

_ALLOWED_KINDS = frozenset("biuf")
_MAGIC_V1 = b"\x93NUMPY\x01\x00"
# The header numpy writes for a plain C-order array (version 1.0). Anything else takes the
# general path through numpy's own header reader.
_SIMPLE_HEADER = re.compile(
    rb"\{'descr': '([<>|]?[biuf][0-9]{1,2})', 'fortran_order': False, "
    rb"'shape': \(((?:[0-9]+, ?)*[0-9]*)\), \} *\n"
)
_dtypes: dict[bytes, np.dtype[np.generic]] = {}


def _dtype(descr: bytes) -> np.dtype[np.generic]:
    dtype = _dtypes.get(descr)
    if dtype is None:
        dtype = _dtypes[descr] = np.dtype(descr.decode())
    return dtype


def _header(dtype: np.dtype[np.generic], shape: tuple[int, ...]) -> bytes:
    """The version 1.0 header numpy's ``write_array`` writes, padded to 64 bytes."""
    text = f"{{'descr': {dtype.str!r}, 'fortran_order': False, 'shape': {shape!r}, }}"
    pad = 64 - (len(_MAGIC_V1) + 2 + len(text) + 1) % 64
    body = (text + " " * pad + "\n").encode("latin1")
    return _MAGIC_V1 + struct.pack("<H", len(body)) + body


def to_npy(array: npt.ArrayLike) -> bytes:
    """Encode an array as ``.npy`` bytes (object arrays are refused)."""
    arr = np.asarray(array)
    if arr.dtype.kind not in _ALLOWED_KINDS:
        raise ValueError(f"dtype {arr.dtype} cannot be stored; use a numeric dtype")
    if not arr.flags.c_contiguous:
        arr = arr.copy(order="C")  # (np.ascontiguousarray would make a 0-d array 1-d)
    if arr.dtype.fields is None and arr.dtype.str[1:2] in _ALLOWED_KINDS:
        return _header(arr.dtype, arr.shape) + arr.tobytes()
    buf = io.BytesIO()  # pragma: no cover - numeric dtypes always take the path above
    np.lib.format.write_array(buf, arr, allow_pickle=False)
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
    if data[:8] == _MAGIC_V1 and len(data) >= 10:
        end = 10 + struct.unpack_from("<H", data, 8)[0]
        parsed = _parsed.get(data[10:end])
        if parsed is None:
            m = _SIMPLE_HEADER.fullmatch(data, 10, end)
            if m is not None:
                parsed = _parse(data[10:end], m)
        if parsed is not None:
            return _simple(data, parsed, end, max_elements)
    return _general(data, max_elements)


_Parsed = tuple[np.dtype[np.generic], tuple[int, ...], int]
_parsed: dict[bytes, _Parsed] = {}  # a stream's requests mostly share one header


def _parse(header: bytes, m: re.Match[bytes]) -> _Parsed:
    dtype = _dtype(m.group(1))
    shape = tuple(int(d) for d in m.group(2).split(b",") if d.strip())
    count = 1
    for d in shape:
        count *= d
    if len(_parsed) >= 1024:
        _parsed.clear()
    _parsed[header] = parsed = (dtype, shape, count)
    return parsed


def _simple(
    data: bytes, parsed: _Parsed, end: int, max_elements: int | None
) -> npt.NDArray[np.generic]:
    """The common header, read with one regex instead of numpy's ``literal_eval``."""
    dtype, shape, count = parsed
    if max_elements is not None and count > max_elements:
        raise ValueError(f"npy array of {count} elements is over the limit of {max_elements}")
    body = len(data) - end
    if body != count * dtype.itemsize:
        raise ValueError(
            f"npy body is {body} bytes but shape {shape} of {dtype} needs {count * dtype.itemsize}"
        )
    return np.frombuffer(data, dtype=dtype, count=count, offset=end).reshape(shape).copy()


def _general(data: bytes, max_elements: int | None) -> npt.NDArray[np.generic]:
    """Any other ``.npy``: numpy's header reader, the same checks, never a pickle."""
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
