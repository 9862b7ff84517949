"""Reading ``.npz`` files for ``kvpipe publish --from`` (issue 10, case 8).

Sizes come from the zip directory and the ``.npy`` headers and are checked before any array
data is read; only numeric arrays; nothing is ever unpickled. The hostile files built here are
also fed to the real CLI in tests/integration/test_publish.py.
"""

from __future__ import annotations

import io
import pathlib
import tracemalloc
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.io.npy import read_npz

MiB = 1024 * 1024


class Canary:
    """Unpickling this touches a file: proof, if the file appears, that something unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (pathlib.Path.touch, (self.path,))


def npz_bytes(**arrays: Any) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def member(name: str, header: dict[str, Any], body: bytes) -> bytes:
    """A one-member zip whose ``.npy`` header says whatever ``header`` says."""
    npy = io.BytesIO()
    np.lib.format.write_array_header_1_0(npy, header)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(name, npy.getvalue() + body)
    return buf.getvalue()


def write_bomb(path: Path, expanded: int, chunk: int = 4 * MiB) -> None:
    """A DEFLATE member ``w0.npy`` of ``expanded`` zero bytes, written in small chunks."""
    with (
        zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf,
        zf.open("w0.npy", "w", force_zip64=True) as out,
    ):
        header = {"descr": "|u1", "fortran_order": False, "shape": (expanded,)}
        np.lib.format.write_array_header_1_0(out, header)
        zeros = bytes(chunk)
        left = expanded
        while left > 0:
            out.write(zeros[: min(chunk, left)])
            left -= chunk


def hostile(case: str, path: Path) -> str:
    """Write the hostile file ``case`` at ``path``; return a fragment its refusal must name."""
    valid = npz_bytes(w0=np.ones((4, 8), np.float32), b0=np.zeros(8, np.float32))
    if case == "empty":
        path.write_bytes(b"")
        return "not a zip file"
    if case == "truncated":
        path.write_bytes(valid[: len(valid) // 2])
        return "not a zip file"
    if case == "corrupt":
        data = bytearray(valid)
        at = data.index(b"\x00\x00\x80?")  # inside w0's float32 ones
        data[at + 2 : at + 4] = b"\x00\x00"
        path.write_bytes(bytes(data))
        return "CRC"
    if case == "string_dtype":
        path.write_bytes(npz_bytes(w0=np.array(["a", "bc"])))
        return "<U2"
    if case == "huge_shape":
        header = {"descr": "<f4", "fortran_order": False, "shape": (10**11, 64)}
        path.write_bytes(member("w0.npy", header, bytes(16)))
        return "(100000000000, 64)"
    if case == "pickled_object":
        canary = path.with_suffix(".unpickled")
        path.write_bytes(npz_bytes(w0=np.array([Canary(canary), 1], dtype=object)))
        return "object"
    raise AssertionError(case)


CASES = ["empty", "truncated", "corrupt", "string_dtype", "huge_shape", "pickled_object"]


@pytest.mark.parametrize("case", CASES)
def test_hostile_files_are_one_line_value_errors(case: str, tmp_path: Path) -> None:
    path = tmp_path / f"{case}.npz"
    fragment = hostile(case, path)
    with pytest.raises(ValueError) as caught:
        read_npz(path)
    message = str(caught.value)
    assert fragment in message and "\n" not in message and len(message) < 400, message
    assert not path.with_suffix(".unpickled").exists()  # nothing was unpickled


def test_a_zip_bomb_is_refused_from_its_directory_before_any_data_is_read(
    tmp_path: Path,
) -> None:
    path = tmp_path / "bomb.npz"
    write_bomb(path, 300 * MiB)
    assert path.stat().st_size < 2 * MiB  # 300 MiB of zeros, compressed
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="over the limit of 67108864"):
            read_npz(path, max_bytes=64 * MiB)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 * MiB, peak
    # Under a bound it fits, the same file reads in full.
    arrays = read_npz(path, max_bytes=400 * MiB)
    assert arrays["w0"].shape == (300 * MiB,) and not arrays["w0"].any()


def test_a_member_bigger_than_its_header_says_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "long.npz"
    header = {"descr": "<f4", "fortran_order": False, "shape": (2, 2)}
    path.write_bytes(member("w0.npy", header, bytes(16 + 4)))
    with pytest.raises(ValueError, match="16 bytes"):
        read_npz(path)
    path.write_bytes(member("notes.txt", header, bytes(16)))
    with pytest.raises(ValueError, match=r"not an \.npy array"):
        read_npz(path)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w"):
        pass
    path.write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="no arrays"):
        read_npz(path)


def test_numeric_arrays_read_exactly_like_numpy(tmp_path: Path) -> None:
    arrays = {
        "w0": np.arange(12, dtype=np.float32).reshape(3, 4),
        "f": np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3)),
        "be": np.arange(5, dtype=">i4"),
        "flags": np.array([True, False]),
        "scalar": np.array(3.5, dtype=np.float16),
        "empty": np.zeros((0, 4), np.float32),
    }
    for save in (np.savez, np.savez_compressed):
        path = tmp_path / f"{save.__name__}.npz"
        save(path, **arrays)  # type: ignore[operator]
        got = read_npz(path)
        assert set(got) == set(arrays)
        for name, want in arrays.items():
            assert got[name].dtype == want.dtype and got[name].shape == want.shape, name
            assert np.array_equal(got[name], want), name
