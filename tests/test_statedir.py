"""The state directory: the exclusive lock, the free-space reserve, disk-full
detection and the cleanup of interrupted orbax writes."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from evolve import statedir
from evolve.errors import StateDirLockedError, StorageError


def test_the_lock_is_exclusive_names_its_holder_and_is_freed(tmp_path):
    first = statedir.StateDirLock(str(tmp_path))
    holder = first.acquire()
    assert holder.pid == os.getpid()
    with pytest.raises(StateDirLockedError, match=f"pid {os.getpid()} on host"):
        statedir.StateDirLock(str(tmp_path)).acquire()
    first.release()
    second = statedir.StateDirLock(str(tmp_path))
    second.acquire()
    assert second.held
    second.release()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    code = (
        "import os, sys; from evolve.statedir import StateDirLock; "
        f"StateDirLock({str(tmp_path)!r}).acquire(); os.kill(os.getpid(), 9)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == -9
    assert "pid" in (tmp_path / statedir.LOCK_FILE).read_text()  # the file stays ...
    lock = statedir.StateDirLock(str(tmp_path))
    lock.acquire()  # ... but the kernel dropped the lock with the process
    lock.release()


def test_disk_full_is_recognised_through_wrapped_errors():
    assert statedir.is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    try:
        try:
            raise OSError(errno.EDQUOT, "quota")
        except OSError as inner:
            raise ValueError("tensorstore failed") from inner
    except ValueError as outer:
        assert statedir.is_disk_full(outer)
    assert statedir.is_disk_full(ValueError("Failed to write 75 bytes to file 11: File too large"))
    assert not statedir.is_disk_full(OSError(errno.EACCES, "Permission denied"))


def test_the_free_space_reserve_refuses_before_writing(tmp_path):
    statedir.check_free_space(str(tmp_path), 1)
    statedir.check_free_space(str(tmp_path), 0)
    with pytest.raises(StorageError, match="MiB free") as caught:
        statedir.check_free_space(str(tmp_path), 1 << 62)
    assert caught.value.disk_full and str(tmp_path) in str(caught.value)


def test_interrupted_orbax_writes_are_removed(tmp_path):
    leftovers = [
        tmp_path / "manifest" / "7.orbax-checkpoint-tmp-1733000000",
        tmp_path / "components" / "c000042.orbax-checkpoint-tmp-1733000001",
    ]
    kept = tmp_path / "components" / "c000041"
    for directory in (*leftovers, kept):
        directory.mkdir(parents=True)
        (directory / "data").write_bytes(b"x")
    removed = statedir.remove_interrupted_writes(str(tmp_path))
    assert sorted(removed) == sorted(str(p) for p in leftovers)
    assert kept.exists() and not any(p.exists() for p in leftovers)
