"""Real decompression bombs for tests, made in milliseconds with bounded memory.

`write_zero_npz` writes a valid zip64 archive (ZIP_DEFLATED members, correct
CRC-32s and sizes) whose members are .npy arrays of zeros of any declared
size: a few MB on disk for several GiB of arrays. Deflating gigabytes of
zeros would take seconds per GiB, so one chunk of zeros is deflated once,
ending in a full flush (byte-aligned, no references back), and repeated;
the CRC-32 of the zero run is computed algebraically (as zlib's
crc32_combine does). numpy and zipfile read the result like any npz (see
test_data_limits.py, which checks a small one against np.load).
"""

from __future__ import annotations

import io
import math
import struct
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

_CHUNK = 16 << 20  # zero bytes per repeated deflate block
_CRC_POLY = 0xEDB88320  # CRC-32, reflected
_ZIP64_MARK = 0xFFFFFFFF
_DOS_DATE = 0x21  # 1980-01-01
_VERSION = 45  # zip64


def npy_header(shape: tuple[int, ...], dtype: str | np.dtype) -> bytes:
    """The .npy (format 2.0) header of an array of `shape` and `dtype`."""
    buffer = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)}
    np.lib.format.write_array_header_2_0(buffer, header)
    return buffer.getvalue()


def _multmodp(a: int, b: int) -> int:
    """a * b modulo the CRC-32 polynomial (reflected bit order)."""
    mask, product = 1 << 31, 0
    while True:
        if a & mask:
            product ^= b
            if not a & (mask - 1):
                return product
        mask >>= 1
        b = (b >> 1) ^ _CRC_POLY if b & 1 else b >> 1


def _x_to_8n(count: int) -> int:
    """x^(8 * count) modulo the polynomial: the operator that appends `count` zero bytes."""
    result, square = 1 << 31, 1 << 30  # 1, and x
    for _ in range(3):
        square = _multmodp(square, square)  # x^8: one byte
    while count:
        if count & 1:
            result = _multmodp(square, result)
        count >>= 1
        square = _multmodp(square, square)
    return result


def crc32_zero_extended(crc: int, count: int) -> int:
    """zlib.crc32(data + bytes(count)) from crc = zlib.crc32(data), without the zeros."""
    return _multmodp(_x_to_8n(count), crc ^ 0xFFFFFFFF) ^ 0xFFFFFFFF


def _deflated(prefix: bytes, zeros: int) -> Iterator[bytes]:
    """A raw deflate stream of prefix + `zeros` zero bytes."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    yield compressor.compress(prefix) + compressor.flush(zlib.Z_FULL_FLUSH)
    full, rest = divmod(zeros, _CHUNK)
    if full:
        block = compressor.compress(bytes(_CHUNK)) + compressor.flush(zlib.Z_FULL_FLUSH)
        for _ in range(full):
            yield block
    yield compressor.compress(bytes(rest)) + compressor.flush(zlib.Z_FINISH)


def _local_header(name: bytes, crc: int, size: int, compressed: int) -> bytes:
    extra = struct.pack("<HHQQ", 1, 16, size, compressed)
    return struct.pack(
        "<4sHHHHHIIIHH", b"PK\x03\x04", _VERSION, 0, zipfile.ZIP_DEFLATED, 0, _DOS_DATE, crc,
        _ZIP64_MARK, _ZIP64_MARK, len(name), len(extra),
    ) + name + extra


def _central_header(name: bytes, crc: int, size: int, compressed: int, offset: int) -> bytes:
    extra = struct.pack("<HHQQ", 1, 16, size, compressed)
    return struct.pack(
        "<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", _VERSION, _VERSION, 0, zipfile.ZIP_DEFLATED, 0, _DOS_DATE, crc,
        _ZIP64_MARK, _ZIP64_MARK, len(name), len(extra), 0, 0, 0, 0, offset,
    ) + name + extra


def write_zero_npz(path: str | Path, arrays: dict[str, tuple[tuple[int, ...], str]]) -> Path:
    """Writes an npz whose arrays ({name: (shape, dtype)}) are all zeros; returns the path.

    Members are named "<name>.npy", as np.savez names them.
    """
    path = Path(path)
    central = []
    with open(path, "wb") as out:
        for name, (shape, dtype) in arrays.items():
            prefix = npy_header(shape, dtype)
            zeros = math.prod(shape) * np.dtype(dtype).itemsize
            body = b"".join(_deflated(prefix, zeros))  # a few MB even for GiBs of zeros
            crc = crc32_zero_extended(zlib.crc32(prefix), zeros)
            member = f"{name}.npy".encode()
            offset = out.tell()
            out.write(_local_header(member, crc, len(prefix) + zeros, len(body)))
            out.write(body)
            central.append(_central_header(member, crc, len(prefix) + zeros, len(body), offset))
        directory_offset = out.tell()
        directory = b"".join(central)
        out.write(directory)
        out.write(struct.pack(
            "<4sHHHHIIH", b"PK\x05\x06", 0, 0, len(central), len(central), len(directory), directory_offset, 0,
        ))
    return path


def write_lying_npz(path: str | Path, name: str, shape: tuple[int, ...], dtype: str = "uint8") -> Path:
    """An npz whose member `name` has a header declaring `shape` but only a few bytes of data."""
    path = Path(path)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(f"{name}.npy", npy_header(shape, dtype) + bytes(64))
    return path
