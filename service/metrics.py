"""Prometheus metrics of one server (DESIGN §8), on `--metrics-port`.

Every server has its own CollectorRegistry (never prometheus_client's global
one), served over plain HTTP at /metrics. What it measures, and from where:

- calls: `grpc_server_started_total`, `grpc_server_handled_total` and the
  `grpc_server_handling_seconds` histogram per service, method, type and
  code, reported by service.observability's interceptor;
- inference: `evolve_inference_seconds{task,method}` of successful Predict
  and ModelInfer calls;
- operations: queue depth and running operations (read at scrape time), and
  `evolve_operation_duration_seconds{kind,state}` from creation to the end;
- searches, from the evolution events (a thread follows the event log, as a
  WatchEvolution client would): candidates, training examples, training and
  compile seconds per task, examples per second of the last generation,
  compile seconds and duration per search;
- checkpoints: duration, bytes written (new component directories and the
  manifest step) and failures, timed around `Engine.save`;
- the system: parameters charged to each task, tasks by status, components,
  refreshed by that thread (a scrape never waits on the engine's lock);
- the process: CPU, memory, open files, GC (prometheus_client's collectors).

Task label values are capped (MAX_TASK_LABELS, the rest report as "_other");
inference calls for an unknown task never create a label.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import start_http_server
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from evolve import events as domain_events
from service.observability import split_method

logger = logging.getLogger(__name__)

MAX_TASK_LABELS = 200
OTHER_TASK = "_other"
REFRESH_SECONDS = 5.0  # system snapshot (parameters, task states) at least this often
FOLLOW_SECONDS = 1.0
INFERENCE_METHODS = {
    "/evolve.v1.EvolutionService/Predict": ("Predict", "task"),
    "/inference.GRPCInferenceService/ModelInfer": ("ModelInfer", "model_name"),
}
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                   60.0, 300.0, 600.0)
LONG_BUCKETS = (1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0)
COMPILE_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
BYTES_BUCKETS = tuple(float(1 << shift) for shift in range(10, 38, 2))  # 1 KiB .. 128 GiB


class TaskLabels:
    """Bounded task label values: the first MAX_TASK_LABELS names keep their own."""

    def __init__(self, limit: int = MAX_TASK_LABELS):
        self._limit = limit
        self._names: set[str] = set()
        self._lock = threading.Lock()

    def of(self, task: str, *, admit: bool = True) -> str:
        """The label of `task`; a new name gets one only with `admit` and while room is left."""
        with self._lock:
            if task in self._names:
                return task
            if admit and task and len(self._names) < self._limit:
                self._names.add(task)
                return task
        return OTHER_TASK


def method_labels(method: str) -> tuple[str, str]:
    """(service, method) labels of a served method; "" (a method the server
    does not have, named by the client) is ("unknown", "unknown")."""
    service, name = split_method(method)
    if not service or not name:
        return "unknown", "unknown"
    return service, name


def directory_bytes(path: str) -> int:
    """Bytes of the files under `path` (0 when it is gone)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


@dataclasses.dataclass
class _SearchProgress:
    """What the event follower keeps of one running search."""

    kind: str
    started: float  # the SearchStarted event's time
    examples_per_candidate: int
    compile_seconds: float = 0.0
    generation: int = -1
    generation_examples: int = 0
    generation_seconds: float = 0.0


@dataclasses.dataclass(frozen=True)
class _Snapshot:
    params_per_task: Mapping[str, float] = dataclasses.field(default_factory=dict)
    tasks_by_status: Mapping[str, int] = dataclasses.field(default_factory=dict)
    components: int = 0
    total_params: int = 0
    damaged_tasks: int = 0


class ServerMetrics:
    """The registry, the metrics, the event follower and the HTTP endpoint of one server."""

    def __init__(self, *, ready: Callable[[], bool] = lambda: False, max_queue: int | None = None):
        self.registry = CollectorRegistry(auto_describe=True)
        self.tasks = TaskLabels()
        self._ready = ready
        self._max_queue = max_queue
        self._jobs: Any = None
        self._engine: Any = None
        self._snapshot = _Snapshot()
        self._snapshot_lock = threading.Lock()
        self._stop = threading.Event()
        self._follower: threading.Thread | None = None
        self._http: Any = None
        self._define()
        registry = self.registry
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        registry.register(_StateCollector(self))

    def _define(self) -> None:
        registry = self.registry
        rpc = ("grpc_service", "grpc_method", "grpc_type")
        self.rpc_started_total = Counter("grpc_server_started", "RPCs started on the server.", rpc, registry=registry)
        self.rpc_handled_total = Counter("grpc_server_handled", "RPCs completed on the server, by status code.",
                                   rpc + ("grpc_code",), registry=registry)
        self.rpc_seconds = Histogram("grpc_server_handling_seconds", "Time from the start of an RPC to its end.",
                                     rpc + ("grpc_code",), buckets=LATENCY_BUCKETS, registry=registry)
        self.inference_seconds = Histogram(
            "evolve_inference_seconds", "Latency of successful Predict and ModelInfer calls, per task.",
            ("task", "method"), buckets=LATENCY_BUCKETS, registry=registry)
        self.operation_seconds = Histogram(
            "evolve_operation_duration_seconds", "Operations from creation (queued) to their final state.",
            ("kind", "state"), buckets=LONG_BUCKETS, registry=registry)
        self.search_seconds = Histogram(
            "evolve_search_duration_seconds", "Searches from their start (budget fixed, data loaded) to their end.",
            ("kind", "state"), buckets=LONG_BUCKETS, registry=registry)
        self.search_compile_seconds = Histogram(
            "evolve_search_compile_seconds", "Compile time of the train steps of one search, all candidates.",
            ("kind",), buckets=COMPILE_BUCKETS, registry=registry)
        self.candidate_compile_seconds = Histogram(
            "evolve_candidate_compile_seconds", "Compile time of one candidate's train step (0 when cached).",
            buckets=COMPILE_BUCKETS, registry=registry)
        self.candidates = Counter("evolve_candidates", "Candidates trained and scored.", ("task", "accepted"),
                                  registry=registry)
        self.generations = Counter("evolve_generations", "Generations started.", ("task",), registry=registry)
        self.train_examples = Counter(
            "evolve_train_examples", "Training examples seen by candidates (rate() gives examples/s).",
            ("task",), registry=registry)
        self.train_seconds = Counter(
            "evolve_train_seconds", "Candidate training time (validation included, compile excluded).",
            ("task",), registry=registry)
        self.compile_seconds = Counter("evolve_compile_seconds", "Train-step compile time.", ("task",),
                                       registry=registry)
        self.examples_per_second = Gauge(
            "evolve_train_examples_per_second",
            "Training throughput of the task's last generation (its candidates train side by side).",
            ("task",), registry=registry)
        self.checkpoint_seconds = Histogram("evolve_checkpoint_duration_seconds", "Time to write one checkpoint.",
                                            buckets=LATENCY_BUCKETS, registry=registry)
        self.checkpoint_bytes = Histogram(
            "evolve_checkpoint_bytes", "Bytes one checkpoint wrote (new components, new task records and the manifest step).",
            buckets=BYTES_BUCKETS, registry=registry)
        self.checkpoint_bytes_total = Counter("evolve_checkpoint_written_bytes", "Bytes written by checkpoints.",
                                              registry=registry)
        self.checkpoint_components = Counter("evolve_checkpoint_new_components", "Components written.",
                                             registry=registry)
        self.checkpoint_failures = Counter("evolve_checkpoint_failures", "Checkpoints that failed.",
                                           registry=registry)
        self.checkpoint_time = Gauge("evolve_checkpoint_last_success_timestamp_seconds",
                                     "When the last checkpoint committed (Unix time).", registry=registry)

    # ---- calls (service.observability.RpcObserver) ---------------------------------------

    def rpc_started(self, method: str, rpc_type: str) -> None:
        service, name = method_labels(method)
        self.rpc_started_total.labels(service, name, rpc_type).inc()

    def rpc_finished(self, method: str, rpc_type: str, code: str, seconds: float, request: Any) -> None:
        service, name = method_labels(method)
        self.rpc_handled_total.labels(service, name, rpc_type, code).inc()
        self.rpc_seconds.labels(service, name, rpc_type, code).observe(seconds)
        inference = INFERENCE_METHODS.get(method)
        if inference is not None and code == "OK":
            label, field = inference
            task = getattr(request, field, "")
            if isinstance(task, str):
                self.inference_seconds.labels(self.tasks.of(task), label).observe(seconds)

    # ---- the loaded system ----------------------------------------------------------------

    def attach(self, engine: Any, jobs: Any, events: Any) -> None:
        """Starts measuring a loaded system: its checkpoints, operations and events."""
        self._engine, self._jobs = engine, jobs
        self._observe_checkpoints(engine)
        finished = {record.name for record in jobs.list() if record.done}  # ended before this process
        self._refresh()
        self._follower = threading.Thread(
            target=self._follow, args=(events, events.last_sequence, finished), name="metrics-events", daemon=True
        )
        self._follower.start()

    def _observe_checkpoints(self, engine: Any) -> None:
        """Observes every checkpoint the engine writes (whatever calls it)."""
        state_dir = engine.state_dir

        def observe(written: Any, seconds: float) -> None:
            if written is None:
                self.checkpoint_failures.inc()
            else:
                self._observe_checkpoint(state_dir, written, seconds)

        engine.on_checkpoint = observe

    def _observe_checkpoint(self, state_dir: str, saved: Any, seconds: float) -> None:
        """`saved`: the checkpoint.Written of a save."""
        written = directory_bytes(os.path.join(state_dir, "manifest", str(saved.step)))
        written += sum(directory_bytes(os.path.join(state_dir, "components", name)) for name in saved.packs)
        for name in saved.record_files:
            with contextlib.suppress(OSError):  # collected by a later save meanwhile
                written += os.path.getsize(os.path.join(state_dir, "records", name))
        self.checkpoint_seconds.observe(seconds)
        self.checkpoint_bytes.observe(written)
        self.checkpoint_bytes_total.inc(written)
        self.checkpoint_components.inc(saved.new_components)
        self.checkpoint_time.set(time.time())

    def _follow(self, events: Any, sequence: int, finished: set[str]) -> None:
        searches: dict[str, _SearchProgress] = {}
        refreshed = time.monotonic()
        while not self._stop.is_set():
            changed = False
            try:
                if events.wait_after(sequence, FOLLOW_SECONDS):
                    batch, sequence = events.read(sequence)
                    for logged in batch:
                        changed |= self.observe_event(logged.event, logged.time, searches)
                finished = self._observe_operations(finished)
                if changed or time.monotonic() - refreshed > REFRESH_SECONDS:
                    self._refresh()
                    refreshed = time.monotonic()
            except Exception:
                logger.exception("metrics: following events failed")
                self._stop.wait(FOLLOW_SECONDS)
            if events.closed:
                break

    def observe_event(self, event: domain_events.Event, at: float, searches: dict[str, _SearchProgress]) -> bool:
        """Counts one evolution event; returns whether the system's parameters may have changed."""
        if isinstance(event, domain_events.SearchStarted):
            searches[event.task] = _SearchProgress(event.plan.kind, at, event.plan.examples_per_candidate)
            self.tasks.of(event.task)
            return False
        if isinstance(event, domain_events.TrainingProgress):
            return False  # throughput comes from CandidateScored; progress events are transient
        name = getattr(event, "task", "")
        task = self.tasks.of(name)
        progress = searches.get(name)
        if isinstance(event, domain_events.GenerationStarted):
            self.generations.labels(task).inc()
        elif isinstance(event, domain_events.CandidateScored):
            self._observe_candidate(task, event, progress)
        elif isinstance(event, domain_events.SearchFinished):
            searches.pop(name, None)
            if progress is not None:
                self.search_seconds.labels(progress.kind, event.state).observe(max(at - progress.started, 0.0))
                self.search_compile_seconds.labels(progress.kind).observe(progress.compile_seconds)
            return True
        elif isinstance(event, domain_events.CheckpointWritten):
            return True
        return False

    def _observe_candidate(self, task: str, event: domain_events.CandidateScored,
                           progress: _SearchProgress | None) -> None:
        self.candidates.labels(task, "true" if event.accepted_into_population else "false").inc()
        self.train_seconds.labels(task).inc(max(event.train_seconds, 0.0))
        self.compile_seconds.labels(task).inc(max(event.compile_seconds, 0.0))
        self.candidate_compile_seconds.observe(max(event.compile_seconds, 0.0))
        if progress is None:
            return
        examples = progress.examples_per_candidate
        self.train_examples.labels(task).inc(examples)
        progress.compile_seconds += max(event.compile_seconds, 0.0)
        if event.generation != progress.generation:
            progress.generation, progress.generation_examples, progress.generation_seconds = event.generation, 0, 0.0
        progress.generation_examples += examples
        # The candidates of a generation train side by side: the slowest one's time is the generation's.
        progress.generation_seconds = max(progress.generation_seconds, event.train_seconds)
        if progress.generation_seconds > 0:
            self.examples_per_second.labels(task).set(progress.generation_examples / progress.generation_seconds)

    def _observe_operations(self, finished: set[str]) -> set[str]:
        """Observes operations that ended since the last look; returns the ended ones still listed."""
        ended = set()
        for record in self._jobs.list():
            if not record.done:
                continue
            ended.add(record.name)
            if record.name not in finished:
                self.operation_seconds.labels(record.kind, record.state).observe(
                    max(record.update_time - record.create_time, 0.0))
        return ended

    def _refresh(self) -> None:
        """Reads the system's parameters and task states (waits on the engine's lock, off the scrape)."""
        engine = self._engine
        if engine is None:
            return
        summary = engine.summary()
        by_status: dict[str, int] = {}
        for info in engine.tasks():
            by_status[info.status] = by_status.get(info.status, 0) + 1
        snapshot = _Snapshot(dict(summary.params_per_task), by_status, summary.num_components, summary.total_params,
                             len(summary.damaged_tasks))
        for task in snapshot.params_per_task:
            self.tasks.of(task)
        with self._snapshot_lock:
            self._snapshot = snapshot

    def snapshot(self) -> _Snapshot:
        with self._snapshot_lock:
            return self._snapshot

    # ---- the endpoint ----------------------------------------------------------------------

    def serve(self, host: str, port: int) -> int:
        """Serves /metrics over HTTP on host:port (0: a free port); returns the port."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http.server_port)

    def close(self) -> None:
        self._stop.set()
        if self._follower is not None:
            self._follower.join(5.0)
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _StateCollector:
    """Gauges read at scrape time: readiness, the queue, and the last system snapshot."""

    def __init__(self, metrics: ServerMetrics):
        self._metrics = metrics

    def describe(self) -> Iterable[Any]:
        return []  # collected lazily: families depend on the loaded system

    def collect(self) -> Iterator[GaugeMetricFamily]:
        metrics = self._metrics
        yield GaugeMetricFamily("evolve_ready", "1 while the server serves (health SERVING).",
                                value=1.0 if metrics._ready() else 0.0)
        if metrics._max_queue is not None:
            yield GaugeMetricFamily("evolve_operation_queue_capacity", "Operations the queue holds at most.",
                                    value=metrics._max_queue)
        jobs = metrics._jobs
        if jobs is None:
            return
        records = jobs.list()
        yield GaugeMetricFamily("evolve_operation_queue_depth", "Operations waiting for the search worker.",
                                value=sum(1 for r in records if r.state == "QUEUED"))
        yield GaugeMetricFamily("evolve_operations_running", "Operations the search worker is running.",
                                value=sum(1 for r in records if r.state == "RUNNING"))
        snapshot = metrics.snapshot()
        params = GaugeMetricFamily(
            "evolve_task_params", "Parameters charged to each served task (a shared component is split among "
            "the tasks that use it).", labels=("task",))
        others = 0.0
        for task, value in sorted(snapshot.params_per_task.items()):
            label = metrics.tasks.of(task, admit=False)
            if label == task:
                params.add_metric((task,), value)
            else:
                others += value
        if others:
            params.add_metric((OTHER_TASK,), others)
        yield params
        tasks = GaugeMetricFamily("evolve_tasks", "Tasks by status.", labels=("status",))
        for status, count in sorted(snapshot.tasks_by_status.items()):
            tasks.add_metric((status,), count)
        yield tasks
        yield GaugeMetricFamily("evolve_components", "Components in the system.", value=snapshot.components)
        yield GaugeMetricFamily("evolve_params", "Parameters of all components.", value=snapshot.total_params)
        yield GaugeMetricFamily("evolve_damaged_tasks", "Tasks whose model has a missing or corrupt component.",
                                value=snapshot.damaged_tasks)
        yield GaugeMetricFamily("evolve_checkpoint_step", "Step of the last committed checkpoint.",
                                value=getattr(metrics._engine, "checkpoint_step", 0))
