"""Fast in-process tests of the server's parts: error mapping, auth rules,
the event log, the job queue (on a fake engine) and the converters."""

from __future__ import annotations

import io
import threading
import time
import types as pytypes
from concurrent import futures

import grpc
import numpy as np
import pytest
from google.rpc import code_pb2, error_details_pb2
from grpc_status import rpc_status

from evolve import errors as domain
from evolve.events import CandidateAccepted, CandidateScored, GenerationStarted, SearchFinished
from evolve.types import BundledSource, ImageFolderSource, NpzSource, SearchBudget, TaskSpec, TfdsSource
from evolve.search.budget import SearchPlan
from service import converters, jobs as jobs_lib
from service.auth import MUTATING, OPEN, READ, AuthInterceptor, access_class, bearer_token
from service.errors import ErrorInterceptor, UnavailableError, status_of
from service.event_log import EventLog
from service.gen.evolve.v1 import evolve_pb2, evolve_pb2_grpc
from service.gen.inference import grpc_predict_v2_pb2 as infer_pb2

# ---- errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error, code, detail",
    [
        (domain.InvalidArgumentError("spec.name", "bad"), code_pb2.INVALID_ARGUMENT, error_details_pb2.BadRequest),
        (domain.NotFoundError("task", "x"), code_pb2.NOT_FOUND, error_details_pb2.ResourceInfo),
        (domain.AlreadyExistsError("task", "x"), code_pb2.ALREADY_EXISTS, error_details_pb2.ResourceInfo),
        (domain.ResourceExhaustedError("full", 3.0), code_pb2.RESOURCE_EXHAUSTED, error_details_pb2.RetryInfo),
        (domain.FailedPreconditionError("WHY", "no"), code_pb2.FAILED_PRECONDITION, error_details_pb2.ErrorInfo),
        (domain.CancelledError("stop"), code_pb2.CANCELLED, None),
        (domain.CorruptCheckpointError("bad bytes"), code_pb2.DATA_LOSS, None),
        (UnavailableError("loading", 2.0), code_pb2.UNAVAILABLE, error_details_pb2.RetryInfo),
        (KeyError("secret internals"), code_pb2.INTERNAL, None),
    ],
)
def test_status_of_maps_each_domain_error(error, code, detail):
    status = status_of(error)
    assert status.code == code
    if detail is None:
        assert not status.details
    else:
        assert status.details[0].Is(detail.DESCRIPTOR)
    if code == code_pb2.INTERNAL:
        assert "secret" not in status.message


class _Broken(evolve_pb2_grpc.EvolutionServiceServicer):
    def GetTask(self, request, context):
        raise RuntimeError("boom")

    def GetSystem(self, request, context):
        return evolve_pb2.SystemSummary(num_tasks=7)

    def WatchEvolution(self, request, context):
        yield evolve_pb2.Event(sequence=1)
        raise domain.NotFoundError("task", request.task)

    def ListTasks(self, request, context):
        context.abort(grpc.StatusCode.PERMISSION_DENIED, "handler's own abort")


@pytest.fixture
def broken_stub():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), interceptors=[ErrorInterceptor()])
    evolve_pb2_grpc.add_EvolutionServiceServicer_to_server(_Broken(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield evolve_pb2_grpc.EvolutionServiceStub(channel)
    server.stop(None)


def test_interceptor_turns_crashes_into_internal_and_keeps_serving(broken_stub):
    with pytest.raises(grpc.RpcError) as raised:
        broken_stub.GetTask(evolve_pb2.GetTaskRequest(name="x"), timeout=5)
    assert raised.value.code() == grpc.StatusCode.INTERNAL and "boom" not in raised.value.details()
    stream = broken_stub.WatchEvolution(evolve_pb2.WatchEvolutionRequest(task="gone"), timeout=5)
    assert next(stream).sequence == 1
    with pytest.raises(grpc.RpcError) as raised:
        next(stream)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert rpc_status.from_call(raised.value).details[0].Is(error_details_pb2.ResourceInfo.DESCRIPTOR)
    with pytest.raises(grpc.RpcError) as raised:
        broken_stub.ListTasks(evolve_pb2.ListTasksRequest(), timeout=5)
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert broken_stub.GetSystem(evolve_pb2.GetSystemRequest(), timeout=5).num_tasks == 7


# ---- auth ---------------------------------------------------------------------------------


def test_access_classes():
    assert access_class("/evolve.v1.EvolutionService/SubmitTask") == MUTATING
    assert access_class("/evolve.v1.EvolutionService/CancelOperation") == MUTATING
    assert access_class("/evolve.v1.EvolutionService/WatchEvolution") == READ
    assert access_class("/inference.GRPCInferenceService/ModelInfer") == READ
    assert access_class("/inference.GRPCInferenceService/ServerLive") == OPEN
    assert access_class("/grpc.health.v1.Health/Check") == OPEN
    assert access_class("/evolve.v1.EvolutionService/DeleteTask") == MUTATING
    assert access_class("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo") == READ


def test_bearer_tokens_and_checks():
    assert bearer_token([("authorization", "Bearer abc")]) == "abc"
    assert bearer_token([("Authorization", b"bearer  abc ")]) == "abc"
    assert bearer_token([("authorization", "Basic abc")]) is None
    assert bearer_token(None) is None
    auth = AuthInterceptor("full", "read")
    submit, predict = "/evolve.v1.EvolutionService/SubmitTask", "/evolve.v1.EvolutionService/Predict"
    assert auth.check(submit, [("authorization", "Bearer full")]) is None
    assert auth.check(submit, [("authorization", "Bearer read")])[0] == grpc.StatusCode.PERMISSION_DENIED
    assert auth.check(submit, [])[0] == grpc.StatusCode.UNAUTHENTICATED
    assert auth.check(predict, [("authorization", "Bearer read")]) is None
    assert auth.check(predict, [("authorization", "Bearer nope")])[0] == grpc.StatusCode.UNAUTHENTICATED
    token_only = AuthInterceptor("full")
    assert token_only.check(predict, [])[0] == grpc.StatusCode.UNAUTHENTICATED  # secure by default
    assert AuthInterceptor(None).check(submit, []) is None
    with pytest.raises(ValueError):
        AuthInterceptor(None, "read")



def test_a_read_only_server_refuses_authorised_changes_only():
    submit, predict = "/evolve.v1.EvolutionService/SubmitTask", "/evolve.v1.EvolutionService/Predict"
    cancel = "/google.longrunning.Operations/CancelOperation"
    replica = AuthInterceptor("full", read_only=True)
    for method in (submit, cancel):
        code, message = replica.check(method, [("authorization", "Bearer full")])
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "read-only replica" in message
    assert replica.check(predict, [("authorization", "Bearer full")]) is None
    assert replica.check(submit, [])[0] == grpc.StatusCode.UNAUTHENTICATED  # no token: the token's answer first
    assert AuthInterceptor(None, read_only=True).check(submit, [])[0] == grpc.StatusCode.FAILED_PRECONDITION
    assert AuthInterceptor(None, read_only=True).check("/grpc.health.v1.Health/Check", []) is None


def test_read_only_flags():
    import argparse

    from service.server import add_serve_arguments, options_from_args

    def options(*argv):
        return options_from_args(add_serve_arguments(argparse.ArgumentParser()).parse_args(list(argv)))

    assert (options().read_only, options().follow_seconds) == (False, 2.0)
    assert (options("--read-only", "--follow-seconds", "0.5").read_only, options("--follow-seconds", "0.5").follow_seconds) \
        == (True, 0.5)
    with pytest.raises(ValueError, match="--follow-seconds must be positive"):
        options("--read-only", "--follow-seconds", "0")


# ---- event log -------------------------------------------------------------------------------


def _started(task: str, generation: int = 0) -> GenerationStarted:
    return GenerationStarted(task, generation, 2, 2)


def test_event_log_numbers_filters_and_retains():
    log = EventLog(start_sequence=41, retention=3)
    for index in range(5):
        log.append(_started("a" if index % 2 == 0 else "b", index), "operations/1")
    assert log.last_sequence == 46
    events, position = log.read(0)
    assert [e.sequence for e in events] == [44, 45, 46] and position == 46
    events, position = log.read(44, task="b")
    assert [e.sequence for e in events] == [45] and position == 46
    assert log.read(46) == ([], 46)


def test_event_log_wakes_waiters_and_closes():
    log = EventLog()
    assert not log.wait_after(0, timeout=0.01)
    timer = threading.Timer(0.05, lambda: log.append(_started("a")))
    timer.start()
    assert log.wait_after(0, timeout=5)
    started = time.monotonic()
    threading.Timer(0.05, log.close).start()
    assert not log.wait_after(1, timeout=5) and log.closed
    assert time.monotonic() - started < 2


# ---- jobs on a fake engine -----------------------------------------------------------------


class FakeEngine:
    """The engine surface the job queue uses; searches block until released."""

    def __init__(self):
        self.status: dict[str, str] = {}
        self.saved: list[dict] = []
        self.extra_state = None
        self.release = threading.Event()
        self.searches: list[tuple[str, str]] = []

    def add_task(self, spec):
        if spec.name in self.status:
            raise domain.AlreadyExistsError("task", spec.name)
        self.status[spec.name] = "PENDING"

    def task(self, name):
        if name not in self.status:
            raise domain.NotFoundError("task", name)
        return pytypes.SimpleNamespace(name=name, status=self.status[name], best_score=None, validation_accuracy=None)

    def tasks(self):
        return [self.task(name) for name in sorted(self.status)]

    def search_plan(self, task, kind):
        self.task(task)
        return SearchPlan(kind, generations=1, candidates_per_generation=2, rounds=3, examples_per_round=64,
                          batch_size=32, train_examples=100, validation_examples=20)

    def run_search(self, task, kind, *, cancel, on_event):
        self.searches.append((task, kind))
        on_event(GenerationStarted(task, 0, 1, 2))
        while not self.release.wait(0.01):
            if cancel.is_set():
                on_event(SearchFinished(task, "", 0.0, 0.0, 0.0, "CANCELLED"))
                raise domain.CancelledError("search cancelled")
        on_event(CandidateScored(task, "p1", "p0", "__root__", 0, 0.5, 0.5, 10.0, 20.0, (), True, 0.1, 0.0))
        on_event(CandidateAccepted(task, "p1", 0.5, 0.5))
        self.status[task] = "READY"

    def save(self, *, extra=None):
        self.saved.append(dict(extra if extra is not None else self.extra_state()))
        return len(self.saved)

    def check_storage(self):
        pass

    def requeued(self, task):
        if self.status.get(task) == "FAILED":
            self.status[task] = "PENDING"

    def forget_task(self, name):
        self.status.pop(name, None)

    def delete_task(self, name):
        self.task(name)
        del self.status[name]


def _spec(name: str) -> TaskSpec:
    return TaskSpec(name, BundledSource("digits"))


def _jobs(engine: FakeEngine, max_queue: int = 4) -> jobs_lib.Jobs:
    queue = jobs_lib.Jobs(engine, EventLog(), max_queue=max_queue)
    engine.extra_state = queue.extra_state
    return queue


def _wait_state(queue, name, state, timeout=5.0):
    deadline = time.monotonic() + timeout
    while queue.get(name).state != state:
        assert time.monotonic() < deadline, queue.get(name)
        time.sleep(0.01)


def test_jobs_run_searches_in_order_with_progress():
    engine = FakeEngine()
    queue = _jobs(engine)
    first = queue.submit(_spec("a"), "r1")
    assert queue.submit(_spec("a"), "r1").name == first.name  # same request id: same operation
    with pytest.raises(domain.AlreadyExistsError):
        queue.submit(_spec("a"), "r2")
    assert engine.saved and engine.saved[-1]["operations"][0]["state"] == "QUEUED"  # saved before it runs
    assert first.plan.steps_per_candidate == 6  # the budget is known before the search runs
    assert jobs_lib.OperationRecord.from_dict(engine.saved[-1]["operations"][0]).plan == first.plan
    assert converters.operation_to_proto(first).metadata.plan.steps_per_candidate == 6
    second = queue.submit(_spec("b"))
    queue.start()
    _wait_state(queue, first.name, "RUNNING")
    engine.release.set()
    done = queue.wait(second.name, timeout=5)
    assert done.state == "SUCCEEDED" and queue.get(first.name).state == "SUCCEEDED"
    assert engine.searches == [("a", "extension"), ("b", "extension")]
    assert (done.generation, done.generations, done.candidates_scored, done.best_score) == (1, 1, 1, 0.5)
    assert engine.saved[-1]["operations"][1]["state"] == "SUCCEEDED"
    improve = queue.improve("", "i1")
    assert improve.kind == "generalization" and queue.wait(improve.name, timeout=5).state == "SUCCEEDED"
    assert engine.searches[-2:] == [("a", "generalization"), ("b", "generalization")]
    queue.shutdown(timeout=5)


def test_jobs_queue_bound_cancel_and_shutdown_requeue():
    engine = FakeEngine()
    queue = _jobs(engine, max_queue=1)
    running = queue.submit(_spec("a"))
    queue.start()
    _wait_state(queue, running.name, "RUNNING")
    waiting = queue.submit(_spec("b"))
    with pytest.raises(domain.ResourceExhaustedError):
        queue.submit(_spec("c"))
    assert "c" not in engine.status  # a rejected submit registers nothing
    cancelled = queue.cancel(waiting.name)
    assert cancelled.state == "CANCELLED" and cancelled.error.code == code_pb2.CANCELLED
    later = queue.submit(_spec("c"))
    queue.shutdown(timeout=5)  # interrupts "a": it goes back to the queue
    assert queue.get(running.name).state == "QUEUED"
    with pytest.raises(UnavailableError):
        queue.submit(_spec("d"))

    extra = queue.extra_state(clean_shutdown=True)
    assert jobs_lib.event_log_start(extra) == extra["event_sequence"]
    assert jobs_lib.event_log_start({**extra, "clean_shutdown": False}) > extra["event_sequence"]
    assert jobs_lib.event_log_start({}) == 0
    restored = jobs_lib.Jobs(engine, EventLog(), max_queue=1)
    restored.restore(extra)
    assert [r.state for r in restored.list()] == ["QUEUED", "CANCELLED", "QUEUED"]
    assert restored.get(waiting.name).error.code == code_pb2.CANCELLED
    engine.release.set()
    restored.start()
    assert restored.wait(later.name, timeout=5).state == "SUCCEEDED"
    assert restored.get(running.name).state == "SUCCEEDED"
    assert restored.submit(_spec("e")).name == "operations/4"
    restored.shutdown(timeout=5)


def test_jobs_cancel_running_and_retry_a_task_without_model():
    engine = FakeEngine()
    queue = _jobs(engine)
    queue.start()
    operation = queue.submit(_spec("a"))
    _wait_state(queue, operation.name, "RUNNING")
    queue.cancel(operation.name)
    assert queue.wait(operation.name, timeout=5).state == "CANCELLED"
    with pytest.raises(domain.NotFoundError):
        queue.improve("nope")
    retry = queue.improve("a")  # no model yet, nothing queued: its first search again
    assert retry.kind == "extension"
    with pytest.raises(domain.FailedPreconditionError):
        queue.improve("a")
    engine.release.set()
    assert queue.wait(retry.name, timeout=5).state == "SUCCEEDED"
    queue.shutdown(timeout=5)


# ---- converters --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        TaskSpec("t", TfdsSource("cifar10", data_dir="/d", validation_split="train[:1%]", test_split=None)),
        TaskSpec("t", TfdsSource("cifar10")),
        TaskSpec("t", NpzSource("/x.npz"), SearchBudget(generations=3, examples_per_round=64)),
        TaskSpec("t", ImageFolderSource("/imgs", 0.2, 0.1)),
        TaskSpec("t", BundledSource("digits")),
    ],
)
def test_task_specs_round_trip(spec):
    assert converters.spec_from_proto(converters.spec_to_proto(spec)) == spec


def test_spec_error_fields_are_relative_to_the_request():
    proto = TaskSpec("t", TfdsSource(name="x"))
    assert converters.spec_error_field("source.name", proto) == "spec.tfds.name"
    assert converters.spec_error_field("name", proto) == "spec.name"
    assert converters.spec_error_field("spec.name", proto) == "spec.name"


def test_single_images_and_typed_kserve_contents():
    image = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    batch = converters.array_from_bytes(image.tobytes(), "UINT8", [4, 4, 3], "array")
    assert batch.shape == (1, 4, 4, 3)
    request = infer_pb2.ModelInferRequest(model_name="t")
    tensor = request.inputs.add(name="images", datatype="FP32", shape=[1, 2, 2, 3])
    tensor.contents.fp32_contents.extend([0.5] * 12)
    assert converters.images_from_infer_request(request).dtype == np.float32
    tensor.contents.fp32_contents.append(0.5)
    with pytest.raises(domain.InvalidArgumentError) as raised:
        converters.images_from_infer_request(request)
    assert raised.value.field == "inputs[0].contents"


def test_encoded_images_must_share_a_size():
    from PIL import Image

    blobs = []
    for size in ((8, 8), (8, 8), (6, 8)):
        buffer = io.BytesIO()
        Image.new("L", size).save(buffer, format="JPEG")
        blobs.append(buffer.getvalue())
    batch = converters.images_from_encoded(evolve_pb2.EncodedImages(images=blobs[:2]))
    assert batch.shape == (2, 8, 8, 3) and batch.dtype == np.uint8
    with pytest.raises(domain.InvalidArgumentError) as raised:
        converters.images_from_encoded(evolve_pb2.EncodedImages(images=blobs))
    assert raised.value.field == "encoded.images[2]"


def test_operation_error_survives_the_manifest():
    error = jobs_lib.OperationError.of(domain.FailedPreconditionError("WHY", "no"))
    record = jobs_lib.OperationRecord("operations/3", "extension", "t", "", "FAILED", 1.0, 2.0, error=error)
    again = jobs_lib.OperationRecord.from_dict(record.to_dict())
    assert again == record
    proto = converters.operation_to_proto(again)
    assert proto.done and proto.error.code == code_pb2.FAILED_PRECONDITION
    assert proto.error.details[0].Is(error_details_pb2.ErrorInfo.DESCRIPTOR)


def test_idle_worker_cycles_generalization_round_robin():
    engine = FakeEngine()
    queue = jobs_lib.Jobs(engine, EventLog(), max_queue=4, cycle_idle_seconds=0.05)
    engine.extra_state = queue.extra_state
    engine.release.set()
    for name in ("a", "b"):
        queue.submit(_spec(name))
    queue.start()
    deadline = time.monotonic() + 10
    while len([s for s in engine.searches if s[1] == "generalization"]) < 3:
        assert time.monotonic() < deadline, engine.searches
        time.sleep(0.01)
    queue.shutdown(timeout=5)
    cycled = [task for task, kind in engine.searches if kind == "generalization"]
    assert cycled[:3] == ["a", "b", "a"]
    assert engine.searches[:2] == [("a", "extension"), ("b", "extension")]


def test_no_idle_cycling_by_default():
    engine = FakeEngine()
    queue = _jobs(engine)
    engine.release.set()
    done = queue.submit(_spec("a"))
    queue.start()
    queue.wait(done.name, timeout=5)
    time.sleep(0.3)
    queue.shutdown(timeout=5)
    assert engine.searches == [("a", "extension")]
