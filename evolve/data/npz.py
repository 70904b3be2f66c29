"""The local `.npz` task format (DESIGN.md §3, "Task sources").

Arrays: `train_images`, `train_labels`, and optionally `validation_images` /
`validation_labels` and `test_images` / `test_labels`. Images N x H x W [x C]
with C = 1 or 3, uint8 0..255 or float in [0, 1]; labels integers 0..K-1.

The archive is checked before anything is decompressed: the sizes the zip
directory and the .npy headers declare must agree and stay within
DataLimits.max_decompressed_bytes (a zip bomb is refused by its headers), and
arrays must be numeric (no pickles). Then each array is read in chunks.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import stat
import zipfile
import zlib
from collections.abc import Sequence

import numpy as np

from evolve.data import arrays
from evolve.data import limits as limits_module
from evolve.data.dataset import ImageSet, TaskData
from evolve.data.limits import DEFAULT_LIMITS, DataLimits
from evolve.data.paths import resolve_path, unreadable_path
from evolve.errors import InvalidArgumentError
from evolve.types import NpzSource

logger = logging.getLogger(__name__)

FIELD = "source.path"
WHAT = "a .npz archive"
SPLITS = ("train", "validation", "test")
ARRAY_NAMES = tuple(f"{split}_{kind}" for split in SPLITS for kind in ("images", "labels"))
_NPY_MAGIC = b"\x93NUMPY"
# bool, signed and unsigned integers, floats (arrays.py checks what each array accepts).
_NUMERIC_KINDS = "biuf"
# What a damaged archive member raises while it is read.
_READ_ERRORS = (
    OSError, ValueError, EOFError, RuntimeError, NotImplementedError, KeyError, zipfile.BadZipFile, zlib.error,
)


@dataclasses.dataclass(frozen=True)
class NpyHeader:
    """What one member's .npy header declares, and the member's size in the zip directory."""

    shape: tuple[int, ...]
    dtype: np.dtype
    header_bytes: int
    member_bytes: int

    @property
    def data_bytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def write_npz_task(
    path: str | os.PathLike,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    validation_images: np.ndarray | None = None,
    validation_labels: np.ndarray | None = None,
    test_images: np.ndarray | None = None,
    test_labels: np.ndarray | None = None,
    *,
    compress: bool = True,
) -> str:
    """Writes a task in the npz format and returns the path written.

    Optional splits are written only when both their images and labels are
    given. Parent folders are created. Arrays are written as given (no checks).
    """
    named = {"train_images": train_images, "train_labels": train_labels}
    for split, images, labels in (
        ("validation", validation_images, validation_labels),
        ("test", test_images, test_labels),
    ):
        if (images is None) != (labels is None):
            raise ValueError(f"{split}: give both images and labels, or neither")
        if images is not None:
            named[f"{split}_images"] = images
            named[f"{split}_labels"] = labels
    path = os.fspath(path)
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:  # a file object keeps numpy from appending ".npz"
        (np.savez_compressed if compress else np.savez)(f, **{k: np.asarray(v) for k, v in named.items()})
    return path


def _os_reason(error: OSError) -> str:
    return error.strerror or type(error).__name__


def _starts_like_npy(real_path: str) -> bool:
    try:
        with open(real_path, "rb") as f:
            return f.read(len(_NPY_MAGIC)) == _NPY_MAGIC
    except OSError:
        return False


def _open_archive(shown: str, real_path: str, data_roots: Sequence[str]) -> zipfile.ZipFile:
    """Opens the zip archive (reads its central directory only).

    Without data roots, a missing, unreadable, non-regular or non-zip path
    gets one message (see paths.unreadable_path).
    """
    try:
        mode = os.stat(real_path).st_mode
    except OSError as error:
        raise unreadable_path(FIELD, shown, WHAT, _os_reason(error), data_roots) from None
    if not stat.S_ISREG(mode):  # a directory, a FIFO (would block), a device
        raise unreadable_path(FIELD, shown, WHAT, "not a regular file", data_roots)
    try:
        return zipfile.ZipFile(real_path)
    except OSError as error:
        raise unreadable_path(FIELD, shown, WHAT, _os_reason(error), data_roots) from None
    except (zipfile.BadZipFile, ValueError, EOFError, RuntimeError, NotImplementedError) as error:
        hint = " (a single .npy array?)" if _starts_like_npy(real_path) else ""
        raise unreadable_path(FIELD, shown, WHAT, f"not a zip archive{hint}: {error}", data_roots) from None


def _members(archive: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    """The archive members of the arrays the format knows, by array name.

    np.savez names a member "<array>.npy"; a bare "<array>" is accepted too.
    Other members are never read.
    """
    by_name = {info.filename: info for info in archive.infolist()}  # the last of duplicates, as getinfo
    found = {}
    for name in ARRAY_NAMES:
        info = by_name.get(name + ".npy") or by_name.get(name)
        if info is not None:
            found[name] = info
    ignored = len(by_name) - len(found)
    if ignored:
        logger.debug("npz: %d member(s) that are not task arrays ignored", ignored)
    return found


def _check_dtype(name: str, dtype: np.dtype) -> None:
    """Numeric dtypes only: no objects (pickles), strings or records."""
    if dtype.hasobject:
        raise InvalidArgumentError(FIELD, f"array {name!r} holds Python objects (dtype object): pickles are not read")
    if dtype.kind not in _NUMERIC_KINDS:
        raise InvalidArgumentError(
            FIELD, f"array {name!r} has dtype {dtype}, which is not numeric: images must be uint8 or float, "
            "labels integers",
        )


def _read_header(archive: zipfile.ZipFile, name: str, info: zipfile.ZipInfo) -> NpyHeader:
    """The .npy header of one member, read without reading its data."""
    try:
        with archive.open(info) as stream:
            version = np.lib.format.read_magic(stream)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
            else:
                raise InvalidArgumentError(FIELD, f"array {name!r}: unsupported .npy format version {version}")
            header_bytes = stream.tell()
    except InvalidArgumentError:
        raise
    except _READ_ERRORS as error:
        raise InvalidArgumentError(FIELD, f"cannot read the header of array {name!r}: {error}") from None
    _check_dtype(name, dtype)
    if any(d < 0 for d in shape):
        raise InvalidArgumentError(FIELD, f"array {name!r} has a negative dimension in its shape {shape}")
    return NpyHeader(tuple(shape), dtype, header_bytes, info.file_size)


def _held_bytes(name: str, header: NpyHeader) -> int:
    """Bytes an array takes once loaded: its data, or as uint8 RGB images when larger."""
    if name.endswith("_images") and len(header.shape) in (3, 4):
        return max(header.data_bytes, math.prod(header.shape[:3]) * limits_module.RGB_BYTES_PER_PIXEL)
    return header.data_bytes


def _check_declared_sizes(headers: dict[str, NpyHeader], limits: DataLimits) -> None:
    """The declared sizes within the limit, and each agreeing with the zip's member size."""
    total = sum(_held_bytes(name, header) for name, header in headers.items())
    limits_module.check_decoded_size(total, limits, FIELD, "the archive, with its images as uint8 RGB,")
    for name, header in headers.items():
        if header.header_bytes + header.data_bytes != header.member_bytes:
            raise InvalidArgumentError(
                FIELD,
                f"array {name!r} is damaged: its header declares {header.shape} {header.dtype} "
                f"({limits_module.format_bytes(header.data_bytes)}), but the archive member holds "
                f"{limits_module.format_bytes(header.member_bytes)}",
            )


def _read_array(archive: zipfile.ZipFile, name: str, info: zipfile.ZipInfo) -> np.ndarray:
    """One member's array, read in chunks from the zip stream (its size is checked already)."""
    try:
        with archive.open(info) as stream:
            return np.lib.format.read_array(stream, allow_pickle=False)
    except _READ_ERRORS as error:
        raise InvalidArgumentError(FIELD, f"cannot read array {name!r}: {error}") from None


def _read_arrays(
    shown: str, real_path: str, data_roots: Sequence[str], limits: DataLimits
) -> dict[str, np.ndarray]:
    """Reads the task arrays of the archive, refusing before decompressing
    anything when the zip directory or the .npy headers declare more than the
    limit (a zip bomb) or disagree."""
    with _open_archive(shown, real_path, data_roots) as archive:
        members = _members(archive)
        member_total = sum(info.file_size for info in members.values())
        limits_module.check_decoded_size(member_total, limits, FIELD, "the archive")
        headers = {name: _read_header(archive, name, info) for name, info in members.items()}
        _check_declared_sizes(headers, limits)
        return {name: _read_array(archive, name, info) for name, info in members.items()}


def check_npz(source: NpzSource, data_roots: Sequence[str], limits: DataLimits = DEFAULT_LIMITS) -> None:
    """The cheap part of loading, for a request to refuse bad input at once:
    the path, the zip directory and the .npy headers; no array is read."""
    real_path = resolve_path(source.path, FIELD, data_roots)
    with _open_archive(source.path, real_path, data_roots) as archive:
        members = _members(archive)
        limits_module.check_decoded_size(sum(i.file_size for i in members.values()), limits, FIELD, "the archive")
        headers = {name: _read_header(archive, name, info) for name, info in members.items()}
        _check_declared_sizes(headers, limits)
    for required in ("train_images", "train_labels"):
        if required not in headers:
            raise InvalidArgumentError(FIELD, f"array {required!r} is missing")


def _split_from(named: dict[str, np.ndarray], split: str) -> ImageSet | None:
    """One split's ImageSet, or None when the archive lacks it."""
    images, labels = named.get(f"{split}_images"), named.get(f"{split}_labels")
    if images is None and labels is None:
        return None
    if images is None or labels is None:
        missing = f"{split}_images" if images is None else f"{split}_labels"
        raise InvalidArgumentError(FIELD, f"array {missing!r} is missing")
    image_set = arrays.make_image_set(images, labels, FIELD, split)
    if not len(image_set):
        raise InvalidArgumentError(FIELD, f"the {split} set is empty")
    return image_set


def load_npz(
    source: NpzSource, data_roots: Sequence[str], max_train_examples: int | None,
    validation_split: arrays.ValidationSplit = arrays.ValidationSplit(),
    limits: DataLimits = DEFAULT_LIMITS,
) -> TaskData:
    """Loads an NpzSource into TaskData (see the module docstring)."""
    real_path = resolve_path(source.path, FIELD, data_roots)
    named = _read_arrays(source.path, real_path, data_roots, limits)
    for required in ("train_images", "train_labels"):
        if required not in named:
            raise InvalidArgumentError(FIELD, f"array {required!r} is missing")
    train = _split_from(named, "train")
    assert train is not None
    validation = _split_from(named, "validation")
    if validation is None:
        train, validation = arrays.split_off_validation(train, FIELD, validation_split)
    test = _split_from(named, "test")
    if test is None:
        test = validation
    num_classes = arrays.num_classes_of((train, validation, test), FIELD)
    train = arrays.subsample(train, max_train_examples)
    logger.info(
        "npz %s: %d train / %d validation / %d test, %d classes",
        real_path, len(train), len(validation), len(test), num_classes,
    )
    return TaskData(train, validation, test, num_classes)
