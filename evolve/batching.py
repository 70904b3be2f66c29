"""Concurrent predictions of one served model run as one device call.

Triton's dynamic batcher, for threads: a key (a task's served model) has
`instances` slots, device calls that may run at once. Calls that arrive
while every slot of their key is busy queue up in one open batch; when a
slot frees, the batch is closed and runs as a single call, and each caller
gets its own rows back. A call that finds a free slot therefore waits for
nothing. With a window > 0, the first caller of a batch also waits that
long (or until the batch is full) for others to join, trading latency for
larger batches under light load. (Triton's instance count plays the role
of `instances`: on a CPU, calls on several cores at once can beat one
larger call.)

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


@dataclasses.dataclass(eq=False)
class _Key:
    slots: threading.Semaphore
    leaders: int = 0  # leaders running or waiting for a slot


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

    def __init__(self, max_rows: int, window_seconds: float = 0.0, instances: int = 1):
        if max_rows < 1 or window_seconds < 0 or instances < 1:
            raise ValueError(f"max_rows and instances must be positive and window_seconds >= 0, got {max_rows}, "
                             f"{instances}, {window_seconds}")
        self.max_rows = max_rows
        self.window_seconds = window_seconds
        self.instances = instances
        self._lock = threading.Lock()
        self._open: dict[Hashable, _Batch] = {}
        self._keys: dict[Hashable, _Key] = {}
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
            state = self._keys.get(key)
            if state is None:
                state = self._keys[key] = _Key(threading.Semaphore(self.instances))
            if leader:
                state.leaders += 1
        if leader:
            self._lead(key, batch, state, compute)
        else:
            batch.done.wait()
        if batch.error is not None:
            raise batch.error
        assert batch.result is not None
        return batch.result[offset : offset + len(rows)]

    def _lead(self, key: Hashable, batch: _Batch, state: _Key, compute: Callable[[np.ndarray], np.ndarray]) -> None:
        try:
            if self.window_seconds > 0:
                batch.full.wait(self.window_seconds)
            with state.slots:  # while the key's slots are busy, callers keep joining this batch
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
            with self._lock:  # forget an idle key
                state.leaders -= 1
                if not state.leaders and self._keys.get(key) is state:
                    del self._keys[key]
