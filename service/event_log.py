"""The in-memory log of evolution events behind WatchEvolution.

Every event the engine reports gets the next sequence number; the newest
`retention` events are kept for replay. Sequence numbers continue across
restarts from the position saved with each checkpoint (see jobs.py), so a
client that resumes with the last sequence it saw never receives a number
twice.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time

from evolve.events import Event

DEFAULT_RETENTION = 10_000


@dataclasses.dataclass(frozen=True)
class LoggedEvent:
    sequence: int
    time: float  # seconds since the epoch
    operation: str  # "operations/<n>", or "" when none
    event: Event

    @property
    def task(self) -> str:
        return self.event.task


class EventLog:
    """Thread-safe, bounded, append-only; readers block on a condition."""

    def __init__(self, *, start_sequence: int = 0, retention: int = DEFAULT_RETENTION):
        if retention < 1:
            raise ValueError("retention must be at least 1")
        self._events: collections.deque[LoggedEvent] = collections.deque(maxlen=retention)
        self._last = int(start_sequence)
        self._closed = False
        self._condition = threading.Condition()

    @property
    def last_sequence(self) -> int:
        with self._condition:
            return self._last

    @property
    def closed(self) -> bool:
        with self._condition:
            return self._closed

    def append(self, event: Event, operation: str = "") -> LoggedEvent:
        """Records an event under the next sequence number and wakes readers."""
        with self._condition:
            self._last += 1
            logged = LoggedEvent(self._last, time.time(), operation, event)
            self._events.append(logged)
            self._condition.notify_all()
            return logged

    def read(self, sequence: int, task: str = "") -> tuple[list[LoggedEvent], int]:
        """Retained events newer than `sequence`, oldest first, of `task` if given,
        and the sequence to continue from (the newest one examined)."""
        with self._condition:
            return self._after(sequence, task), max(sequence, self._last)

    def _after(self, sequence: int, task: str) -> list[LoggedEvent]:
        if not self._events or self._events[-1].sequence <= sequence:
            return []
        # The deque is sorted by sequence; skip from the newest end.
        newer = []
        for logged in reversed(self._events):
            if logged.sequence <= sequence:
                break
            if not task or logged.task == task:
                newer.append(logged)
        newer.reverse()
        return newer

    def wait_after(self, sequence: int, timeout: float) -> bool:
        """Blocks until an event newer than `sequence` exists, the log closes, or
        the timeout passes; returns whether one exists."""
        with self._condition:
            self._condition.wait_for(lambda: self._last > sequence or self._closed, timeout=timeout)
            return self._last > sequence

    def close(self) -> None:
        """Wakes every reader for good (the server is shutting down)."""
        with self._condition:
            self._closed = True
            self._condition.notify_all()
