"""``.npy`` bytes in and out, never unpickling, with size checks before any allocation."""

from __future__ import annotations

import io
import math
import os
import re
import struct
import zipfile
import zlib
from typing import IO

import numpy as np
import numpy.typing as npt

_ALLOWED_KINDS = frozenset("biuf")
#: The most :func:`read_npz` reads: the file, and the arrays' declared sizes added up.
MAX_NPZ_BYTES = 2 * 1024**3
#: The most arrays one ``.npz`` may hold.
MAX_NPZ_MEMBERS = 10_000
_CHUNK = 1 << 20
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


def read_npz(
    path: str | os.PathLike[str], *, max_bytes: int = MAX_NPZ_BYTES
) -> dict[str, npt.NDArray[np.generic]]:
    """The arrays of an ``.npz`` file by name; a one-line ValueError for anything else.

    Checked before any array data is read: the zip directory (each member's declared size,
    ``max_bytes`` in all) and each ``.npy`` header (numeric dtype, a body the size its shape
    says). Data is then read in bounded chunks; nothing is ever unpickled.
    """
    try:
        size = os.path.getsize(path)
        if size > max_bytes:
            raise ValueError(f"the file is {size} bytes, over the limit of {max_bytes}")
        with zipfile.ZipFile(path) as zf:
            return _npz_members(zf, max_bytes)
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        zlib.error,
        EOFError,
        OSError,
        NotImplementedError,  # an unsupported compression method
        RuntimeError,  # an encrypted member
    ) as exc:
        raise ValueError(f"not a readable .npz (zip) file: {_one_line(exc)}") from None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _npz_members(zf: zipfile.ZipFile, max_bytes: int) -> dict[str, npt.NDArray[np.generic]]:
    infos = zf.infolist()
    if not infos:
        raise ValueError("the .npz holds no arrays")
    if len(infos) > MAX_NPZ_MEMBERS:
        raise ValueError(f"the .npz holds {len(infos)} members, over the limit {MAX_NPZ_MEMBERS}")
    total = sum(info.file_size for info in infos)
    if total > max_bytes:
        raise ValueError(
            f"its members would expand to {total} bytes, over the limit of {max_bytes}"
        )
    arrays: dict[str, npt.NDArray[np.generic]] = {}
    for info in infos:
        if info.is_dir() or not info.filename.endswith(".npy"):
            raise ValueError(f"member {info.filename!r} is not an .npy array")
        name = info.filename[: -len(".npy")]
        if name in arrays:
            raise ValueError(f"member {info.filename!r} appears twice")
        with zf.open(info) as member:
            arrays[name] = _npz_member(member, info)
    return arrays


def _npz_member(member: IO[bytes], info: zipfile.ZipInfo) -> npt.NDArray[np.generic]:
    """One member: header checked against its declared size, then the body in chunks."""
    where = f"member {info.filename!r}"
    try:
        version = np.lib.format.read_magic(member)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(member)
        else:
            raise ValueError(f"unsupported npy version {version}")
    except ValueError as exc:
        raise ValueError(f"{where} is not a readable .npy array: {_one_line(exc)}") from None
    if (
        dtype.kind not in _ALLOWED_KINDS
        or dtype.hasobject
        or dtype.fields is not None
        or dtype.subdtype is not None
    ):
        raise ValueError(f"{where} holds {dtype} values; only numeric arrays are accepted")
    if any(d < 0 for d in shape):
        raise ValueError(f"{where} declares an impossible shape {shape}")
    nbytes = math.prod(shape) * dtype.itemsize
    body = info.file_size - member.tell()
    if nbytes != body:
        raise ValueError(
            f"{where} declares shape {shape} of {dtype} ({nbytes} bytes) but holds {body} bytes"
        )
    flat = np.empty(math.prod(shape), dtype=dtype)
    raw = flat.view(np.uint8)
    done = 0
    while done < nbytes:  # bounded reads; zipfile checks the CRC as the last byte arrives
        chunk = member.read(min(_CHUNK, nbytes - done))
        if not chunk:
            raise ValueError(f"{where} is truncated after {done} of {nbytes} bytes")
        raw[done : done + len(chunk)] = np.frombuffer(chunk, dtype=np.uint8)
        done += len(chunk)
    return flat.reshape(shape, order="F" if fortran else "C")
