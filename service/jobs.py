"""Long-running operations: a bounded queue and ONE worker thread running
searches off the request threads (DESIGN §6, §7).

An operation is QUEUED, then RUNNING, then SUCCEEDED, FAILED or CANCELLED.
Operations are saved with every engine checkpoint (`engine.extra_state`), and
explicitly right after a submit is accepted and after each operation ends, so
a crash loses no accepted request. A finished operation is checkpointed as
finished BEFORE clients can see it done, so `done` never reverts after a
crash. On restart, QUEUED and RUNNING operations are queued again (an
interrupted search restarts from the last complete state), except an
extension whose task the checkpoint already holds as READY: its search
finished and was checkpointed just before the crash, so it is SUCCEEDED.
Finished ones stay listed until DeleteOperation removes them (durably).

Lock order: the engine calls our event callback while holding its own lock,
so this module never calls into the engine while holding `_condition`.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import logging
import sys
import threading
import time
from typing import Any, Callable, Mapping, Sequence

from google.rpc import code_pb2, status_pb2

from evolve import events as domain_events
from evolve.errors import (
    CancelledError,
    EvolveError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
)
from evolve.search.budget import EXTENSION, GENERALIZATION, SearchPlan
from evolve.types import TaskSpec
from service import converters
from service.errors import UnavailableError, status_of
from service.event_log import EventLog

logger = logging.getLogger(__name__)


QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"
FINAL_STATES = frozenset({SUCCEEDED, FAILED, CANCELLED})
OPERATION_PREFIX = "operations/"

MAX_FINISHED_OPERATIONS = 1000  # finished operations kept for Get / List
# After an unclean stop, events after the last checkpoint were numbered but not
# saved; skip this many numbers so a resuming client never sees one twice.
UNCLEAN_SEQUENCE_GAP = 100_000
DEFAULT_RETRY_SECONDS = 30.0


@dataclasses.dataclass(frozen=True)
class OperationError:
    code: int  # google.rpc.Code
    message: str
    details: tuple[Any, ...] = ()  # google.protobuf.Any

    @classmethod
    def of(cls, error: BaseException) -> "OperationError":
        status = status_of(error)
        return cls(status.code, status.message, tuple(status.details))

    def encode(self) -> str:
        """base64 of the google.rpc.Status, for the JSON checkpoint manifest."""
        status = status_pb2.Status(code=self.code, message=self.message, details=list(self.details))
        return base64.b64encode(status.SerializeToString()).decode("ascii")

    @classmethod
    def decode(cls, data: str) -> "OperationError":
        status = status_pb2.Status.FromString(base64.b64decode(data))
        return cls(status.code, status.message, tuple(status.details))


@dataclasses.dataclass
class OperationRecord:
    """One operation; `Jobs` hands out copies, never the live record."""

    name: str
    kind: str
    task: str  # "" for an improvement of every ready task
    request_id: str
    state: str
    create_time: float
    update_time: float
    generation: int = 0
    generations: int = 0
    candidates_scored: int = 0
    best_score: float = 0.0
    best_quality: float = 0.0
    error: OperationError | None = None
    cancel_requested: bool = False
    plan: SearchPlan | None = None  # the budget, known before the search runs
    current_task: str = ""  # an improvement of every ready task: the task searched now
    tasks: tuple[str, ...] = ()  # ... and every task it searches, in run order

    @property
    def done(self) -> bool:
        return self.state in FINAL_STATES

    @property
    def number(self) -> int:
        return int(self.name[len(OPERATION_PREFIX):])

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict for the checkpoint manifest."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("error", "plan")}
        data["error"] = self.error.encode() if self.error else None
        data["plan"] = dataclasses.asdict(self.plan) if self.plan else None
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "OperationRecord":
        data = dict(data)
        error = data.pop("error", None)
        plan = data.pop("plan", None)
        fields = {f.name for f in dataclasses.fields(cls)}
        record = cls(**{k: v for k, v in data.items() if k in fields})
        record.error = OperationError.decode(error) if error else None
        record.plan = SearchPlan(**plan) if plan else None
        record.tasks = tuple(record.tasks)
        return record


def event_log_start(extra: Mapping[str, Any]) -> int:
    """Where the event sequence continues after a restart (see UNCLEAN_SEQUENCE_GAP)."""
    if not extra:
        return 0
    saved = int(extra.get("event_sequence", 0))
    return saved if extra.get("clean_shutdown") else saved + UNCLEAN_SEQUENCE_GAP


class Jobs:
    """The operation table, the queue and the search worker."""

    def __init__(self, engine: Any, events: EventLog, *, max_queue: int = 16, cycle_idle_seconds: float = 0.0):
        self._engine = engine
        self._events = events
        self._max_queue = max_queue
        # > 0: when idle that long, improve the next ready task (round-robin).
        self._cycle_idle_seconds = cycle_idle_seconds if cycle_idle_seconds > 0 else None
        self._cycle_position = 0
        self._condition = threading.Condition()
        self._submit_lock = threading.Lock()  # serialises submits: add_task is slow
        self._save_lock = threading.Lock()
        self._finishing: OperationRecord | None = None  # final state being saved, not yet visible
        self._records: dict[str, OperationRecord] = {}
        self._queue: collections.deque[str] = collections.deque()
        self._request_ids: dict[str, str] = {}
        self._next = 1
        self._running: str | None = None
        self._cancel: threading.Event | None = None
        self._stopping = False
        self._search_seconds = DEFAULT_RETRY_SECONDS
        self._worker = threading.Thread(target=self._work, name="search-worker", daemon=True)

    # ---- persistence -----------------------------------------------------------

    def extra_state(self, *, clean_shutdown: bool = False) -> dict[str, Any]:
        """What every checkpoint saves of the operations (a finishing operation
        with its final state, which clients see only once it is saved)."""
        # The event log's position and its bounded history, read together
        # (and encoded outside our lock, which the engine's callback needs).
        event_sequence, events = self._events.saved_state()
        with self._condition:
            finishing = self._finishing
            records = [finishing if finishing and r.name == finishing.name else r for r in self._records.values()]
            return {
                "operations": [r.to_dict() for r in records],
                "next_operation": self._next,
                "event_sequence": event_sequence,
                "events": events,
                "request_ids": dict(self._request_ids),
                "clean_shutdown": clean_shutdown,
            }

    def restore(self, extra: Mapping[str, Any]) -> None:
        """Loads saved operations; unfinished ones are queued again, oldest first."""
        records = [OperationRecord.from_dict(d) for d in extra.get("operations", ())]
        ready = {info.name for info in self._engine.tasks() if info.status == "READY"} if records else set()
        with self._condition:
            for record in sorted(records, key=lambda r: r.number):
                if not record.done and record.kind == EXTENSION and record.task in ready:
                    # Killed between the search's own checkpoint and the operation's.
                    logger.info("%s: its search finished before the stop; SUCCEEDED", record.name)
                    record.state, record.error, record.cancel_requested = SUCCEEDED, None, False
                    record.update_time = time.time()
                elif not record.done:
                    if record.state == RUNNING:
                        logger.info("%s was interrupted; queued again", record.name)
                    record.state, record.cancel_requested = QUEUED, False
                    self._queue.append(record.name)
                self._records[record.name] = record
            self._next = max([int(extra.get("next_operation", 1))] + [r.number + 1 for r in records])
            self._request_ids = {k: v for k, v in extra.get("request_ids", {}).items() if v in self._records}
        if self._queue:
            logger.info("re-queued %d unfinished operation(s)", len(self._queue))
        restored = self._events.restore(extra.get("events"))  # same sequence numbers as before
        if restored:
            logger.info("restored %d evolution event(s) for WatchEvolution", restored)

    def _save(self, *, raise_errors: bool = False) -> None:
        """Checkpoints the engine with the operations.

        Serialised, so that a save whose operations were read earlier never
        commits after (and over) one that read them later. Failures are logged,
        or raised with `raise_errors` (for changes acknowledged to a client)."""
        try:
            with self._save_lock:
                self._engine.save()
        except Exception:
            if raise_errors:
                raise
            logger.exception("checkpoint after an operation change failed")

    def _acknowledge(self, record: OperationRecord, undo: Callable[[], None] = lambda: None) -> None:
        """Makes a new operation durable before the client hears of it; when the
        checkpoint fails, forgets the operation (and runs `undo`) and raises."""
        try:
            self._save(raise_errors=True)
        except Exception:
            with self._condition:
                self._records.pop(record.name, None)
                self._request_ids = {k: v for k, v in self._request_ids.items() if v != record.name}
            undo()
            logger.warning("%s not accepted: its checkpoint failed", record.name)
            raise

    # ---- requests ----------------------------------------------------------------

    def submit(self, spec: TaskSpec, request_id: str = "") -> OperationRecord:
        """Adds a task and queues its extension search (idempotent per request id)."""
        with self._submit_lock:
            existing = self._by_request("submit", request_id)
            if existing is not None:
                return existing
            self._check_accepting()
            self._engine.add_task(spec)
            record = self._create(EXTENSION, spec.name, "submit", request_id)
            record.plan = self._engine.search_plan(spec.name, EXTENSION)
            record.generations = record.plan.generations if record.plan else 0
            self._acknowledge(record, undo=lambda: self._engine.forget_task(spec.name))
            self._enqueue(record.name)
            logger.info("%s: extension search of %s queued", record.name, spec.name)
            return self.get(record.name)

    def improve(self, task: str = "", request_id: str = "") -> OperationRecord:
        """Queues a generalization search of one task, or of every ready task.

        A task that never got a model and has no search queued or running gets
        its extension search retried instead.
        """
        with self._submit_lock:
            existing = self._by_request("improve", request_id)
            if existing is not None:
                return existing
            self._check_accepting()
            kind = self._improvement_kind(task)
            record = self._create(kind, task, "improve", request_id)
            record.plan = self._engine.search_plan(task, kind) if task else None
            record.generations = record.plan.generations if record.plan else 0
            self._acknowledge(record)
            self._enqueue(record.name)
            logger.info("%s: %s search of %s queued", record.name, kind, task or "every ready task")
            return self.get(record.name)

    def _improvement_kind(self, task: str) -> str:
        if not task:
            if not any(info.status == "READY" for info in self._engine.tasks()):
                raise FailedPreconditionError("NO_READY_TASKS", "no task has a model to improve yet")
            return GENERALIZATION
        info = self._engine.task(task)  # NOT_FOUND for an unknown task
        if info.status == "READY":
            return GENERALIZATION
        with self._condition:
            busy = bool(self._unfinished(task))
        if busy:
            raise FailedPreconditionError("TASK_NOT_READY", f"task {task!r} is still waiting for its first search")
        return EXTENSION

    def _unfinished(self, task: str) -> list[str]:
        """Names of the queued or running operations of one task (hold `_condition`)."""
        return [r.name for r in self._records.values() if not r.done and r.task == task]

    def _by_request(self, scope: str, request_id: str) -> OperationRecord | None:
        if not request_id:
            return None
        with self._condition:
            name = self._request_ids.get(f"{scope}:{request_id}")
            return dataclasses.replace(self._records[name]) if name else None

    def _check_accepting(self) -> None:
        with self._condition:
            if self._stopping:
                raise UnavailableError("the server is shutting down", retry_after_s=5.0)
            if len(self._queue) >= self._max_queue:
                raise ResourceExhaustedError(
                    f"the search queue is full ({self._max_queue} operations waiting)",
                    retry_after_s=self._search_seconds,
                )
        self._engine.check_storage()  # refuse before writing anything

    def delete_task(self, task: str) -> None:
        """Deletes a task (durably) unless an operation of it is queued or running."""
        with self._submit_lock:
            with self._condition:
                if self._stopping:
                    raise UnavailableError("the server is shutting down", retry_after_s=5.0)
                busy = self._unfinished(task)
                if self._running and not self._records[self._running].task:
                    busy.append(self._running)  # an improvement of every task may reach it
            if busy:
                raise FailedPreconditionError(
                    "TASK_BUSY", f"task {task!r} has unfinished operations ({', '.join(busy)}); cancel them first"
                )
            with self._save_lock:  # the engine's checkpoint carries the operations too
                self._engine.delete_task(task)
            logger.info("task %s deleted", task)

    def _create(self, kind: str, task: str, scope: str, request_id: str) -> OperationRecord:
        now = time.time()
        with self._condition:
            name = f"{OPERATION_PREFIX}{self._next}"
            self._next += 1
            record = OperationRecord(name, kind, task, request_id, QUEUED, now, now)
            self._records[name] = record
            if request_id:
                self._request_ids[f"{scope}:{request_id}"] = name
            self._prune()
            return record

    def _prune(self) -> None:
        finished = [name for name, r in self._records.items() if r.done]
        for name in finished[: max(len(finished) - MAX_FINISHED_OPERATIONS, 0)]:
            del self._records[name]
        self._request_ids = {k: v for k, v in self._request_ids.items() if v in self._records}

    def _enqueue(self, name: str) -> None:
        with self._condition:
            if self._records[name].state == QUEUED and not self._stopping:
                self._queue.append(name)
                self._condition.notify_all()

    # ---- reading -------------------------------------------------------------------

    def _record(self, name: str) -> OperationRecord:
        if not name:
            raise InvalidArgumentError("name", "an operation name is required")
        record = self._records.get(name)
        if record is None:
            raise NotFoundError("operation", name)
        return record

    def get(self, name: str) -> OperationRecord:
        with self._condition:
            return dataclasses.replace(self._record(name))

    def list(self, task: str = "") -> list[OperationRecord]:
        with self._condition:
            records = sorted(self._records.values(), key=lambda r: r.number)
            return [dataclasses.replace(r) for r in records if not task or r.task == task]

    def wait(self, name: str, timeout: float, keep_waiting: Callable[[], bool] = lambda: True) -> OperationRecord:
        """The operation once done, or as it stands when the timeout passes or
        `keep_waiting` turns false (checked every second and on `wake`)."""
        deadline = time.monotonic() + max(timeout, 0.0)
        with self._condition:
            record = self._record(name)
            while not record.done and keep_waiting() and not self._stopping:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._condition.wait(min(remaining, 1.0))
            return dataclasses.replace(record)

    def wake(self) -> None:
        """Makes every `wait` check its `keep_waiting` now (a client left)."""
        with self._condition:
            self._condition.notify_all()

    def cancel(self, name: str) -> OperationRecord:
        """Cancels a queued operation at once, a running one at its next step."""
        with self._condition:
            record = self._record(name)
            if record.state == QUEUED:
                self._queue.remove(name)
                self._set_final(record, CANCELLED, OperationError(code_pb2.CANCELLED, "cancelled by request"))
                logger.info("%s: cancelled while queued", name)
                changed = True
            else:
                changed = False
                if record.state == RUNNING and self._running == name and self._cancel is not None:
                    record.cancel_requested = True
                    self._cancel.set()
            snapshot = dataclasses.replace(record)
        if changed:
            self._save()
        return snapshot

    def delete_operation(self, name: str) -> None:
        """Forgets a finished operation, durably (on disk before this returns);
        FAILED_PRECONDITION for one that is not done. The task stays."""
        with self._condition:
            record = self._record(name)
            if self._stopping:
                raise UnavailableError("the server is shutting down", retry_after_s=5.0)
            if not record.done:
                raise FailedPreconditionError(
                    "OPERATION_NOT_DONE", f"{name} is {record.state}; cancel it and wait until it is done"
                )
            del self._records[name]
            request_ids = self._request_ids
            self._request_ids = {k: v for k, v in request_ids.items() if v != name}
        try:
            self._save(raise_errors=True)
        except Exception:
            with self._condition:  # not deleted after all: the checkpoint failed
                self._records[name] = record
                self._request_ids.update({k: v for k, v in request_ids.items() if v == name})
            raise
        logger.info("%s deleted", name)

    # ---- the worker ------------------------------------------------------------------

    def start(self) -> None:
        self._worker.start()

    def shutdown(self, timeout: float) -> None:
        """Stops the worker: the running search is cancelled at its next step and
        its operation goes back to QUEUED, to be run again after a restart."""
        with self._condition:
            self._stopping = True
            if self._cancel is not None:
                self._cancel.set()
            self._condition.notify_all()
        if self._worker.is_alive():
            self._worker.join(timeout)
        with self._condition:
            if self._worker.is_alive() and self._running:
                logger.warning("the search did not stop within %.0f s; %s stays queued", timeout, self._running)
                self._records[self._running].state = QUEUED

    def _work(self) -> None:
        while True:
            with self._condition:
                self._condition.wait_for(lambda: self._queue or self._stopping, timeout=self._cycle_idle_seconds)
                if self._stopping:
                    return
                idle = not self._queue
            if idle:
                self._cycle_once()
                continue
            with self._condition:
                if not self._queue:
                    continue
                record = self._records[self._queue.popleft()]
                record.state, record.update_time = RUNNING, time.time()
                self._running, self._cancel = record.name, threading.Event()
                cancel = self._cancel
                self._condition.notify_all()
            logger.info("%s: running (%s of %s)", record.name, record.kind, record.task or "every ready task")
            started = time.monotonic()
            state, error = self._run(record, cancel)
            seconds = time.monotonic() - started
            if state != QUEUED:  # durable before visible: `done` must survive a crash
                with self._condition:
                    self._finishing = dataclasses.replace(record, state=state, error=error, update_time=time.time())
                self._save()
            with self._condition:
                self._finishing = None
                self._running, self._cancel = None, None
                if state == QUEUED:
                    record.state, record.update_time = QUEUED, time.time()
                else:
                    self._set_final(record, state, error)
                    self._search_seconds = 0.5 * self._search_seconds + 0.5 * seconds
            logger.info("%s: %s after %.1f s", record.name, state, seconds)
            if state == QUEUED:
                self._save()

    def _cycle_once(self) -> None:
        """Queues a generalization search of the next ready task, as the mu2Net
        continual methodology cycles over existing tasks when no one asks."""
        ready = sorted(info.name for info in self._engine.tasks() if info.status == "READY")
        if not ready:
            return
        task = ready[self._cycle_position % len(ready)]
        self._cycle_position += 1
        try:
            record = self.improve(task)
        except EvolveError as error:
            logger.warning("idle generalization of %s not queued: %s", task, error)
            return
        logger.info("%s: idle cycle queued a generalization search of %s", record.name, task)

    def _run(self, record: OperationRecord, cancel: threading.Event) -> tuple[str, OperationError | None]:
        """Runs an operation's searches; returns its next state and error."""
        try:
            tasks = self._tasks_of(record)
            with self._condition:
                record.tasks = tuple(tasks) if not record.task else ()
            for task in tasks:
                self._begin_task(record, task)
                self._engine.run_search(
                    task, record.kind, cancel=cancel,
                    on_event=lambda event, name=record.name: self._on_event(name, event),
                )
        except CancelledError as error:
            with self._condition:
                interrupted = self._stopping and not record.cancel_requested
            if interrupted:
                logger.info("%s interrupted by shutdown; it will run again after a restart", record.name)
                for task in self._tasks_of(record):
                    self._engine.requeued(task)
                return QUEUED, None
            return CANCELLED, OperationError(code_pb2.CANCELLED, str(error) or "cancelled")
        except EvolveError as error:
            logger.warning("%s failed: %s", record.name, error)
            if isinstance(error, InvalidArgumentError) and record.task:  # bad data found while loading
                error = converters.with_spec_field(error, self._engine.task(record.task).spec)
            return FAILED, OperationError.of(error)
        except Exception as error:
            logger.exception("%s failed unexpectedly", record.name)
            return FAILED, OperationError.of(error)
        return SUCCEEDED, None

    def _tasks_of(self, record: OperationRecord) -> list[str]:
        """The task of an operation, or every READY task in submission order."""
        if record.task:
            return [record.task]
        ready = [info.name for info in self._engine.tasks() if info.status == "READY"]
        with self._condition:
            first = {}
            for other in sorted(self._records.values(), key=lambda r: r.number):
                if other.task:
                    first.setdefault(other.task, other.number)
        return submission_order(ready, first)

    def _begin_task(self, record: OperationRecord, task: str) -> None:
        info = self._engine.task(task)
        with self._condition:
            record.generation = 0
            record.current_task = "" if record.task else task
            record.best_score = info.best_score or 0.0
            record.best_quality = info.validation_accuracy or 0.0
            record.update_time = time.time()

    def _on_event(self, name: str, event: domain_events.Event) -> None:
        """Engine callback: updates the operation's progress and logs the event."""
        with self._condition:
            record = self._records.get(name)
            if record is not None:
                _apply_progress(record, event)
        self._events.append(event, name)

    def _set_final(self, record: OperationRecord, state: str, error: OperationError | None) -> None:
        record.state, record.error, record.update_time = state, error, time.time()
        self._condition.notify_all()


def submission_order(tasks: Sequence[str], first_operation: Mapping[str, int]) -> list[str]:
    """Tasks in the order they were submitted: by the number of their first
    operation still recorded; tasks without one last, by name."""
    return sorted(tasks, key=lambda t: (first_operation.get(t, sys.maxsize), t))


def _apply_progress(record: OperationRecord, event: domain_events.Event) -> None:
    if isinstance(event, domain_events.SearchStarted):
        record.plan, record.generations = event.plan, event.plan.generations
    elif isinstance(event, domain_events.GenerationStarted):
        record.generation, record.generations = event.generation + 1, event.generations
    elif isinstance(event, domain_events.CandidateScored):
        record.candidates_scored += 1
    elif isinstance(event, domain_events.CandidateAccepted):
        record.best_score, record.best_quality = event.score, event.quality
    else:
        return
    record.update_time = time.time()
