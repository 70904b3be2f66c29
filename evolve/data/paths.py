"""Resolving user-given paths, optionally confined to a set of data roots."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from evolve.errors import InvalidArgumentError

logger = logging.getLogger(__name__)

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


def unreadable_path(
    field: str, path: str, what: str, reason: str, data_roots: Sequence[str], kind: str = "file"
) -> InvalidArgumentError:
    """The error for a path that cannot be read as `what` ("a .npz archive").

    With data roots the client may only name paths inside them, so the message
    gives the `reason`. Without roots any server path can be named: then a
    missing, unreadable and wrong-type path get one message ("no such `kind`,
    or not readable as `what`"), so that errors do not tell which server paths
    exist; the reason goes to the server log. `path` is shown as the client
    gave it, never resolved.
    """
    if data_roots:
        return InvalidArgumentError(field, f"cannot read {path!r} as {what}: {reason}")
    logger.info("cannot read %r as %s: %s", path, what, reason)
    return InvalidArgumentError(field, f"no such {kind}, or not readable as {what}: {path!r}")
