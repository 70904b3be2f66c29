"""Each error a client can cause maps to its status code and rich details, and
the server keeps answering afterwards."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
from google.rpc import code_pb2, error_details_pb2
from grpc_status import rpc_status

from service.gen.evolve.v1 import evolve_pb2, evolve_pb2_grpc
from service.gen.inference import grpc_predict_v2_pb2 as infer_pb2
from service.gen.inference import grpc_predict_v2_pb2_grpc as infer_pb2_grpc

TIMEOUT = 30.0
ONE_GENERATION = evolve_pb2.SearchBudget(generations=1, examples_per_round=64, train_rounds=1)


@pytest.fixture(scope="module")
def server(server_factory):
    return server_factory.start("--max-queue", "1", "--max-message-mb", "1")


@pytest.fixture(scope="module")
def channel(server):
    with server.channel() as channel:
        yield channel


@pytest.fixture(scope="module")
def stub(channel):
    return evolve_pb2_grpc.EvolutionServiceStub(channel)


@pytest.fixture(scope="module")
def infer(channel):
    return infer_pb2_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(autouse=True)
def still_live(infer):
    """After every test the server still answers."""
    yield
    assert infer.ServerLive(infer_pb2.ServerLiveRequest(), timeout=TIMEOUT).live


def call_error(call, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        call(request, timeout=TIMEOUT)
    return raised.value


def details(error: grpc.RpcError, kind):
    """The rich details of type `kind` of an error (google.rpc.Status)."""
    status = rpc_status.from_call(error)
    assert status is not None, f"no rich status in {error}"
    assert status.code == error.code().value[0]
    found = []
    for detail in status.details:
        if detail.Is(kind.DESCRIPTOR):
            message = kind()
            detail.Unpack(message)
            found.append(message)
    return found


def assert_invalid(error: grpc.RpcError, field: str) -> None:
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    (bad_request,) = details(error, error_details_pb2.BadRequest)
    assert [v.field for v in bad_request.field_violations] == [field], bad_request
    assert bad_request.field_violations[0].description


def tensor(shape, datatype="UINT8", data=None) -> evolve_pb2.Tensor:
    if data is None:
        data = bytes(int(np.prod(shape)) * (4 if datatype == "FP32" else 1))
    return evolve_pb2.Tensor(shape=list(shape), datatype=datatype, data=data)


def spec(name: str, bundled: str = "digits") -> evolve_pb2.TaskSpec:
    return evolve_pb2.TaskSpec(name=name, bundled=evolve_pb2.BundledSource(name=bundled), budget=ONE_GENERATION)


def cancel_all(stub) -> None:
    for operation in stub.ListOperations(evolve_pb2.ListOperationsRequest(), timeout=TIMEOUT).operations:
        stub.CancelOperation(evolve_pb2.CancelOperationRequest(name=operation.name), timeout=TIMEOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        operations = stub.ListOperations(evolve_pb2.ListOperationsRequest(), timeout=TIMEOUT).operations
        if all(op.done for op in operations):
            return
        time.sleep(0.2)
    raise AssertionError("operations did not stop after cancellation")


# ---- NOT_FOUND ------------------------------------------------------------------------


def test_unknown_task_is_not_found(stub, infer):
    error = call_error(stub.GetTask, evolve_pb2.GetTaskRequest(name="nope"))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    (info,) = details(error, error_details_pb2.ResourceInfo)
    assert (info.resource_type, info.resource_name) == ("task", "nope")
    predict = evolve_pb2.PredictRequest(task="nope", array=tensor([1, 8, 8, 3]))
    assert call_error(stub.Predict, predict).code() == grpc.StatusCode.NOT_FOUND
    request = infer_pb2.ModelMetadataRequest(name="nope")
    assert call_error(infer.ModelMetadata, request).code() == grpc.StatusCode.NOT_FOUND
    operation = evolve_pb2.GetOperationRequest(name="operations/999")
    assert call_error(stub.GetOperation, operation).code() == grpc.StatusCode.NOT_FOUND
    improve = evolve_pb2.ImproveRequest(task="nope")
    assert call_error(stub.Improve, improve).code() == grpc.StatusCode.NOT_FOUND


# ---- INVALID_ARGUMENT --------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_input, field",
    [
        (dict(array=tensor([8, 8])), "array.shape"),
        (dict(array=tensor([1, 8, 8, 4])), "array.shape"),
        (dict(array=tensor([-1, 8, 8, 3], data=b"")), "array.shape"),
        (dict(array=tensor([0, 8, 8, 3])), "array.shape"),
        (dict(array=tensor([1, 8, 8, 3], datatype="INT16", data=bytes(384))), "array.datatype"),
        (dict(array=tensor([2, 8, 8, 3], data=bytes(10))), "array.data"),
        (dict(array=tensor([2**40, 2**20, 8, 3], data=bytes(10))), "array.shape"),
        (dict(array=tensor([1, 2, 2, 3], "FP32", np.full(12, 2.0, "<f4").tobytes())), "array.data"),
        (dict(encoded=evolve_pb2.EncodedImages()), "encoded.images"),
        (dict(), "input"),
    ],
)
def test_bad_predict_input_names_the_field(stub, request_input, field):
    error = call_error(stub.Predict, evolve_pb2.PredictRequest(task="digits", **request_input))
    assert_invalid(error, field)


def test_undecodable_image_names_its_index(stub):
    from PIL import Image
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    images = [buffer.getvalue(), buffer.getvalue(), buffer.getvalue(), b"not an image"]
    request = evolve_pb2.PredictRequest(task="digits", encoded=evolve_pb2.EncodedImages(images=images))
    assert_invalid(call_error(stub.Predict, request), "encoded.images[3]")


@pytest.mark.parametrize(
    "shape, datatype, raw, field",
    [
        ([8, 8], "UINT8", bytes(64), "inputs[0].shape"),
        ([1, 8, 8, 3], "BYTES", bytes(192), "inputs[0].datatype"),
        ([1, 8, 8, 3], "UINT8", bytes(100), "raw_input_contents[0]"),
        ([0, 8, 8, 3], "UINT8", b"", "inputs[0].shape"),
    ],
)
def test_bad_model_infer_input_names_the_field(infer, shape, datatype, raw, field):
    request = infer_pb2.ModelInferRequest(model_name="digits", raw_input_contents=[raw])
    request.inputs.add(name="images", datatype=datatype, shape=shape)
    assert_invalid(call_error(infer.ModelInfer, request), field)


@pytest.mark.parametrize(
    "task_spec, field",
    [
        (evolve_pb2.TaskSpec(bundled=evolve_pb2.BundledSource(name="digits")), "spec.name"),
        (evolve_pb2.TaskSpec(name="x"), "spec.source"),
        (evolve_pb2.TaskSpec(name="Bad Name!", bundled=evolve_pb2.BundledSource(name="digits")), "spec.name"),
        (evolve_pb2.TaskSpec(name="x", bundled=evolve_pb2.BundledSource(name="nope")), "spec.bundled.name"),
        (evolve_pb2.TaskSpec(name="x", npz=evolve_pb2.NpzSource(path="/no/such/file.npz")), "spec.npz.path"),
        (evolve_pb2.TaskSpec(name="x", bundled=evolve_pb2.BundledSource(name="digits"),
                             budget=evolve_pb2.SearchBudget(generations=0)), "spec.budget.generations"),
    ],
)
def test_bad_task_spec_names_the_field(stub, task_spec, field):
    error = call_error(stub.SubmitTask, evolve_pb2.SubmitTaskRequest(spec=task_spec))
    assert_invalid(error, field)
    assert call_error(stub.GetTask, evolve_pb2.GetTaskRequest(name="x")).code() == grpc.StatusCode.NOT_FOUND


# ---- ALREADY_EXISTS, FAILED_PRECONDITION, CANCELLED ------------------------------------------


def test_duplicate_task_name_already_exists(stub):
    first = stub.SubmitTask(evolve_pb2.SubmitTaskRequest(spec=spec("dup"), request_id="a"), timeout=TIMEOUT)
    retry = stub.SubmitTask(evolve_pb2.SubmitTaskRequest(spec=spec("dup"), request_id="a"), timeout=TIMEOUT)
    assert retry.name == first.name
    for request_id in ("b", ""):
        request = evolve_pb2.SubmitTaskRequest(spec=spec("dup"), request_id=request_id)
        error = call_error(stub.SubmitTask, request)
        assert error.code() == grpc.StatusCode.ALREADY_EXISTS
        (info,) = details(error, error_details_pb2.ResourceInfo)
        assert info.resource_name == "dup"
    cancel_all(stub)


def test_task_without_a_model_fails_precondition(stub, infer):
    stub.SubmitTask(evolve_pb2.SubmitTaskRequest(spec=spec("waiting")), timeout=TIMEOUT)
    cancel_all(stub)  # leaves "waiting" without a model
    error = call_error(stub.Predict, evolve_pb2.PredictRequest(task="waiting", array=tensor([1, 8, 8, 3])))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    (info,) = details(error, error_details_pb2.ErrorInfo)
    assert (info.reason, info.domain) == ("TASK_NOT_READY", "evolve")
    assert not infer.ModelReady(infer_pb2.ModelReadyRequest(name="waiting"), timeout=TIMEOUT).ready
    error = call_error(stub.Improve, evolve_pb2.ImproveRequest())
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert details(error, error_details_pb2.ErrorInfo)[0].reason == "NO_READY_TASKS"


def test_cancelled_operation_reports_cancelled(stub):
    operations = stub.ListOperations(evolve_pb2.ListOperationsRequest(), timeout=TIMEOUT).operations
    cancelled = [op for op in operations if op.metadata.state == evolve_pb2.OPERATION_STATE_CANCELLED]
    assert cancelled
    for operation in cancelled:
        assert operation.done and operation.error.code == code_pb2.CANCELLED


# ---- RESOURCE_EXHAUSTED -------------------------------------------------------------------


def test_full_queue_is_resource_exhausted(stub):
    errors = []
    for index in range(3):
        request = evolve_pb2.SubmitTaskRequest(spec=spec(f"queued{index}"))
        try:
            stub.SubmitTask(request, timeout=TIMEOUT)
        except grpc.RpcError as error:
            errors.append(error)
    assert errors, "three submits fit in a queue of one"
    for error in errors:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        (retry,) = details(error, error_details_pb2.RetryInfo)
        assert retry.retry_delay.ToTimedelta().total_seconds() > 0
    cancel_all(stub)


def test_oversize_message_is_resource_exhausted(stub):
    big = tensor([2, 1024, 1024, 1])  # 2 MiB against a 1 MiB limit
    error = call_error(stub.Predict, evolve_pb2.PredictRequest(task="digits", array=big))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_bad_page_token_and_wait_arguments(stub):
    error = call_error(stub.ListTasks, evolve_pb2.ListTasksRequest(page_token="garbage"))
    assert_invalid(error, "page_token")
    error = call_error(stub.WaitOperation, evolve_pb2.WaitOperationRequest(name="operations/1", timeout_seconds=-1))
    assert_invalid(error, "timeout_seconds")
    error = call_error(stub.GetOperation, evolve_pb2.GetOperationRequest(name=""))
    assert_invalid(error, "name")
