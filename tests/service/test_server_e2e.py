"""End to end over a real server: submit, watch, predict (evolve.v1 and the
Open Inference Protocol through tritonclient), improve, cancel, drain on
SIGTERM, and restart from the same state directory."""

from __future__ import annotations

import io
import signal
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from service.gen.evolve.v1 import evolve_pb2, evolve_pb2_grpc
from service.gen.inference import grpc_predict_v2_pb2 as infer_pb2
from service.gen.inference import grpc_predict_v2_pb2_grpc as infer_pb2_grpc

TASKS = ("digits", "digits_parity")
TIMEOUT = 30.0


def submit_request(name: str, bundled: str | None = None, request_id: str = "") -> evolve_pb2.SubmitTaskRequest:
    spec = evolve_pb2.TaskSpec(name=name, bundled=evolve_pb2.BundledSource(name=bundled or name))
    return evolve_pb2.SubmitTaskRequest(spec=spec, request_id=request_id)


def image_tensor(images: np.ndarray) -> evolve_pb2.Tensor:
    return evolve_pb2.Tensor(shape=list(images.shape), datatype="UINT8", data=images.tobytes())


def probe_images() -> np.ndarray:
    return np.random.default_rng(1234).integers(0, 256, size=(16, 8, 8, 3), dtype=np.uint8)


def follow_until(stub, predicate, after: int = 0, task: str = "", timeout: float = 300.0) -> list:
    """Events from WatchEvolution until predicate(events seen) holds."""
    seen = []
    stream = stub.WatchEvolution(evolve_pb2.WatchEvolutionRequest(task=task, after_sequence=after), timeout=timeout)
    try:
        for event in stream:
            seen.append(event)
            if predicate(seen):
                return seen
    finally:
        stream.cancel()
    raise AssertionError(f"stream ended before the condition held; saw {len(seen)} events")


def finished(count: int):
    return lambda events: sum(e.WhichOneof("kind") == "search_finished" for e in events) >= count


def wait_done(stub, name: str, timeout: float = 300.0) -> evolve_pb2.Operation:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        operation = stub.WaitOperation(evolve_pb2.WaitOperationRequest(name=name, timeout_seconds=10), timeout=20)
        if operation.done:
            return operation
    raise AssertionError(f"{name} not done within {timeout} s")


@pytest.fixture(scope="module")
def run(server_factory):
    """A server that has searched both bundled tasks, and what it reported."""
    server = server_factory.start("--seed", "1")
    channel = server.channel()
    stub = evolve_pb2_grpc.EvolutionServiceStub(channel)
    operations = [stub.SubmitTask(submit_request(task, request_id=f"req-{task}"), timeout=TIMEOUT) for task in TASKS]
    events = follow_until(stub, finished(2))
    yield server, channel, stub, operations, events
    channel.close()


def test_submit_returns_queued_operations(run):
    _, _, _, operations, _ = run
    assert [op.name for op in operations] == ["operations/1", "operations/2"]
    for operation, task in zip(operations, TASKS):
        assert not operation.done
        assert operation.metadata.kind == "extension"
        assert operation.metadata.task == task
        assert operation.metadata.state in (evolve_pb2.OPERATION_STATE_QUEUED, evolve_pb2.OPERATION_STATE_RUNNING)


def test_events_arrive_in_order(run):
    _, _, stub, operations, events = run
    sequences = [e.sequence for e in events]
    assert sequences == sorted(set(sequences)) and sequences[0] >= 1
    by_operation = {}
    for event in events:
        by_operation.setdefault(event.operation, []).append(event)
    assert set(by_operation) == {op.name for op in operations}
    for operation, task in zip(operations, TASKS):
        own = by_operation[operation.name]
        kinds = [e.WhichOneof("kind") for e in own]
        assert all(e.task == task for e in own)
        assert kinds[:2] == ["search_started", "generation_started"] and own[1].generation_started.generation == 1
        plan = own[0].search_started.plan
        assert not operation.metadata.HasField("plan")  # a new task's data loads in its search
        final = stub.GetOperation(evolve_pb2.GetOperationRequest(name=operation.name), timeout=TIMEOUT)
        assert final.metadata.plan == plan and "steps of" in plan.description
        assert "candidate_scored" in kinds and "checkpoint_written" in kinds
        assert kinds.index("candidate_scored") < kinds.index("candidate_accepted") < kinds.index("search_finished")
        end = own[kinds.index("search_finished")].search_finished
        assert end.state == "SUCCEEDED" and end.path_id and 0.0 <= end.quality <= 1.0
    # One worker: the first operation's events all come before the second's.
    first, second = (by_operation[op.name] for op in operations)
    assert first[-1].sequence < second[0].sequence


def test_rewatch_replays_only_newer_events(run):
    _, _, stub, _, events = run
    k = events[len(events) // 2].sequence
    expected = [e.sequence for e in events if e.sequence > k]
    replay = follow_until(stub, lambda seen: seen[-1].sequence >= events[-1].sequence, after=k)
    assert [e.sequence for e in replay] == expected
    digits_only = follow_until(stub, lambda seen: seen[-1].search_finished.state, task="digits")
    assert {e.task for e in digits_only} == {"digits"}


def test_operations_succeed_and_submit_is_idempotent(run):
    _, _, stub, operations, _ = run
    for operation, task in zip(operations, TASKS):
        done = wait_done(stub, operation.name)
        assert done.metadata.state == evolve_pb2.OPERATION_STATE_SUCCEEDED
        assert done.WhichOneof("result") == "response"
        assert done.response.task.name == task
        assert done.response.task.status == evolve_pb2.TASK_STATUS_READY
        assert done.metadata.candidates_scored == 2 and done.metadata.generation == 1
        again = stub.SubmitTask(submit_request(task, request_id=f"req-{task}"), timeout=TIMEOUT)
        assert again.name == operation.name and again.done
    listed = stub.ListOperations(evolve_pb2.ListOperationsRequest(), timeout=TIMEOUT).operations
    assert [op.name for op in listed] == [op.name for op in operations]
    paged = stub.ListOperations(evolve_pb2.ListOperationsRequest(page_size=1), timeout=TIMEOUT)
    assert len(paged.operations) == 1 and paged.next_page_token
    rest = stub.ListOperations(
        evolve_pb2.ListOperationsRequest(page_size=1, page_token=paged.next_page_token), timeout=TIMEOUT
    )
    assert rest.operations[0].name == "operations/2" and not rest.next_page_token


def test_tasks_and_system(run):
    _, _, stub, _, _ = run
    tasks = stub.ListTasks(evolve_pb2.ListTasksRequest(), timeout=TIMEOUT).tasks
    assert [t.name for t in tasks] == sorted(TASKS)
    digits = stub.GetTask(evolve_pb2.GetTaskRequest(name="digits"), timeout=TIMEOUT)
    assert digits.status == evolve_pb2.TASK_STATUS_READY and digits.num_classes == 10
    assert digits.path_version == 1 and digits.components and digits.spec.bundled.name == "digits"
    assert digits.flops > 0 and digits.params > 0 and "learning_rate" in digits.hparams
    system = stub.GetSystem(evolve_pb2.GetSystemRequest(), timeout=TIMEOUT)
    assert system.num_tasks == 2 and system.checkpoint_step >= 3
    assert set(system.params_per_task) == set(TASKS)
    assert system.dot.startswith("graph sharing {") and '"digits"' in system.dot
    assert system.config_name == "tiny" and system.root_model.startswith("random:")


def test_predict_arrays_and_encoded_images(run):
    _, _, stub, _, _ = run
    from PIL import Image

    images = probe_images()
    response = stub.Predict(evolve_pb2.PredictRequest(task="digits", array=image_tensor(images)), timeout=TIMEOUT)
    probabilities = np.frombuffer(response.probabilities.data, "<f4").reshape(tuple(response.probabilities.shape))
    assert probabilities.shape == (16, 10) and response.probabilities.datatype == "FP32"
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert list(response.classes) == probabilities.argmax(axis=1).tolist()
    assert list(response.class_names) == [str(c) for c in response.classes]
    assert response.path_version == 1 and response.task == "digits"

    encoded = []
    for image in images[:3]:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    from_png = stub.Predict(
        evolve_pb2.PredictRequest(task="digits", encoded=evolve_pb2.EncodedImages(images=encoded)), timeout=TIMEOUT
    )
    assert list(from_png.classes) == list(response.classes[:3])


def test_tritonclient_model_infer_matches_predict(run):
    server, _, stub, _, _ = run
    triton = pytest.importorskip("tritonclient.grpc")
    images = probe_images()
    expected = stub.Predict(evolve_pb2.PredictRequest(task="digits_parity", array=image_tensor(images)), timeout=TIMEOUT)
    client = triton.InferenceServerClient(server.address)
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("digits_parity")
        assert not client.is_model_ready("nope")
        assert client.get_server_metadata().name == "evolve"
        metadata = client.get_model_metadata("digits_parity")
        assert metadata.platform == "evolve-jax" and list(metadata.versions) == ["1"]
        assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("images", "UINT8", [-1, -1, -1, 3])]
        assert [(t.name, list(t.shape)) for t in metadata.outputs] == [("probabilities", [-1, 2]), ("classes", [-1])]
        inputs = [triton.InferInput("images", list(images.shape), "UINT8")]
        inputs[0].set_data_from_numpy(images)
        result = client.infer("digits_parity", inputs, request_id="r1")
        assert result.as_numpy("classes").tolist() == list(expected.classes)
        assert result.as_numpy("probabilities").tobytes() == expected.probabilities.data
        assert result.get_response().model_version == "1" and result.get_response().id == "r1"
        only = client.infer("digits_parity", inputs, model_version="1",
                            outputs=[triton.InferRequestedOutput("classes")])
        assert only.as_numpy("probabilities") is None
        assert only.as_numpy("classes").tolist() == list(expected.classes)
    finally:
        client.close()


def test_kserve_typed_contents_match_raw(run):
    _, channel, stub, _, _ = run
    images = probe_images()[:2]
    infer = infer_pb2_grpc.GRPCInferenceServiceStub(channel)
    request = infer_pb2.ModelInferRequest(model_name="digits")
    tensor = request.inputs.add(name="images", datatype="UINT8", shape=list(images.shape))
    tensor.contents.uint_contents.extend(images.reshape(-1).tolist())
    response = infer.ModelInfer(request, timeout=TIMEOUT)
    expected = stub.Predict(evolve_pb2.PredictRequest(task="digits", array=image_tensor(images)), timeout=TIMEOUT)
    assert [o.name for o in response.outputs] == ["probabilities", "classes"]
    assert response.raw_output_contents[0] == expected.probabilities.data


def test_reflection_lists_services(run):
    _, channel, _, _, _ = run
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                          timeout=TIMEOUT)
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"evolve.v1.EvolutionService", "inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names
    described = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        file_containing_symbol="inference.GRPCInferenceService")]), timeout=TIMEOUT)
    assert all(r.WhichOneof("message_response") == "file_descriptor_response" for r in described)


def test_improve_and_cancel(run):
    _, _, stub, _, _ = run
    improve = stub.Improve(evolve_pb2.ImproveRequest(task="digits", request_id="imp-1"), timeout=TIMEOUT)
    assert improve.metadata.kind == "generalization" and improve.metadata.task == "digits"
    assert stub.Improve(evolve_pb2.ImproveRequest(task="digits", request_id="imp-1"), timeout=TIMEOUT).name == improve.name
    every = stub.Improve(evolve_pb2.ImproveRequest(), timeout=TIMEOUT)  # queued behind the first
    cancelled = stub.CancelOperation(evolve_pb2.CancelOperationRequest(name=every.name), timeout=TIMEOUT)
    assert cancelled.done and cancelled.metadata.state == evolve_pb2.OPERATION_STATE_CANCELLED
    assert cancelled.error.code == grpc.StatusCode.CANCELLED.value[0]
    done = wait_done(stub, improve.name)
    assert done.metadata.state == evolve_pb2.OPERATION_STATE_SUCCEEDED
    assert done.response.task.path_version >= 1
    # Cancelling a finished operation is not an error and changes nothing.
    again = stub.CancelOperation(evolve_pb2.CancelOperationRequest(name=improve.name), timeout=TIMEOUT)
    assert again.metadata.state == evolve_pb2.OPERATION_STATE_SUCCEEDED


def collect_in_background(stub) -> tuple[list, threading.Thread]:
    """Follows every event from the start until the server ends the stream."""
    collected: list = []
    stream = stub.WatchEvolution(evolve_pb2.WatchEvolutionRequest(), timeout=300)

    def collect() -> None:
        try:
            for event in stream:
                collected.append(event)
        except grpc.RpcError as error:
            collected.append(error)

    thread = threading.Thread(target=collect, daemon=True)
    thread.start()
    return collected, thread


def test_sigterm_drains_and_restart_restores(run, server_factory):
    server, channel, stub, _, _ = run
    images = probe_images()
    before = {
        task: stub.Predict(evolve_pb2.PredictRequest(task=task, array=image_tensor(images)), timeout=TIMEOUT)
        for task in TASKS
    }
    collected, collector = collect_in_background(stub)
    # A search that SIGTERM interrupts: it must be queued again after the restart.
    interrupted = stub.SubmitTask(submit_request("loops", "digits_loops"), timeout=TIMEOUT)
    follow_until(stub, lambda seen: seen[-1].WhichOneof("kind") == "generation_started", task="loops")
    assert server.stop(signal.SIGTERM) == 0
    assert "final checkpoint" in server.log()
    collector.join(30)
    assert not collector.is_alive() and collected, "the watch stream did not end with the server"
    assert all(isinstance(e, evolve_pb2.Event) for e in collected), collected[-1]
    last = collected[-1]
    assert last.task == "loops" and last.search_finished.state == "CANCELLED"

    restarted = server_factory.start(state_dir=server.state_dir)
    with restarted.channel() as new_channel:
        new_stub = evolve_pb2_grpc.EvolutionServiceStub(new_channel)
        tasks = {t.name: t for t in new_stub.ListTasks(evolve_pb2.ListTasksRequest(), timeout=TIMEOUT).tasks}
        for task in TASKS:
            assert tasks[task].status == evolve_pb2.TASK_STATUS_READY
            after = new_stub.Predict(evolve_pb2.PredictRequest(task=task, array=image_tensor(images)), timeout=TIMEOUT)
            assert after.probabilities.data == before[task].probabilities.data, task
            assert after.path_version == before[task].path_version
        resumed = wait_done(new_stub, interrupted.name)
        assert resumed.metadata.state == evolve_pb2.OPERATION_STATE_SUCCEEDED
        assert resumed.response.task.status == evolve_pb2.TASK_STATUS_READY
        listed = new_stub.ListOperations(evolve_pb2.ListOperationsRequest(), timeout=TIMEOUT).operations
        assert [op.name for op in listed][:2] == ["operations/1", "operations/2"]
        assert all(op.done for op in listed)
        # The interrupted run's events are replayed as they were numbered, and
        # new ones continue after them: nothing is numbered twice.
        replayed = follow_until(new_stub, finished(2), task="loops")
        old = {e.sequence: e for e in collected if e.task == "loops"}
        earlier = [e for e in replayed if e.sequence <= last.sequence]
        assert earlier and all(old[e.sequence] == e for e in earlier)
        assert [e for e in replayed if e.sequence > last.sequence][0].sequence == last.sequence + 1
    assert restarted.stop(signal.SIGINT) == 0
