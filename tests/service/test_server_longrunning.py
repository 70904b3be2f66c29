"""google.longrunning.Operations over a real server (issue 11, item 3), and the
evolve.v1 operation fields that now match it (`filter`, a Duration `timeout`,
DeleteOperation), with the deprecated ones still working.

One server, started with a token and a read token: a small bundled task and
a slow one are submitted through evolve.v1, then driven with the standard
generated stub (google.longrunning.operations_pb2_grpc.OperationsStub) and
with google-api-core's OperationsClient and operation future; metadata and
response are unpacked from Any into evolve types. Deletions must survive a
kill -9 and a restart on the same state directory. Unit checks of the filter grammar, the
wait timeout and the access classes need no server.
"""

from __future__ import annotations

import math
import signal
import time

import grpc
import pytest
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from evolve.errors import InvalidArgumentError
from service import operation_filter
from service.auth import MUTATING, READ, access_class
from service.gen.evolve.v1 import evolve_pb2, evolve_pb2_grpc
from service.jobs import OperationRecord
from service.longrunning import SERVICE_NAME, standard_operation
from service.servicers import MAX_WAIT_SECONDS, wait_seconds
from tests.service.conftest import health_status

TOKEN = "lro-full-token"
READ_TOKEN = "lro-read-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
READ_AUTH = (("authorization", f"Bearer {READ_TOKEN}"),)
TIMEOUT = 30.0
SEARCH_TIMEOUT = 300.0
SLOW_GENERATIONS = 40  # a search that never ends within the test unless cancelled


def duration(seconds: float) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromNanoseconds(int(seconds * 1e9))
    return value


def submit_request(name: str, generations: int = 0) -> evolve_pb2.SubmitTaskRequest:
    spec = evolve_pb2.TaskSpec(name=name, bundled=evolve_pb2.BundledSource(name="digits"))
    if generations:
        spec.budget.generations = generations
    return evolve_pb2.SubmitTaskRequest(spec=spec)


def rpc_error(call, request, metadata=AUTH) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        call(request, timeout=TIMEOUT, metadata=metadata)
    return raised.value


def bad_request_fields(error: grpc.RpcError) -> list[str]:
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    fields = []
    for detail in rpc_status.from_call(error).details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            fields += [violation.field for violation in bad_request.field_violations]
    return fields


def unpack_metadata(operation: operations_pb2.Operation) -> evolve_pb2.OperationMetadata:
    metadata = evolve_pb2.OperationMetadata()
    assert operation.metadata.Unpack(metadata), operation.metadata.type_url
    return metadata


def standard_wait_done(stub, name: str) -> operations_pb2.Operation:
    deadline = time.monotonic() + SEARCH_TIMEOUT
    while time.monotonic() < deadline:
        request = operations_pb2.WaitOperationRequest(name=name, timeout=duration(20))
        operation = stub.WaitOperation(request, timeout=40, metadata=AUTH)
        if operation.done:
            return operation
    raise AssertionError(f"{name} not done within {SEARCH_TIMEOUT} s")


def listed(stub, filter_text: str, request_type=operations_pb2.ListOperationsRequest) -> list[str]:
    response = stub.ListOperations(request_type(filter=filter_text), timeout=TIMEOUT, metadata=AUTH)
    return [operation.name for operation in response.operations]


# ---- units (no server) -----------------------------------------------------------------------------


def _record(name: str, task: str, state: str, kind: str = "extension") -> OperationRecord:
    return OperationRecord(name, kind, task, "", state, 0.0, 0.0)


RECORDS = [
    _record("operations/1", "digits", "SUCCEEDED"),
    _record("operations/2", "slow", "RUNNING"),
    _record("operations/3", "digits", "QUEUED", "generalization"),
    _record("operations/4", 'we"ird', "CANCELLED"),
]


@pytest.mark.parametrize("text, expected", [
    ("", [1, 2, 3, 4]),
    ('task = "digits"', [1, 3]),
    ('task="digits"', [1, 3]),
    ("task=digits", [1, 3]),
    ("  task  =  digits  ", [1, 3]),
    ("done = true", [1, 4]),
    ("done=false", [2, 3]),
    ("done = FALSE", [2, 3]),
    ('task = "digits" AND done = false', [3]),
    ("state = RUNNING", [2]),
    ("state = OPERATION_STATE_succeeded", [1]),
    ('kind = "generalization"', [3]),
    ('task = "digits" AND task = "slow"', []),
    ('task = "nope"', []),
    (operation_filter.task_filter('we"ird'), [4]),
])
def test_filter_matches(text: str, expected: list[int]) -> None:
    wanted = operation_filter.parse(text)
    assert [r.number for r in RECORDS if wanted.matches(r)] == expected


@pytest.mark.parametrize("text, says", [
    ('task != "digits"', "only '='"),
    ('task : "digits"', "only '='"),
    ('name = "x"', "unknown field 'name'"),
    ('task = "a" OR done = true', "expected AND"),
    ('task = "a" and done = true', "expected AND"),
    ("NOT done = true", "unexpected 'NOT'"),
    ("(done = true)", "unexpected '('"),
    ("done = yes", "true or false"),
    ('done = "true"', "true or false"),
    ("state = PAUSED", "state takes one of"),
    ('task = "unclosed', "not closed"),
    ("task =", "incomplete term"),
    ("task", "incomplete term"),
    ("done = true AND", "incomplete term"),
    ("task = = x", "expected a value"),
    ("a\x00", "NUL"),
    ("x" * 3000, "at most"),
])
def test_filter_refuses_what_it_does_not_support(text: str, says: str) -> None:
    with pytest.raises(InvalidArgumentError) as raised:
        operation_filter.parse(text)
    assert raised.value.field == "filter"
    assert says in str(raised.value)


def test_deprecated_task_field_and_filter_exclude_each_other() -> None:
    assert operation_filter.list_filter("", "digits").matches(RECORDS[0])
    assert not operation_filter.list_filter("", "digits").matches(RECORDS[1])
    with pytest.raises(InvalidArgumentError) as raised:
        operation_filter.list_filter("done = true", "digits")
    assert raised.value.field == "task"


def test_wait_seconds() -> None:
    request = evolve_pb2.WaitOperationRequest
    assert wait_seconds(request()) == MAX_WAIT_SECONDS
    assert wait_seconds(request(timeout_seconds=2.5)) == 2.5
    assert wait_seconds(request(timeout=duration(1.25))) == 1.25
    assert wait_seconds(request(timeout=duration(0))) == 0.0  # present and zero: answer at once
    assert wait_seconds(request(timeout=duration(10**7))) == MAX_WAIT_SECONDS
    bad = [
        (request(timeout=duration(1), timeout_seconds=1), "timeout_seconds"),
        (request(timeout=duration(-1)), "timeout"),
        (request(timeout=duration_pb2.Duration(seconds=1, nanos=-5)), "timeout"),
        (request(timeout=duration_pb2.Duration(nanos=2_000_000_000)), "timeout"),
        (request(timeout_seconds=math.nan), "timeout_seconds"),
        (request(timeout_seconds=-1), "timeout_seconds"),
    ]
    for message, field in bad:
        with pytest.raises(InvalidArgumentError) as raised:
            wait_seconds(message)
        assert raised.value.field == field, message


def test_access_classes_of_the_standard_service() -> None:
    for method in ("CancelOperation", "DeleteOperation"):
        assert access_class(f"/google.longrunning.Operations/{method}") == MUTATING
    for method in ("GetOperation", "ListOperations", "WaitOperation"):
        assert access_class(f"/google.longrunning.Operations/{method}") == READ
    assert access_class("/evolve.v1.EvolutionService/DeleteOperation") == MUTATING


def test_standard_operation_packs_any_and_status() -> None:
    running = evolve_pb2.Operation(name="operations/7", metadata=evolve_pb2.OperationMetadata(task="t", generation=2))
    standard = standard_operation(running)
    assert (standard.name, standard.done, standard.WhichOneof("result")) == ("operations/7", False, None)
    assert standard.metadata.type_url == "type.googleapis.com/evolve.v1.OperationMetadata"
    assert unpack_metadata(standard).generation == 2

    failed = evolve_pb2.Operation(name="operations/8", done=True)
    failed.error.code, failed.error.message = code_pb2.CANCELLED, "cancelled by request"
    failed.error.details.add().Pack(error_details_pb2.ErrorInfo(reason="X"))
    standard = standard_operation(failed)
    assert (standard.error.code, standard.error.message) == (code_pb2.CANCELLED, "cancelled by request")
    assert standard.error.details[0].Is(error_details_pb2.ErrorInfo.DESCRIPTOR)

    succeeded = evolve_pb2.Operation(name="operations/9", done=True)
    succeeded.response.task.name = "t"
    result = evolve_pb2.TaskResult()
    assert standard_operation(succeeded).response.Unpack(result) and result.task.name == "t"


# ---- over a real server ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(server_factory):
    return server_factory.start("--token", TOKEN, "--read-token", READ_TOKEN, "--seed", "3")


@pytest.fixture(scope="module")
def channel(server):
    with server.channel() as channel:
        yield channel


@pytest.fixture(scope="module")
def submitted(channel):
    """operations/1: a small search that succeeds; operations/2: a slow one queued behind it."""
    stub = evolve_pb2_grpc.EvolutionServiceStub(channel)
    quick = stub.SubmitTask(submit_request("digits"), timeout=TIMEOUT, metadata=AUTH)
    slow = stub.SubmitTask(submit_request("slow", SLOW_GENERATIONS), timeout=TIMEOUT, metadata=AUTH)
    return quick.name, slow.name


def test_served_beside_evolve_with_health_and_reflection(server, channel) -> None:
    assert health_status(channel, SERVICE_NAME) == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME)]
    services, symbol = list(stub.ServerReflectionInfo(iter(requests), timeout=TIMEOUT, metadata=AUTH))
    assert SERVICE_NAME in {s.name for s in services.list_services_response.service}
    assert symbol.file_descriptor_response.file_descriptor_proto, symbol


def test_standard_stub_gets_waits_lists_and_refuses_to_delete_unfinished(submitted, channel) -> None:
    quick, slow = submitted
    stub = operations_pb2_grpc.OperationsStub(channel)
    operation = stub.GetOperation(operations_pb2.GetOperationRequest(name=slow), timeout=TIMEOUT, metadata=AUTH)
    metadata = unpack_metadata(operation)
    assert (operation.name, metadata.task, metadata.kind) == (slow, "slow", "extension")
    assert metadata.state in (evolve_pb2.OPERATION_STATE_QUEUED, evolve_pb2.OPERATION_STATE_RUNNING)

    # A standard client's Duration is honoured: a short wait returns the unfinished operation in time.
    started = time.monotonic()
    request = operations_pb2.WaitOperationRequest(name=slow, timeout=duration(1.5))
    waited = stub.WaitOperation(request, timeout=TIMEOUT, metadata=AUTH)
    elapsed = time.monotonic() - started
    assert not waited.done and 1.4 <= elapsed < 6.0, (waited.done, elapsed)
    started = time.monotonic()
    request = operations_pb2.WaitOperationRequest(name=slow, timeout=duration(0))
    assert not stub.WaitOperation(request, timeout=TIMEOUT, metadata=AUTH).done
    assert time.monotonic() - started < 3.0

    error = rpc_error(stub.DeleteOperation, operations_pb2.DeleteOperationRequest(name=slow))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error.details()
    assert stub.GetOperation(operations_pb2.GetOperationRequest(name=slow), timeout=TIMEOUT, metadata=AUTH).name

    done = standard_wait_done(stub, quick)
    assert done.WhichOneof("result") == "response"
    result = evolve_pb2.TaskResult()
    assert done.response.Unpack(result), done.response.type_url
    assert (result.task.name, result.task.status) == ("digits", evolve_pb2.TASK_STATUS_READY)
    assert unpack_metadata(done).state == evolve_pb2.OPERATION_STATE_SUCCEEDED

    assert listed(stub, "") == [quick, slow]
    assert listed(stub, 'task = "digits"') == [quick]
    assert listed(stub, 'task="slow"') == [slow]
    assert listed(stub, "done = true") == [quick]
    assert listed(stub, "done = false") == [slow]
    assert listed(stub, 'task = "slow" AND done = true') == []
    assert listed(stub, 'state = SUCCEEDED AND kind = "extension"') == [quick]
    first = stub.ListOperations(operations_pb2.ListOperationsRequest(name="operations", page_size=1),
                                timeout=TIMEOUT, metadata=AUTH)
    assert [o.name for o in first.operations] == [quick] and first.next_page_token
    second = stub.ListOperations(operations_pb2.ListOperationsRequest(page_size=1, page_token=first.next_page_token),
                                 timeout=TIMEOUT, metadata=AUTH)
    assert [o.name for o in second.operations] == [slow] and not second.next_page_token
    for bad in ('task != "digits"', 'name = "x"', "done = true OR done = false", "(done = true)", "done = maybe"):
        error = rpc_error(stub.ListOperations, operations_pb2.ListOperationsRequest(filter=bad))
        assert bad_request_fields(error) == ["filter"], bad
    error = rpc_error(stub.ListOperations, operations_pb2.ListOperationsRequest(name="projects/x/operations"))
    assert bad_request_fields(error) == ["name"]
    error = rpc_error(stub.GetOperation, operations_pb2.GetOperationRequest(name="operations/999"))
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_evolve_v1_new_and_deprecated_fields(submitted, channel) -> None:
    quick, slow = submitted
    stub = evolve_pb2_grpc.EvolutionServiceStub(channel)
    assert listed(stub, 'task = "digits"', evolve_pb2.ListOperationsRequest) == [quick]
    response = stub.ListOperations(evolve_pb2.ListOperationsRequest(task="digits"), timeout=TIMEOUT, metadata=AUTH)
    assert [o.name for o in response.operations] == [quick]  # the deprecated field still works
    error = rpc_error(stub.ListOperations, evolve_pb2.ListOperationsRequest(task="digits", filter="done = true"))
    assert bad_request_fields(error) == ["task"]
    error = rpc_error(stub.ListOperations, evolve_pb2.ListOperationsRequest(filter="owner = me"))
    assert bad_request_fields(error) == ["filter"]

    for request in (evolve_pb2.WaitOperationRequest(name=slow, timeout=duration(1.0)),
                    evolve_pb2.WaitOperationRequest(name=slow, timeout_seconds=1.0)):
        started = time.monotonic()
        waited = stub.WaitOperation(request, timeout=TIMEOUT, metadata=AUTH)
        elapsed = time.monotonic() - started
        assert not waited.done and 0.9 <= elapsed < 5.0, (request, elapsed)
    error = rpc_error(stub.WaitOperation,
                      evolve_pb2.WaitOperationRequest(name=slow, timeout=duration(1), timeout_seconds=1))
    assert bad_request_fields(error) == ["timeout_seconds"]
    error = rpc_error(stub.WaitOperation, evolve_pb2.WaitOperationRequest(name=slow, timeout=duration(-2)))
    assert bad_request_fields(error) == ["timeout"]
    error = rpc_error(stub.DeleteOperation, evolve_pb2.DeleteOperationRequest(name=slow))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert bad_request_fields(rpc_error(stub.DeleteOperation, evolve_pb2.DeleteOperationRequest())) == ["name"]


def test_tokens_guard_the_standard_service(submitted, channel) -> None:
    quick, slow = submitted
    stub = operations_pb2_grpc.OperationsStub(channel)
    for call, request in ((stub.GetOperation, operations_pb2.GetOperationRequest(name=quick)),
                          (stub.ListOperations, operations_pb2.ListOperationsRequest()),
                          (stub.WaitOperation, operations_pb2.WaitOperationRequest(name=quick, timeout=duration(0)))):
        assert rpc_error(call, request, metadata=()).code() == grpc.StatusCode.UNAUTHENTICATED
        assert call(request, timeout=TIMEOUT, metadata=READ_AUTH) is not None  # reads take the read token
    for call, request in ((stub.CancelOperation, operations_pb2.CancelOperationRequest(name=slow)),
                          (stub.DeleteOperation, operations_pb2.DeleteOperationRequest(name=quick))):
        assert rpc_error(call, request, metadata=()).code() == grpc.StatusCode.UNAUTHENTICATED
        assert rpc_error(call, request, metadata=READ_AUTH).code() == grpc.StatusCode.PERMISSION_DENIED
    evolve = evolve_pb2_grpc.EvolutionServiceStub(channel)
    error = rpc_error(evolve.DeleteOperation, evolve_pb2.DeleteOperationRequest(name=quick), metadata=READ_AUTH)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert stub.GetOperation(operations_pb2.GetOperationRequest(name=slow), timeout=TIMEOUT, metadata=AUTH).name


def test_google_api_core_client_polls_cancels_and_deletes(submitted, channel) -> None:
    operation_module = pytest.importorskip("google.api_core.operation")
    from google.api_core import operations_v1

    quick, slow = submitted
    client = operations_v1.OperationsClient(channel)  # its methods append to `metadata`: give each a list
    names = [o.name for o in client.list_operations("operations", 'task = "digits"', metadata=list(AUTH))]
    assert names == [quick]
    future = operation_module.from_gapic(client.get_operation(quick, metadata=list(AUTH)), client,
                                         evolve_pb2.TaskResult, grpc_metadata=list(AUTH),
                                         metadata_type=evolve_pb2.OperationMetadata)
    assert future.result(timeout=SEARCH_TIMEOUT).task.name == "digits"
    assert future.metadata.task == "digits" and future.metadata.candidates_scored > 0

    slow_future = operation_module.from_gapic(client.get_operation(slow, metadata=list(AUTH)), client,
                                              evolve_pb2.TaskResult, grpc_metadata=list(AUTH),
                                              metadata_type=evolve_pb2.OperationMetadata)
    assert not slow_future.done()
    assert slow_future.cancel()  # CancelOperation through the standard service
    standard_wait_done(operations_pb2_grpc.OperationsStub(channel), slow)
    assert slow_future.done() and slow_future.cancelled()
    assert slow_future.operation.error.code == code_pb2.CANCELLED

    client.delete_operation(quick, metadata=list(AUTH))  # standard DeleteOperation
    evolve = evolve_pb2_grpc.EvolutionServiceStub(channel)
    assert evolve.DeleteOperation(evolve_pb2.DeleteOperationRequest(name=slow), timeout=TIMEOUT,
                                  metadata=AUTH).name == slow
    for name in (quick, slow):
        error = rpc_error(evolve.GetOperation, evolve_pb2.GetOperationRequest(name=name))
        assert error.code() == grpc.StatusCode.NOT_FOUND
    # The tasks stay: only the operation records went.
    tasks = evolve.ListTasks(evolve_pb2.ListTasksRequest(), timeout=TIMEOUT, metadata=AUTH).tasks
    assert {t.name: t.status for t in tasks} == {"digits": evolve_pb2.TASK_STATUS_READY,
                                                  "slow": evolve_pb2.TASK_STATUS_FAILED}


def test_deleted_operations_stay_deleted_after_a_restart(server, server_factory, submitted) -> None:
    quick, slow = submitted
    # kill -9: no final checkpoint, so only DeleteOperation's own save can have kept the deletions.
    assert server.stop(signal.SIGKILL) == -signal.SIGKILL
    restarted = server_factory.start("--token", TOKEN, "--read-token", READ_TOKEN, state_dir=server.state_dir)
    with restarted.channel() as channel:
        stub = operations_pb2_grpc.OperationsStub(channel)
        assert listed(stub, "") == []
        for name in (quick, slow):
            error = rpc_error(stub.GetOperation, operations_pb2.GetOperationRequest(name=name))
            assert error.code() == grpc.StatusCode.NOT_FOUND
        evolve = evolve_pb2_grpc.EvolutionServiceStub(channel)
        improved = evolve.Improve(evolve_pb2.ImproveRequest(task="digits"), timeout=TIMEOUT, metadata=AUTH)
        assert improved.name == "operations/3"  # numbers of deleted operations are never reused
        evolve.CancelOperation(evolve_pb2.CancelOperationRequest(name=improved.name), timeout=TIMEOUT, metadata=AUTH)
    assert restarted.stop() == 0
