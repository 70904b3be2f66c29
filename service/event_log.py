"""The in-memory log of evolution events behind WatchEvolution.

Every event the engine reports gets the next sequence number; the newest
`retention` events are kept for replay. Sequence numbers continue across
restarts from the position saved with each checkpoint (see jobs.py), so a
client that resumes with the last sequence it saw never receives a number
twice.

The log itself is saved with every checkpoint too (DESIGN §8), bounded: the
newest SAVED_PER_TASK events of each task, SAVED_TOTAL in all. An event is
saved as its evolve.events dataclass (`dataclasses.asdict` plus the class
name), the list as zlib-compressed JSON in one base64 string: the manifest is
rewritten on every save, so it stays small (about 75 bytes per event).
Restored events keep their sequence numbers and times, so WatchEvolution
replays a search's history after a restart exactly as it was streamed. The
transient kinds (evolve.events.TRANSIENT_EVENTS: TrainingProgress, one every
few seconds while a search trains) are saved under their own bound, the newest
SAVED_TRANSIENT_PER_TASK per task: a replay after a long search lacks its
older progress reports (their sequence numbers are gaps), never its candidates.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import functools
import json
import logging
import threading
import time
import typing
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from evolve.events import TRANSIENT_EVENTS, Event

logger = logging.getLogger(__name__)

DEFAULT_RETENTION = 10_000
# Saved with each checkpoint: a default search reports 25-40 events, so a
# task keeps its last few searches and the manifest grows by at most ~150 KB.
SAVED_PER_TASK = 200
SAVED_TOTAL = 2_000
SAVED_FORMAT = 1
# Transient kinds (TrainingProgress) are saved under their own bound, so a long
# search's progress reports never push its candidates out of the history.
SAVED_TRANSIENT_PER_TASK = 20
SAVED_TRANSIENT_TOTAL = 200


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
        self._encode_lock = threading.Lock()
        self._rows: dict[int, str] = {}  # sequence -> its saved JSON row, made once

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

    def wait_after(self, sequence: int, timeout: float, keep_waiting: Callable[[], bool] = lambda: True) -> bool:
        """Blocks until an event newer than `sequence` exists, the log closes,
        the timeout passes or `keep_waiting` turns false (checked whenever
        `wake` is called); returns whether one exists."""
        with self._condition:
            self._condition.wait_for(
                lambda: self._last > sequence or self._closed or not keep_waiting(), timeout=timeout
            )
            return self._last > sequence

    def wake(self) -> None:
        """Makes every waiting reader check its `keep_waiting` now (a client left)."""
        with self._condition:
            self._condition.notify_all()

    def close(self) -> None:
        """Wakes every reader for good (the server is shutting down)."""
        with self._condition:
            self._closed = True
            self._condition.notify_all()

    # ---- persistence -----------------------------------------------------------

    def saved_state(self, per_task: int = SAVED_PER_TASK, total: int = SAVED_TOTAL) -> tuple[int, str]:
        """(the last sequence number, the bounded events as one string), read
        together, so that a checkpoint never holds an event numbered after the
        position it saves. Each event is turned into JSON once, outside the
        log's lock: appends (under the engine's lock) never wait on a save."""
        with self._condition:
            last = self._last
            events = list(self._events)
            kept = newest_per_task([e for e in events if not is_transient(e)], per_task, total)
            progress = newest_per_task([e for e in events if is_transient(e)], SAVED_TRANSIENT_PER_TASK,
                                       SAVED_TRANSIENT_TOTAL)
            kept = sorted(kept + progress, key=lambda e: e.sequence)
        with self._encode_lock:
            rows = {e.sequence: self._rows.get(e.sequence) or event_row(e) for e in kept}
            self._rows = rows  # forget what is no longer saved
            return last, compress_rows(list(rows.values()))

    def restore(self, data: str | None) -> int:
        """Adds saved events (oldest first) in front of the live ones; returns
        how many. Unreadable data or unknown event kinds are logged and skipped:
        losing history must never stop a restart."""
        if not data:
            return 0
        try:
            restored = decode_events(data)
        except (ValueError, TypeError, KeyError, AttributeError, zlib.error) as error:
            logger.warning("saved evolution events are unreadable (%s); history starts empty", error)
            return 0
        with self._condition:
            live = list(self._events)
            first_live = live[0].sequence if live else None
            older = [e for e in restored if first_live is None or e.sequence < first_live]
            self._events.clear()
            self._events.extend(older + live)  # the deque keeps the newest `retention`
            if older:
                self._last = max(self._last, older[-1].sequence)
            self._condition.notify_all()
        return len(older)


def is_transient(logged: LoggedEvent) -> bool:
    """Progress events have their own, small saved bound: a search reports one
    every few seconds, and counted with the rest they would push its history
    out of SAVED_PER_TASK."""
    return isinstance(logged.event, TRANSIENT_EVENTS)


def newest_per_task(events: Sequence[LoggedEvent], per_task: int, total: int) -> list[LoggedEvent]:
    """The newest `per_task` events of each task, the newest `total` in all,
    oldest first (events must come in increasing sequence order)."""
    counts: collections.Counter[str] = collections.Counter()
    kept: list[LoggedEvent] = []
    for logged in reversed(events):
        if len(kept) >= total:
            break
        if counts[logged.task] < per_task:
            counts[logged.task] += 1
            kept.append(logged)
    kept.reverse()
    return kept


# ---- the saved form: evolve.events dataclasses as JSON ----------------------------

_EVENT_TYPES: dict[str, type] = {cls.__name__: cls for cls in typing.get_args(Event)}


def event_to_dict(event: Event) -> dict[str, Any]:
    """An event as a JSON-ready dict: its fields and its class name under "type"."""
    return {"type": type(event).__name__, **dataclasses.asdict(event)}


def event_from_dict(data: Mapping[str, Any]) -> Event:
    """The inverse of event_to_dict. Fields the class does not know are dropped
    and missing ones take their defaults, so an older or newer save still reads."""
    data = dict(data)
    cls = _EVENT_TYPES.get(data.pop("type", ""))
    if cls is None:
        raise KeyError("unknown event type")
    return _build(cls, data)


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {name: hint for name, hint in typing.get_type_hints(cls).items() if name in names}


def _build(cls: type, data: Mapping[str, Any]) -> Any:
    types = _field_types(cls)
    return cls(**{name: _value(types[name], value) for name, value in data.items() if name in types})


def _value(hint: Any, value: Any) -> Any:
    """A JSON value as the field's type: nested dataclasses and tuples rebuilt."""
    if dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
        return _build(hint, value)
    if typing.get_origin(hint) is tuple and isinstance(value, list):
        item = typing.get_args(hint)[0] if typing.get_args(hint) else Any
        return tuple(_value(item, v) for v in value)
    return value


def event_row(logged: LoggedEvent) -> str:
    """One saved event: the JSON of [sequence, time, operation, event dict]."""
    row = [logged.sequence, logged.time, logged.operation, event_to_dict(logged.event)]
    return json.dumps(row, separators=(",", ":"))


def compress_rows(rows: list[str]) -> str:
    """base64(zlib(JSON)) of the saved form, rows oldest first."""
    text = f'{{"format":{SAVED_FORMAT},"events":[{",".join(rows)}]}}'
    return base64.b64encode(zlib.compress(text.encode("utf-8"), 6)).decode("ascii")


def encode_events(events: Iterable[LoggedEvent]) -> str:
    """The saved form of these events (increasing sequence order)."""
    return compress_rows([event_row(e) for e in events])


def decode_events(data: str) -> list[LoggedEvent]:
    """The events of encode_events, in increasing sequence order; rows of an
    unknown event type are skipped (logged)."""
    saved = json.loads(zlib.decompress(base64.b64decode(data, validate=True)).decode("utf-8"))
    if saved.get("format") != SAVED_FORMAT:
        raise ValueError(f"unknown saved event format {saved.get('format')!r}")
    events, skipped = [], 0
    for row in saved["events"]:
        try:
            sequence, at, operation, event = row
            events.append(LoggedEvent(int(sequence), float(at), str(operation), event_from_dict(event)))
        except (KeyError, TypeError, ValueError) as error:
            skipped += 1
            logger.debug("saved event %r skipped: %s", row[:1] if isinstance(row, list) else row, error)
    if skipped:
        logger.warning("%d saved evolution event(s) skipped (unknown kind or damaged)", skipped)
    events.sort(key=lambda e: e.sequence)
    return events
