"""Durability round 2 over a real server process (DESIGN §7, issue 9):
one server per state directory, nothing acknowledged before it is on disk
(a real write failure: the server's file size limit drops to 1 byte, so
every checkpoint write fails with EFBIG), a cancelled first search, task
deletion, and a degraded start with a missing component."""

from __future__ import annotations

import resource
import shutil
import signal
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from evolve import checkpoint
from service.gen.evolve.v1 import evolve_pb2, evolve_pb2_grpc
from service.gen.inference import grpc_predict_v2_pb2 as infer_pb2
from service.gen.inference import grpc_predict_v2_pb2_grpc as infer_pb2_grpc
from tests.service.conftest import health_status
from tests.service.test_server_e2e import image_tensor, probe_images, submit_request, wait_done

TIMEOUT = 30.0
QUEUED, RUNNING = evolve_pb2.OPERATION_STATE_QUEUED, evolve_pb2.OPERATION_STATE_RUNNING


@pytest.fixture(scope="module")
def server(server_factory):
    """A server with two READY tasks whose log survives a file size limit."""
    server = server_factory.start("--seed", "3", log_pipe=True)
    with server.channel() as channel:
        stub = evolve_pb2_grpc.EvolutionServiceStub(channel)
        for name, bundled in (("a", "digits"), ("b", "digits_parity")):
            operation = stub.SubmitTask(submit_request(name, bundled), timeout=TIMEOUT)
            assert wait_done(stub, operation.name).metadata.state == evolve_pb2.OPERATION_STATE_SUCCEEDED
    return server


def _stub(channel) -> evolve_pb2_grpc.EvolutionServiceStub:
    return evolve_pb2_grpc.EvolutionServiceStub(channel)


def _predict(stub, task: str) -> np.ndarray:
    request = evolve_pb2.PredictRequest(task=task, array=image_tensor(probe_images()))
    response = stub.Predict(request, timeout=TIMEOUT)
    tensor = response.probabilities
    return np.frombuffer(tensor.data, "<f4").reshape(tuple(tensor.shape))


def _error(call, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=TIMEOUT)
    return caught.value


def _file_size_limit(pid: int, limit: int) -> None:
    """Sets the soft RLIMIT_FSIZE of a running process (the hard one stays)."""
    _, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, hard))


def _wait_state(stub, name: str, states, timeout: float = 120.0) -> evolve_pb2.Operation:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        operation = stub.GetOperation(evolve_pb2.GetOperationRequest(name=name), timeout=TIMEOUT)
        if operation.metadata.state in states:
            return operation
        time.sleep(0.05)
    raise AssertionError(f"{name} never reached {states}")


def test_a_second_server_on_the_state_dir_exits_naming_the_holder(server, server_factory):
    second = server_factory.start(state_dir=server.state_dir, wait=False)
    assert second.process.wait(120) == 1
    assert f"pid {server.process.pid}" in second.log()
    assert "one server per state directory" in second.log()
    with server.channel() as channel:
        assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING
        assert _predict(_stub(channel), "a").shape[0] == len(probe_images())


def test_nothing_is_acknowledged_or_ready_before_it_is_on_disk(server):
    """With every write failing, SubmitTask and Improve answer
    RESOURCE_EXHAUSTED naming the state directory and leave nothing behind;
    a search whose final checkpoint fails ends FAILED without its task ever
    turning READY; the server keeps serving throughout."""
    pid = server.process.pid
    with server.channel() as channel:
        stub, infer = _stub(channel), infer_pb2_grpc.GRPCInferenceServiceStub(channel)
        before = _predict(stub, "a")
        _file_size_limit(pid, 1)
        try:
            for call, request in (
                (stub.SubmitTask, submit_request("c", "digits")),
                (stub.Improve, evolve_pb2.ImproveRequest(task="a")),
            ):
                error = _error(call, request)
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
                assert str(server.state_dir) in error.details() and "disk is full" in error.details()
            assert _error(stub.GetTask, evolve_pb2.GetTaskRequest(name="c")).code() == grpc.StatusCode.NOT_FOUND
            assert not [o for o in stub.ListOperations(evolve_pb2.ListOperationsRequest(), timeout=TIMEOUT).operations
                        if not o.done]
            np.testing.assert_array_equal(_predict(stub, "a"), before)
        finally:
            _file_size_limit(pid, resource.RLIM_INFINITY)

        # A search that runs while the disk is fine and finishes while it is full.
        spec = submit_request("c", "digits")
        spec.spec.budget.generations = 3
        operation = stub.SubmitTask(spec, timeout=TIMEOUT)
        _wait_state(stub, operation.name, (RUNNING,))
        _file_size_limit(pid, 1)
        try:
            done = wait_done(stub, operation.name)
            assert done.metadata.state == evolve_pb2.OPERATION_STATE_FAILED
            assert done.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], done.error
            assert str(server.state_dir) in done.error.message
            task = stub.GetTask(evolve_pb2.GetTaskRequest(name="c"), timeout=TIMEOUT)
            assert task.status == evolve_pb2.TASK_STATUS_FAILED and "disk is full" in task.status_message
            assert not infer.ModelReady(infer_pb2.ModelReadyRequest(name="c"), timeout=TIMEOUT).ready
            error = _error(stub.Predict, evolve_pb2.PredictRequest(task="c", array=image_tensor(probe_images())))
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
            np.testing.assert_array_equal(_predict(stub, "a"), before)
            assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING
        finally:
            _file_size_limit(pid, resource.RLIM_INFINITY)
        # Space is back: the same task can be retried.
        retry = stub.Improve(evolve_pb2.ImproveRequest(task="c"), timeout=TIMEOUT)
        assert wait_done(stub, retry.name).metadata.state == evolve_pb2.OPERATION_STATE_SUCCEEDED


def _waits(channel, name: str, count: int) -> tuple[list, list[threading.Thread]]:
    """`count` concurrent WaitOperation calls; their outcomes land in the list."""
    outcomes: list = []
    stub = _stub(channel)

    def wait() -> None:
        try:
            request = evolve_pb2.WaitOperationRequest(name=name, timeout_seconds=60)
            outcomes.append(stub.WaitOperation(request, timeout=90))
        except grpc.RpcError as error:
            outcomes.append(error.code())

    threads = [threading.Thread(target=wait, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    return outcomes, threads


def test_a_cancelled_first_search_fails_and_delete_frees_the_name(server):
    """Also: 40 concurrent waits on the running search; the server holds at
    most its per-client bound of them, and Predict and health stay fast."""
    with server.channel() as channel:
        stub = _stub(channel)
        spec = submit_request("d", "digits")
        spec.spec.budget.generations = 3
        operation = stub.SubmitTask(spec, timeout=TIMEOUT)
        _wait_state(stub, operation.name, (RUNNING,))
        outcomes, threads = _waits(channel, operation.name, 40)
        deadline = time.monotonic() + 30
        while sum(o == grpc.StatusCode.RESOURCE_EXHAUSTED for o in outcomes) < 32 and time.monotonic() < deadline:
            time.sleep(0.05)
        started = time.monotonic()
        with server.channel() as fresh:
            assert health_status(fresh, timeout=2.0) == health_pb2.HealthCheckResponse.SERVING
            request = evolve_pb2.PredictRequest(task="a", array=image_tensor(probe_images()))
            _stub(fresh).Predict(request, timeout=5.0)
        assert time.monotonic() - started < 5.0
        stub.CancelOperation(evolve_pb2.CancelOperationRequest(name=operation.name), timeout=TIMEOUT)
        for thread in threads:
            thread.join(60)
        answered = [o for o in outcomes if isinstance(o, evolve_pb2.Operation)]
        assert len(outcomes) == 40 and outcomes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 40 - len(answered)
        assert 1 <= len(answered) <= 8  # --workers 32: 16 waiting calls in all, 8 per client host
        assert all(o.done for o in answered)
        assert wait_done(stub, operation.name).metadata.state == evolve_pb2.OPERATION_STATE_CANCELLED
        task = stub.GetTask(evolve_pb2.GetTaskRequest(name="d"), timeout=TIMEOUT)
        assert task.status == evolve_pb2.TASK_STATUS_FAILED
        assert task.status_message == "cancelled before it had a model"
        error = _error(stub.SubmitTask, submit_request("d", "digits"))
        assert error.code() == grpc.StatusCode.ALREADY_EXISTS

        # A task with a queued operation cannot be deleted; one without can.
        busy = stub.Improve(evolve_pb2.ImproveRequest(task="d"), timeout=TIMEOUT)
        error = _error(stub.DeleteTask, evolve_pb2.DeleteTaskRequest(name="d"))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and busy.name in error.details()
        stub.CancelOperation(evolve_pb2.CancelOperationRequest(name=busy.name), timeout=TIMEOUT)
        wait_done(stub, busy.name)
        assert stub.DeleteTask(evolve_pb2.DeleteTaskRequest(name="d"), timeout=TIMEOUT).name == "d"
        assert _error(stub.GetTask, evolve_pb2.GetTaskRequest(name="d")).code() == grpc.StatusCode.NOT_FOUND
        assert _error(stub.DeleteTask, evolve_pb2.DeleteTaskRequest(name="d")).code() == grpc.StatusCode.NOT_FOUND

        # Deleting a READY task leaves every other task's model as it was.
        before = {name: _predict(stub, name) for name in ("a", "b")}
        components = stub.GetSystem(evolve_pb2.GetSystemRequest(), timeout=TIMEOUT).num_components
        stub.DeleteTask(evolve_pb2.DeleteTaskRequest(name="c"), timeout=TIMEOUT)
        assert stub.GetSystem(evolve_pb2.GetSystemRequest(), timeout=TIMEOUT).num_components < components
        for name, probabilities in before.items():
            np.testing.assert_array_equal(_predict(stub, name), probabilities)


def test_a_client_that_leaves_gives_its_waiting_slots_back_at_once(server):
    """A client's waiting calls hold the per-client bound (8 here) only while
    the client waits: once their deadlines pass the next one is served at
    once, not refused until the server's next poll notices (seen in CI as a
    RESOURCE_EXHAUSTED WaitOperation right after many short watches)."""
    far = evolve_pb2.WatchEvolutionRequest(after_sequence=10**12)  # nothing to send: each stream just waits
    with server.channel() as channel:
        stub = _stub(channel)
        codes: list = []

        def watch(deadline: float) -> None:
            try:
                list(stub.WatchEvolution(far, timeout=deadline))
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as error:
                codes.append(error.code())

        # Deadlines between the server's 1 s polls, so a slot freed only by the poll lingers.
        threads = [threading.Thread(target=watch, args=(2.5,), daemon=True) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED] * 8, codes
        codes.clear()
        watch(0.3)
        request = evolve_pb2.WaitOperationRequest(name=stub.ListOperations(
            evolve_pb2.ListOperationsRequest(), timeout=TIMEOUT).operations[0].name, timeout_seconds=1)
        assert stub.WaitOperation(request, timeout=TIMEOUT).done
        assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED], codes


def test_a_missing_component_damages_only_its_task(server, server_factory):
    """After a restart with one of b's components deleted: the server starts,
    a serves exactly as before, b is DAMAGED (GetTask, ListTasks, GetSystem),
    deletions stayed deleted, and `improve b` rebuilds b."""
    with server.channel() as channel:
        stub = _stub(channel)
        before = _predict(stub, "a")
        a_ids = {c.id for c in stub.GetTask(evolve_pb2.GetTaskRequest(name="a"), timeout=TIMEOUT).components}
        b_task = stub.GetTask(evolve_pb2.GetTaskRequest(name="b"), timeout=TIMEOUT)
    only_b = [c.id for c in b_task.components if c.id not in a_ids]
    assert only_b
    assert server.stop() == 0
    # Its pack (the directory of the save that wrote it) must hold nothing of a's.
    directories = {cid: checkpoint.component_directory(str(server.state_dir), cid) for cid in only_b}
    only_b = [cid for cid in only_b if not set(checkpoint.pack_members(directories[cid])) & a_ids]
    assert only_b
    shutil.rmtree(directories[only_b[0]])

    restarted = server_factory.start(state_dir=server.state_dir)
    with restarted.channel() as channel:
        stub = _stub(channel)
        np.testing.assert_array_equal(_predict(stub, "a"), before)
        task = stub.GetTask(evolve_pb2.GetTaskRequest(name="b"), timeout=TIMEOUT)
        assert task.status == evolve_pb2.TASK_STATUS_DAMAGED and only_b[0] in task.status_message
        listed = {t.name: t.status for t in stub.ListTasks(evolve_pb2.ListTasksRequest(), timeout=TIMEOUT).tasks}
        assert listed == {"a": evolve_pb2.TASK_STATUS_READY, "b": evolve_pb2.TASK_STATUS_DAMAGED}
        assert list(stub.GetSystem(evolve_pb2.GetSystemRequest(), timeout=TIMEOUT).damaged_tasks) == ["b"]
        for deleted in ("c", "d"):
            assert _error(stub.GetTask, evolve_pb2.GetTaskRequest(name=deleted)).code() == grpc.StatusCode.NOT_FOUND
        error = _error(stub.Predict, evolve_pb2.PredictRequest(task="b", array=image_tensor(probe_images())))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "damaged" in error.details()
        rebuild = stub.Improve(evolve_pb2.ImproveRequest(task="b"), timeout=TIMEOUT)
        assert wait_done(stub, rebuild.name).metadata.state == evolve_pb2.OPERATION_STATE_SUCCEEDED
        task = stub.GetTask(evolve_pb2.GetTaskRequest(name="b"), timeout=TIMEOUT)
        assert task.status == evolve_pb2.TASK_STATUS_READY and task.path_version > b_task.path_version
        assert not stub.GetSystem(evolve_pb2.GetSystemRequest(), timeout=TIMEOUT).damaged_tasks
        np.testing.assert_array_equal(_predict(stub, "a"), before)
    assert restarted.stop() == 0


def test_a_drain_longer_than_the_grace_period_still_ends_streams_with_their_last_events(server_factory):
    """SIGTERM's cancelled search and final checkpoint take longer than a
    0.05 s grace period; the watch stream must still get the search's end
    and close normally rather than be cut with UNAVAILABLE."""
    from tests.service.test_server_e2e import collect_in_background, follow_until

    server = server_factory.start("--seed", "4", "--grace-seconds", "0.05")
    with server.channel() as channel:
        stub = _stub(channel)
        stub.SubmitTask(submit_request("slow_drain", "digits"), timeout=TIMEOUT)
        follow_until(stub, lambda seen: seen[-1].WhichOneof("kind") == "generation_started", task="slow_drain")
        collected, collector = collect_in_background(stub)
        deadline = time.monotonic() + TIMEOUT
        while not collected and time.monotonic() < deadline:  # the stream is open and replaying
            time.sleep(0.05)
        assert server.stop(signal.SIGTERM) == 0
        collector.join(30)
    assert not collector.is_alive() and collected
    assert all(isinstance(e, evolve_pb2.Event) for e in collected), collected[-1]
    assert collected[-1].task == "slow_drain" and collected[-1].search_finished.state == "CANCELLED"
    assert "final checkpoint" in server.log()
