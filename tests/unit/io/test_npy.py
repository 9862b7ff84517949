"""npy codec: round trips, and refusal of anything that is not a plain numeric array."""

from __future__ import annotations

import io

import numpy as np
import pytest

from pipeline.io.npy import from_npy, to_npy


@pytest.mark.parametrize("dtype", ["float32", "float64", "int64", "uint8"])
def test_round_trip(dtype: str) -> None:
    arr = (np.arange(12).reshape(3, 4) * 3).astype(dtype)
    out = from_npy(to_npy(arr))
    assert out.dtype == arr.dtype and np.array_equal(out, arr)


def test_fortran_order_comes_back_c_contiguous() -> None:
    buf = io.BytesIO()
    np.save(buf, np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)))
    out = from_npy(buf.getvalue())
    assert out.flags.c_contiguous and out.tolist() == [[0, 1, 2], [3, 4, 5]]


def test_object_and_pickled_payloads_are_refused(tmp_path: object) -> None:
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="not allowed"):
        from_npy(buf.getvalue())
    with pytest.raises(ValueError):
        from_npy(b"\x80\x05\x95\x0b\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94.")  # a pickle
    with pytest.raises(ValueError):
        to_npy(np.array(["x"], dtype=object))


def test_limits_are_checked_from_the_header() -> None:
    data = to_npy(np.zeros((100, 100), dtype=np.float32))
    with pytest.raises(ValueError, match="over the limit"):
        from_npy(data, max_elements=9999)
    with pytest.raises(ValueError, match="over the limit"):
        from_npy(data, max_bytes=1000)


def test_truncated_and_garbage_bytes() -> None:
    data = to_npy(np.zeros(10, dtype=np.float32))
    with pytest.raises(ValueError, match="needs"):
        from_npy(data[:-4])
    with pytest.raises(ValueError):
        from_npy(b"\x93NUMPY garbage")
    with pytest.raises(ValueError):
        from_npy(b"")


SHAPES = [(), (0,), (1,), (1000,), (1, 1000), (3, 4), (2, 3, 5), (1, 0), (70000,)]
DTYPES = ["float32", ">f4", "float64", "float16", "int8", "int64", "<u2", ">i8", "uint8", "bool"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_the_fast_path_writes_and_reads_exactly_what_numpy_does(
    shape: tuple[int, ...], dtype: str
) -> None:
    count = int(np.prod(shape)) if shape else 1
    arr = (np.arange(count) % 7).astype(dtype).reshape(shape)
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    assert to_npy(arr) == buf.getvalue()  # byte for byte, padding included
    out = from_npy(buf.getvalue())
    assert out.dtype == arr.dtype and out.shape == arr.shape and np.array_equal(out, arr)
    assert out.flags.writeable and out.flags.c_contiguous


def test_a_header_the_fast_path_does_not_know_still_reads() -> None:
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    header = "{'shape': (2, 3), 'fortran_order': False, 'descr': '<f4'}"  # keys reordered
    text = header + " " * (64 - (10 + len(header) + 1) % 64) + "\n"
    data = b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text.encode() + arr.tobytes()
    assert np.array_equal(from_npy(data), arr)
    with pytest.raises(ValueError, match="needs"):
        from_npy(data[:-1])
