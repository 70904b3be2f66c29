"""Bounded inputs against a real server (issue 9): a zip bomb, a folder of huge
PNGs and a GIF sent to Predict are refused with INVALID_ARGUMENT, the server's
memory stays bounded, and it keeps serving."""

from __future__ import annotations

import io
import logging
import os
import time

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2
from grpc_status import rpc_status
from PIL import Image

from service.gen.evolve.v1 import evolve_pb2, evolve_pb2_grpc
from tests.data.bombs import write_zero_npz
from tests.service.conftest import health_status

logger = logging.getLogger(__name__)

TIMEOUT = 60.0
BOMB_GIB = 5  # over the default limit of 4 GiB decoded data per source
PEAK_RSS_LIMIT_KB = 3 * 1024 * 1024  # 3 GiB


@pytest.fixture(scope="module")
def server(server_factory):
    return server_factory.start()


@pytest.fixture(scope="module")
def stub(server):
    with server.channel() as channel:
        yield evolve_pb2_grpc.EvolutionServiceStub(channel)


def _peak_rss_kb(pid: int) -> int:
    """The process's peak resident set size (VmHWM), in kB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc status")


def _fields(details) -> list[str]:
    """Field names of the BadRequest among google.protobuf.Any details."""
    fields = []
    for detail in details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            fields += [violation.field for violation in bad_request.field_violations]
    return fields


def submit_error(stub, spec: evolve_pb2.TaskSpec, wait_s: float = 120.0) -> tuple[int, str, list[str]]:
    """(google.rpc code, message, BadRequest fields) of a submission that must fail.

    The data may be loaded inside SubmitTask (the error is the call's status)
    or inside the operation (the error is the finished operation's): either
    path is accepted.
    """
    try:
        operation = stub.SubmitTask(evolve_pb2.SubmitTaskRequest(spec=spec), timeout=TIMEOUT)
    except grpc.RpcError as error:
        status = rpc_status.from_call(error)
        return error.code().value[0], error.details() or "", _fields(status.details if status else [])
    deadline = time.monotonic() + wait_s
    while not operation.done and time.monotonic() < deadline:
        request = evolve_pb2.WaitOperationRequest(name=operation.name, timeout_seconds=10)
        operation = stub.WaitOperation(request, timeout=TIMEOUT)
    assert operation.done, f"{operation.name} still running after {wait_s} s"
    assert operation.WhichOneof("result") == "error", operation
    return operation.error.code, operation.error.message, _fields(operation.error.details)


def _assert_still_serving(server, stub) -> None:
    assert server.process.poll() is None, server.log()[-4000:]
    with server.channel() as channel:
        assert health_status(channel, timeout=10.0) == 1  # SERVING
    stub.ListTasks(evolve_pb2.ListTasksRequest(), timeout=TIMEOUT)


def test_zip_bomb_is_refused_and_the_server_stays_small(server, stub, tmp_path):
    count = BOMB_GIB * (1 << 30) // (32 * 32 * 3)
    bomb = write_zero_npz(tmp_path / "bomb.npz", {"train_images": ((count, 32, 32, 3), "uint8"),
                                                  "train_labels": ((count,), "uint8")})
    assert os.path.getsize(bomb) < 8 << 20
    started = time.monotonic()
    spec = evolve_pb2.TaskSpec(name="bomb", npz=evolve_pb2.NpzSource(path=str(bomb)))
    code, message, fields = submit_error(stub, spec)
    assert code == code_pb2.INVALID_ARGUMENT, (code, message)
    assert fields and fields[0] in ("spec.npz.path", "spec.source.path"), fields
    assert "over the limit" in message, message
    elapsed, peak_kb = time.monotonic() - started, _peak_rss_kb(server.process.pid)
    logger.info("%.1f GiB bomb (%d bytes) refused in %.3f s; server peak RSS %d MiB",
                BOMB_GIB, os.path.getsize(bomb), elapsed, peak_kb >> 10)
    assert elapsed < 30.0
    assert peak_kb < PEAK_RSS_LIMIT_KB
    _assert_still_serving(server, stub)


def test_folder_of_huge_pngs_is_refused_by_their_headers(server, stub, tmp_path):
    for name in ("a", "b"):
        os.makedirs(tmp_path / "huge" / name)
        Image.new("L", (9000, 9000)).save(tmp_path / "huge" / name / "big.png")  # 78 KB, 81 MB decoded
    spec = evolve_pb2.TaskSpec(name="huge", image_folder=evolve_pb2.ImageFolderSource(path=str(tmp_path / "huge")))
    code, message, fields = submit_error(stub, spec)
    assert code == code_pb2.INVALID_ARGUMENT, (code, message)
    assert fields and fields[0] in ("spec.image_folder.path", "spec.source.path"), fields
    assert "a/big.png" in message and "9000x9000" in message and str(tmp_path) not in message, message
    peak_kb = _peak_rss_kb(server.process.pid)
    logger.info("folder of 9000x9000 PNGs refused; server peak RSS %d MiB", peak_kb >> 10)
    assert peak_kb < PEAK_RSS_LIMIT_KB
    _assert_still_serving(server, stub)


def test_gif_sent_to_predict_is_invalid_and_the_server_still_serves(server, stub):
    buffer = io.BytesIO()
    Image.new("P", (8, 8)).save(buffer, format="GIF")
    request = evolve_pb2.PredictRequest(task="digits", encoded=evolve_pb2.EncodedImages(images=[buffer.getvalue()]))
    with pytest.raises(grpc.RpcError) as raised:
        stub.Predict(request, timeout=TIMEOUT)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(raised.value)
    assert _fields(status.details) == ["encoded.images[0]"]
    assert "GIF" in raised.value.details()
    _assert_still_serving(server, stub)


def test_an_unprepared_tfds_dataset_fails_its_operation_not_the_request(server, stub, tmp_path):
    """SubmitTask only checks the spec: it answers within a short client
    deadline, other submits are not held up, and the operation (which loads
    the data) fails FAILED_PRECONDITION because downloads are off."""
    empty = tmp_path / "tfds"
    empty.mkdir()
    spec = evolve_pb2.TaskSpec(name="unprepared", tfds=evolve_pb2.TfdsSource(name="mnist", data_dir=str(empty)))
    started = time.monotonic()
    operation = stub.SubmitTask(evolve_pb2.SubmitTaskRequest(spec=spec), timeout=3.0)
    other = stub.SubmitTask(
        evolve_pb2.SubmitTaskRequest(spec=evolve_pb2.TaskSpec(name="other", bundled=evolve_pb2.BundledSource(
            name="digits_parity"))), timeout=3.0,
    )
    assert time.monotonic() - started < 6.0
    while not operation.done:
        request = evolve_pb2.WaitOperationRequest(name=operation.name, timeout_seconds=10)
        operation = stub.WaitOperation(request, timeout=TIMEOUT)
    assert operation.error.code == code_pb2.FAILED_PRECONDITION, operation.error
    assert "--allow-download" in operation.error.message
    task = stub.GetTask(evolve_pb2.GetTaskRequest(name="unprepared"), timeout=TIMEOUT)
    assert task.status == evolve_pb2.TASK_STATUS_FAILED and "not prepared" in task.status_message
    stub.CancelOperation(evolve_pb2.CancelOperationRequest(name=other.name), timeout=TIMEOUT)
    for name in ("unprepared", "other"):
        while True:  # the cancelled search may still be stopping
            try:
                stub.DeleteTask(evolve_pb2.DeleteTaskRequest(name=name), timeout=TIMEOUT)
                break
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error
                time.sleep(0.2)
    _assert_still_serving(server, stub)
