"""Concurrent predictions of one served model run as one device call.

Triton's dynamic batcher, for threads: calls that share a key (a task's
served model) and arrive while that key's previous call is still running
queue up in one open batch; when the running call returns, the batch is
closed and runs as a single call, and each caller gets its own rows back.
A lone call therefore waits for nothing. With a window > 0, the first
caller of a batch also waits that long (or until the batch is full) for
others to join, trading latency for larger batches under light load.

There is no thread of its own: the first caller of each batch (its leader)
runs it, so an idle batcher costs nothing.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Callable, Hashable

import numpy as np


@dataclasses.dataclass(eq=False)
class _Batch:
    parts: list[np.ndarray]
    rows: int
    full: threading.Event = dataclasses.field(default_factory=threading.Event)
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    result: np.ndarray | None = None
    error: BaseException | None = None


@dataclasses.dataclass(frozen=True)
class BatchStats:
    calls: int  # compute calls run
    requests: int  # callers served by them


class MicroBatcher:
    """Joins concurrent `run(key, rows, compute)` calls of one key into one `compute`.

    `compute` gets the callers' rows concatenated (at most `max_rows`, a
    caller's rows never split) and returns one output row per input row.
    An exception in `compute` is raised to every caller of that batch.
    """

    def __init__(self, max_rows: int, window_seconds: float = 0.0):
        if max_rows < 1 or window_seconds < 0:
            raise ValueError(f"max_rows must be positive and window_seconds >= 0, got {max_rows}, {window_seconds}")
        self.max_rows = max_rows
        self.window_seconds = window_seconds
        self._lock = threading.Lock()
        self._open: dict[Hashable, _Batch] = {}
        self._running: dict[Hashable, threading.Lock] = {}
        self._calls = 0
        self._requests = 0

    def stats(self) -> BatchStats:
        with self._lock:
            return BatchStats(self._calls, self._requests)

    def run(self, key: Hashable, rows: np.ndarray, compute: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        if len(rows) > self.max_rows:
            raise ValueError(f"{len(rows)} rows exceed the batch bound {self.max_rows}")
        with self._lock:
            batch = self._open.get(key)
            if batch is not None and batch.rows + len(rows) <= self.max_rows:
                offset, leader = batch.rows, False
                batch.parts.append(rows)
                batch.rows += len(rows)
            else:  # none open, or this caller does not fit: a new batch (a full one is closing)
                batch, offset, leader = _Batch([rows], len(rows)), 0, True
                self._open[key] = batch
            if batch.rows >= self.max_rows:
                batch.full.set()
            running = self._running.setdefault(key, threading.Lock())
        if leader:
            self._lead(key, batch, running, compute)
        else:
            batch.done.wait()
        if batch.error is not None:
            raise batch.error
        assert batch.result is not None
        return batch.result[offset : offset + len(rows)]

    def _lead(self, key: Hashable, batch: _Batch, running: threading.Lock,
              compute: Callable[[np.ndarray], np.ndarray]) -> None:
        try:
            if self.window_seconds > 0:
                batch.full.wait(self.window_seconds)
            with running:  # the key's previous batch runs meanwhile; callers keep joining this one
                with self._lock:
                    if self._open.get(key) is batch:
                        del self._open[key]
                    parts = list(batch.parts)
                    self._calls += 1
                    self._requests += len(parts)
                inputs = parts[0] if len(parts) == 1 else np.concatenate(parts)
                batch.result = compute(inputs)
        except BaseException as error:  # noqa: BLE001 (handed to every caller of the batch)
            batch.error = error
        finally:
            batch.done.set()
            with self._lock:  # forget an idle key (a waiting leader's batch is still open)
                if key not in self._open and not running.locked():
                    self._running.pop(key, None)
