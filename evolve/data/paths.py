"""Resolving user-given paths, optionally confined to a set of data roots."""

from __future__ import annotations

import os
from typing import Sequence

from evolve.errors import InvalidArgumentError

_ESCAPE_MESSAGE = (
    "path must resolve inside the server's data roots "
    "(no '..' escapes, no absolute paths or symlinks outside them)"
)


def _real_roots(data_roots: Sequence[str]) -> list[str]:
    """The data roots with symlinks resolved."""
    return [os.path.realpath(os.fspath(root)) for root in data_roots]


def is_inside(real_path: str, real_roots: Sequence[str]) -> bool:
    """Whether an already resolved path equals or lies below one of the roots."""
    for root in real_roots:
        if real_path == root or real_path.startswith(root.rstrip(os.sep) + os.sep):
            return True
    return False


def resolve_path(path: object, field: str, data_roots: Sequence[str] = ()) -> str:
    """Returns the real (symlink-free, absolute) path of a user-given path.

    With `data_roots`, a relative path is taken relative to the first root and
    the resolved path must lie inside one of the roots; without roots any path
    is allowed. Raises InvalidArgumentError(field, ...) otherwise.
    """
    if not isinstance(path, str) or not path.strip():
        raise InvalidArgumentError(field, "a non-empty path is required")
    if "\x00" in path:
        raise InvalidArgumentError(field, "path contains a NUL character")
    if not data_roots:
        return os.path.realpath(path)
    real_roots = _real_roots(data_roots)
    candidate = path if os.path.isabs(path) else os.path.join(real_roots[0], path)
    real = os.path.realpath(candidate)
    if not is_inside(real, real_roots):
        raise InvalidArgumentError(field, f"{path!r}: {_ESCAPE_MESSAGE}")
    return real


def check_inside_roots(real_path: str, field: str, data_roots: Sequence[str]) -> None:
    """Raises when a file found inside a source folder resolves outside the roots."""
    if data_roots and not is_inside(os.path.realpath(real_path), _real_roots(data_roots)):
        raise InvalidArgumentError(field, f"{real_path!r}: {_ESCAPE_MESSAGE}")
