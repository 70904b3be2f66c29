"""The state directory: one owner at a time, free space, leftovers of kills.

DESIGN §7: one server per state directory. `StateDirLock` takes an exclusive
`flock` on `<state>/LOCK` for the life of the process (the kernel drops it
when the process dies, kill -9 included, so a stale file never blocks a
restart) and writes the holder (pid, host, start time) into the file, so a
second server can say who holds it.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import time

from evolve.errors import StateDirLockedError, StorageError

logger = logging.getLogger(__name__)

LOCK_FILE = "LOCK"
ORBAX_TMP_MARKER = ".orbax-checkpoint-tmp"
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
DISK_FULL_TEXTS = ("no space left", "disk quota", "file too large")


def write_text_atomically(path: str, text: str) -> None:
    """Writes a small text file so that a reader sees the old contents or the
    new ones, never half (a temporary beside it, then a rename)."""
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(temporary, path)


@dataclasses.dataclass(frozen=True)
class Holder:
    pid: int
    host: str
    started: float

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started)) if self.started else "?"
        return f"pid {self.pid} on host {self.host}, since {when}"


class StateDirLock:
    """An exclusive, process-lifetime lock on a state directory."""

    def __init__(self, state_dir: str):
        self.state_dir = os.path.abspath(state_dir)
        self.path = os.path.join(self.state_dir, LOCK_FILE)
        self._fd: int | None = None

    def acquire(self) -> Holder:
        """Takes the lock or raises StateDirLockedError naming the holder."""
        os.makedirs(self.state_dir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = _read_holder(fd)
            os.close(fd)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StateDirLockedError(self.state_dir, holder.describe() if holder else "another process") from None
            raise
        me = Holder(os.getpid(), socket.gethostname(), time.time())
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(dataclasses.asdict(me)) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return me

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


def _read_holder(fd: int) -> Holder | None:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode("utf-8", "replace") or "null")
        return Holder(int(data["pid"]), str(data["host"]), float(data.get("started", 0.0)))
    except (OSError, ValueError, TypeError, KeyError):
        return None


def remove_interrupted_writes(state_dir: str) -> list[str]:
    """Deletes the temporary directories orbax leaves when a write is killed.

    Only safe while holding the state-directory lock (no write is under way).
    Returns the removed paths.
    """
    removed = []
    for directory, subdirs, _ in os.walk(os.path.abspath(state_dir)):
        for name in list(subdirs):
            if ORBAX_TMP_MARKER in name:
                path = os.path.join(directory, name)
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
                subdirs.remove(name)
        if os.path.basename(directory) == "xla_cache":
            subdirs.clear()
    if removed:
        logger.info("removed %d directories of interrupted checkpoint writes", len(removed))
    return removed


def is_disk_full(error: BaseException) -> bool:
    """Whether an exception (or one it was raised from) says the disk is full."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in DISK_FULL_ERRNOS:
            return True
        if any(text in str(current).lower() for text in DISK_FULL_TEXTS):
            return True
        current = current.__cause__ or current.__context__
    return False


def check_free_space(state_dir: str, min_free_bytes: int) -> None:
    """Refuses new work while the state disk has less than `min_free_bytes` free."""
    if min_free_bytes <= 0:
        return
    try:
        free = shutil.disk_usage(os.path.abspath(state_dir)).free
    except OSError as error:
        raise StorageError(state_dir, f"cannot read the free space of the state disk: {error}") from error
    if free < min_free_bytes:
        raise StorageError(
            state_dir,
            f"the state disk has {free / 2**20:.0f} MiB free, below the {min_free_bytes / 2**20:.0f} MiB "
            "this server keeps in reserve (--min-free-mb); free space or grow the volume",
            disk_full=True,
        )
