"""Thin servicers of evolve.v1.EvolutionService and the Open Inference Protocol.

Each handler converts its request (service.converters), delegates to the
engine or the job queue, and converts the result back. Handlers raise domain
errors; service.errors maps them to status codes for every handler at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

import evolve
from evolve.errors import InvalidArgumentError, NotFoundError, ResourceExhaustedError
from service import converters, operation_filter, triton_extensions
from service.errors import UnavailableError
from service.event_log import EventLog
from service.gen.evolve.v1 import evolve_pb2, evolve_pb2_grpc
from service.gen.inference import grpc_predict_v2_pb2 as infer_pb2
from service.gen.inference import grpc_predict_v2_pb2_grpc as infer_pb2_grpc
from service.jobs import Jobs

logger = logging.getLogger(__name__)

SERVER_NAME = "evolve"
MAX_WAIT_SECONDS = 600.0
WATCH_POLL_SECONDS = 1.0


@dataclasses.dataclass(frozen=True)
class Loaded:
    engine: Any  # evolve.engine.Engine (imported lazily: it loads JAX)
    jobs: Jobs
    events: EventLog


def peer_host(peer: str) -> str:
    """The client host of a gRPC peer string ("ipv4:10.0.0.7:51234" -> "ipv4:10.0.0.7")."""
    kind, _, address = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        host, _, port = address.rpartition(":")
        return f"{kind}:{host}" if port.isdigit() else peer
    return peer


class LongCalls:
    """Bounds the calls that hold a server thread while they wait
    (WaitOperation, WatchEvolution): in all, and per client host, so that
    Predict and health always find a free thread."""

    def __init__(self, total: int, per_peer: int):
        self.total, self.per_peer = max(total, 1), max(min(per_peer, total), 1)
        self._lock = threading.Lock()
        self._by_peer: dict[str, int] = {}

    @contextlib.contextmanager
    def hold(self, context: Any, method: str, wake: Callable[[], None]) -> Iterator[None]:
        """A slot for one waiting call. A call whose client has already left
        (its deadline passed while it queued for a thread) takes none, and a
        held slot is given back as soon as the client leaves: `wake` is called
        then, and the waiting code must check `context.is_active`."""
        if not context.is_active():
            yield
            return
        host = peer_host(context.peer() or "")
        with self._lock:
            held = sum(self._by_peer.values())
            if held >= self.total:
                raise ResourceExhaustedError(
                    f"{method}: the server already holds {held} waiting calls (at most {self.total}); "
                    "retry later or poll GetOperation", retry_after_s=10.0,
                )
            if self._by_peer.get(host, 0) >= self.per_peer:
                raise ResourceExhaustedError(
                    f"{method}: this client already holds {self.per_peer} waiting calls (at most "
                    f"{self.per_peer} per client host)", retry_after_s=10.0,
                )
            self._by_peer[host] = self._by_peer.get(host, 0) + 1
        context.add_callback(wake)
        try:
            yield
        finally:
            with self._lock:
                self._by_peer[host] -= 1
                if not self._by_peer[host]:
                    del self._by_peer[host]


class Backend:
    """What the servicers delegate to; UNAVAILABLE until the engine is loaded."""

    def __init__(self, *, max_long_calls: int = 16, max_long_calls_per_peer: int = 8):
        self._loaded: Loaded | None = None
        self._draining = False
        self._serving = False
        self.long_calls = LongCalls(max_long_calls, max_long_calls_per_peer)
        self.model_stats = triton_extensions.ModelStats()  # Predict and ModelInfer, per task version

    def attach(self, engine: Any, jobs: Jobs, events: EventLog) -> None:
        self._loaded = Loaded(engine, jobs, events)

    def set_serving(self, serving: bool) -> None:
        """Flipped together with grpc health, so ServerReady and health agree."""
        self._serving = serving

    def drain(self) -> None:
        self._draining = True
        self._serving = False

    @property
    def loaded(self) -> Loaded | None:
        return self._loaded

    @property
    def ready(self) -> bool:
        return self._serving and self._loaded is not None and not self._draining

    def require(self) -> Loaded:
        loaded = self._loaded
        if loaded is None:
            raise UnavailableError("the server is still loading its system; retry shortly", retry_after_s=2.0)
        return loaded


def predict(engine: Any, task: str, images: np.ndarray, version: str = "", field: str = "task"):
    """The one prediction path of Predict and ModelInfer."""
    if not task:
        raise InvalidArgumentError(field, "a task name is required")
    prediction = engine.predict(task, images)
    if version and version != str(prediction.path_version):
        # Only the current version is served; an older one is gone for good.
        raise NotFoundError("model version", f"{task}/{version}")
    return prediction


def wait_seconds(request: evolve_pb2.WaitOperationRequest) -> float:
    """How long a WaitOperation may wait: `timeout` (a Duration; zero: not at
    all) or the deprecated `timeout_seconds` (0: the maximum), at most
    MAX_WAIT_SECONDS either way."""
    if request.HasField("timeout"):
        if request.timeout_seconds:
            raise InvalidArgumentError(
                "timeout_seconds", "give `timeout` or the deprecated `timeout_seconds`, not both"
            )
        seconds, nanos = request.timeout.seconds, request.timeout.nanos
        if abs(nanos) > 999_999_999 or (seconds and nanos and (seconds < 0) != (nanos < 0)):
            raise InvalidArgumentError("timeout", f"not a valid Duration (seconds={seconds}, nanos={nanos})")
        if seconds < 0 or nanos < 0:
            raise InvalidArgumentError("timeout", f"must not be negative, got {seconds + nanos / 1e9:g} s")
        return min(seconds + nanos / 1e9, MAX_WAIT_SECONDS)
    if not request.timeout_seconds >= 0:  # NaN as well
        raise InvalidArgumentError("timeout_seconds", f"must be a non-negative number, got {request.timeout_seconds}")
    return min(request.timeout_seconds or MAX_WAIT_SECONDS, MAX_WAIT_SECONDS)


class EvolutionServicer(evolve_pb2_grpc.EvolutionServiceServicer):
    def __init__(self, backend: Backend):
        self._backend = backend

    def _operation(self, loaded: Loaded, record) -> evolve_pb2.Operation:
        task = None
        if record.done and record.error is None and record.task:
            try:
                task = loaded.engine.task(record.task)
            except NotFoundError:
                task = None
        return converters.operation_to_proto(record, task)

    def SubmitTask(self, request, context):
        loaded = self._backend.require()
        spec = converters.spec_from_proto(request.spec)
        request_id = converters.request_id(request.request_id)
        try:
            record = loaded.jobs.submit(spec, request_id)
        except InvalidArgumentError as error:  # the data layer names spec-relative fields
            raise converters.with_spec_field(error, spec) from None
        return self._operation(loaded, record)

    def GetOperation(self, request, context):
        loaded = self._backend.require()
        return self._operation(loaded, loaded.jobs.get(request.name))

    def ListOperations(self, request, context):
        loaded = self._backend.require()
        wanted = operation_filter.list_filter(request.filter, request.task)
        records = [record for record in loaded.jobs.list() if wanted.matches(record)]
        records, token = converters.page(records, request.page_size, request.page_token)
        return evolve_pb2.ListOperationsResponse(
            operations=[self._operation(loaded, r) for r in records], next_page_token=token
        )

    def CancelOperation(self, request, context):
        loaded = self._backend.require()
        return self._operation(loaded, loaded.jobs.cancel(request.name))

    def WaitOperation(self, request, context):
        loaded = self._backend.require()
        timeout = wait_seconds(request)
        remaining = context.time_remaining()
        if remaining is not None:
            timeout = min(timeout, max(remaining - 0.2, 0.0))  # answer before the deadline
        loaded.jobs.get(request.name)  # NOT_FOUND before taking a slot
        with self._backend.long_calls.hold(context, "WaitOperation", loaded.jobs.wake):
            record = loaded.jobs.wait(request.name, timeout, keep_waiting=context.is_active)
        return self._operation(loaded, record)

    def DeleteOperation(self, request, context):
        loaded = self._backend.require()
        loaded.jobs.delete_operation(request.name)
        return evolve_pb2.DeleteOperationResponse(name=request.name)

    def GetTask(self, request, context):
        loaded = self._backend.require()
        if not request.name:
            raise InvalidArgumentError("name", "a task name is required")
        return converters.task_to_proto(loaded.engine.task(request.name))

    def ListTasks(self, request, context):
        loaded = self._backend.require()
        start, end = converters.page_bounds(request.page_size, request.page_token)
        tasks, total = loaded.engine.task_page(start, end - start)  # the page's records only
        return evolve_pb2.ListTasksResponse(
            tasks=[converters.task_to_proto(t) for t in tasks], next_page_token=converters.next_page_token(end, total)
        )

    def Improve(self, request, context):
        loaded = self._backend.require()
        request_id = converters.request_id(request.request_id)
        return self._operation(loaded, loaded.jobs.improve(request.task, request_id))

    def WatchEvolution(self, request, context) -> Iterator[evolve_pb2.Event]:
        loaded = self._backend.require()
        if request.after_sequence < 0:
            raise InvalidArgumentError("after_sequence", "must not be negative")
        with self._backend.long_calls.hold(context, "WatchEvolution", loaded.events.wake):
            yield from _follow(loaded.events, request.task, request.after_sequence, context)

    def Predict(self, request, context):
        loaded = self._backend.require()
        with triton_extensions.counting(self._backend.model_stats, loaded.engine.task, request.task, "") as run:
            images = converters.images_from_predict_request(request)
            return converters.predict_response(run.predict(predict, loaded.engine, request.task, images))

    def GetSystem(self, request, context):
        loaded = self._backend.require()
        return converters.summary_to_proto(loaded.engine.summary())

    def DeleteTask(self, request, context):
        loaded = self._backend.require()
        if not request.name:
            raise InvalidArgumentError("name", "a task name is required")
        loaded.jobs.delete_task(request.name)
        self._backend.model_stats.forget(request.name)
        return evolve_pb2.DeleteTaskResponse(name=request.name)


def _follow(events: EventLog, task: str, after: int, context) -> Iterator[evolve_pb2.Event]:
    """Retained events newer than `after`, then live ones until the client leaves
    or the server shuts down."""
    cursor = after
    while True:
        batch, cursor = events.read(cursor, task)
        for logged in batch:
            yield converters.event_to_proto(logged)
        if not context.is_active() or events.closed:
            return
        events.wait_after(cursor, WATCH_POLL_SECONDS, keep_waiting=context.is_active)


class InferenceServicer(infer_pb2_grpc.GRPCInferenceServiceServicer):
    """The Open Inference Protocol (KServe v2): model name = task name."""

    def __init__(self, backend: Backend):
        self._backend = backend

    def ServerLive(self, request, context):
        return infer_pb2.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return infer_pb2.ServerReadyResponse(ready=self._backend.ready)

    def ModelReady(self, request, context):
        loaded = self._backend.require()
        try:
            info = loaded.engine.task(request.name)
        except NotFoundError:
            return infer_pb2.ModelReadyResponse(ready=False)
        ready = info.status == "READY" and request.version in ("", str(info.path_version))
        return infer_pb2.ModelReadyResponse(ready=ready)

    def ServerMetadata(self, request, context):
        return infer_pb2.ServerMetadataResponse(
            name=SERVER_NAME, version=evolve.__version__, extensions=list(triton_extensions.EXTENSIONS)
        )

    def ModelMetadata(self, request, context):
        loaded = self._backend.require()
        if not request.name:
            raise InvalidArgumentError("name", "a model name is required")
        info = loaded.engine.task(request.name)
        if request.version and request.version != str(info.path_version):
            raise NotFoundError("model version", f"{request.name}/{request.version}")
        return triton_extensions.model_metadata(info)

    def ModelInfer(self, request, context):
        loaded = self._backend.require()
        stats = self._backend.model_stats
        with triton_extensions.counting(stats, loaded.engine.task, request.model_name, request.model_version) as run:
            outputs = converters.requested_outputs(request)
            images = converters.images_from_infer_request(request)
            prediction = run.predict(
                predict, loaded.engine, request.model_name, images, request.model_version, field="model_name"
            )
            return converters.infer_response(prediction, request, outputs)

    def ModelConfig(self, request, context):
        loaded = self._backend.require()
        if not request.name:
            raise InvalidArgumentError("name", "a model name is required")
        info = loaded.engine.task(request.name)
        if request.version and request.version != str(info.path_version):
            raise NotFoundError("model version", f"{request.name}/{request.version}")
        return triton_extensions.model_config(info, loaded.engine.options.max_predict_batch)

    def ModelStatistics(self, request, context):
        loaded = self._backend.require()
        return triton_extensions.statistics(
            self._backend.model_stats, loaded.engine.tasks(), request.name, request.version
        )

    def RepositoryIndex(self, request, context):
        loaded = self._backend.require()
        return triton_extensions.repository_index(loaded.engine.tasks(), request.ready)
