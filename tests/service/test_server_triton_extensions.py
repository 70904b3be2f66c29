"""Triton's model configuration, statistics and repository index extensions
(issue 11 item 6), driven with tritonclient.grpc against one real server.

The module's server runs tiny searches on the bundled `digits` and
`digits_parity`; tritonclient's own InferenceServerClient then reads the model
config (inputs, outputs, max batch, class labels), the statistics (counts rise
by exactly the calls made, Predict and ModelInfer, successes and failures),
the repository index and the server's extensions.
"""

from __future__ import annotations

import json
import threading
import time

import grpc
import numpy as np
import pytest
from google.protobuf.internal import api_implementation

from service import auth, triton_extensions
from service.gen.evolve.v1 import evolve_pb2, evolve_pb2_grpc

if api_implementation.Type() == "python":  # pragma: no cover
    pytest.skip("tritonclient's `inference` protos and ours cannot share the pure-python pool",
                allow_module_level=True)

triton_grpc = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException

TIMEOUT = 30.0
MAX_BATCH = 64
NEW_RPCS = ("ModelConfig", "ModelStatistics", "RepositoryIndex")


def test_new_rpcs_are_reads() -> None:
    for name in NEW_RPCS:
        assert auth.access_class(f"/{auth.INFERENCE_SERVICE}/{name}") == auth.READ, name


def test_model_stats_count_exactly_across_threads() -> None:
    stats = triton_extensions.ModelStats()
    threads, calls = 8, 500

    def hammer() -> None:
        for _ in range(calls):
            stats.success("a", "1", 3, 10, (1, 2, 3))
            stats.failure("a", "1", 5)

    workers = [threading.Thread(target=hammer) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    entry = stats.to_proto("a", "1")
    total = threads * calls
    assert (entry.inference_count, entry.execution_count) == (3 * total, total)
    assert (entry.inference_stats.success.count, entry.inference_stats.success.ns) == (total, 10 * total)
    assert (entry.inference_stats.fail.count, entry.inference_stats.fail.ns) == (total, 5 * total)
    assert entry.inference_stats.compute_output.ns == 3 * total
    stats.forget("a")
    assert stats.versions("a") == [] and stats.to_proto("a", "1").inference_count == 0


def _images(count: int, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(count, 8, 8, 3), dtype=np.uint8)


def _wait_done(stub, name: str, timeout: float = 300.0) -> evolve_pb2.Operation:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        operation = stub.GetOperation(evolve_pb2.GetOperationRequest(name=name), timeout=TIMEOUT)
        if operation.done:
            return operation
        time.sleep(0.2)
    raise AssertionError(f"{name} not done within {timeout} s")


def _submit(stub, name: str) -> evolve_pb2.Operation:
    spec = evolve_pb2.TaskSpec(name=name, bundled=evolve_pb2.BundledSource(name=name))
    return stub.SubmitTask(evolve_pb2.SubmitTaskRequest(spec=spec), timeout=TIMEOUT)


@pytest.fixture(scope="module")
def served(server_factory):
    """(server, evolve stub, tritonclient, repository index taken while no task had a model yet):
    `digits` READY, `digits_parity` submitted behind it and cancelled before it ran."""
    server = server_factory.start("--max-batch", str(MAX_BATCH))
    channel = server.channel()
    stub = evolve_pb2_grpc.EvolutionServiceStub(channel)
    client = triton_grpc.InferenceServerClient(server.address)
    first = _submit(stub, "digits")
    second = _submit(stub, "digits_parity")
    early = list(client.get_model_repository_index().models)
    stub.CancelOperation(evolve_pb2.CancelOperationRequest(name=second.name), timeout=TIMEOUT)
    assert _wait_done(stub, first.name).WhichOneof("result") == "response"
    yield server, stub, client, early
    client.close()
    channel.close()


def _infer(client, images: np.ndarray, model: str = "digits", version: str = ""):
    tensor = triton_grpc.InferInput("images", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images)
    return client.infer(model, [tensor], model_version=version)


def _stats(client, model: str = "digits"):
    (entry,) = client.get_inference_statistics(model).model_stats
    return entry


def test_server_metadata_lists_the_extensions(served) -> None:
    _, _, client, _ = served
    extensions = set(client.get_server_metadata().extensions)
    assert {"model_configuration", "statistics", "model_repository"} <= extensions


def test_model_config_and_class_labels(served) -> None:
    _, stub, client, _ = served
    task = stub.GetTask(evolve_pb2.GetTaskRequest(name="digits"), timeout=TIMEOUT)
    config = client.get_model_config("digits").config
    assert config.name == "digits"
    assert config.platform == "evolve-jax" and config.backend == "jax"
    assert config.max_batch_size == MAX_BATCH
    (images_input,) = config.input
    assert images_input.name == "images"
    assert images_input.data_type == triton_grpc.model_config_pb2.TYPE_UINT8
    assert images_input.format == triton_grpc.model_config_pb2.ModelInput.FORMAT_NHWC
    assert list(images_input.dims) == [-1, -1, 3]
    outputs = {output.name: output for output in config.output}
    assert set(outputs) == {"probabilities", "classes"}
    assert outputs["probabilities"].data_type == triton_grpc.model_config_pb2.TYPE_FP32
    assert list(outputs["probabilities"].dims) == [task.num_classes]
    assert outputs["classes"].data_type == triton_grpc.model_config_pb2.TYPE_INT64
    assert outputs["classes"].HasField("reshape") and list(outputs["classes"].reshape.shape) == []
    as_json = client.get_model_config("digits", as_json=True)["config"]
    assert as_json["max_batch_size"] == MAX_BATCH

    # The labels, read by a client from the config and from ModelMetadata,
    # name the classes that ModelInfer returns as evolve's own Predict does.
    labels = json.loads(config.parameters["class_labels"].string_value)
    assert len(labels) == task.num_classes
    metadata = client.get_model_metadata("digits")
    assert [(t.name, t.datatype) for t in metadata.outputs] == [("probabilities", "FP32"), ("classes", "INT64")]
    images = _images(6)
    classes = _infer(client, images).as_numpy("classes")
    array = evolve_pb2.Tensor(shape=list(images.shape), datatype="UINT8", data=images.tobytes())
    predicted = stub.Predict(evolve_pb2.PredictRequest(task="digits", array=array), timeout=TIMEOUT)
    assert [labels[c] for c in classes] == list(predicted.class_names)

    with pytest.raises(InferenceServerException) as error:
        client.get_model_config("ghost_task")
    assert "NOT_FOUND" in str(error.value.status())
    with pytest.raises(InferenceServerException) as error:
        client.get_model_config("digits", model_version="999")
    assert "NOT_FOUND" in str(error.value.status())


def test_model_metadata_carries_the_labels(served) -> None:
    server, _, client, _ = served
    from service.gen.inference import grpc_predict_v2_pb2 as ours
    from service.gen.inference import grpc_predict_v2_pb2_grpc as ours_grpc

    labels = json.loads(client.get_model_config("digits").config.parameters["class_labels"].string_value)
    with server.channel() as channel:
        metadata = ours_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(
            ours.ModelMetadataRequest(name="digits"), timeout=TIMEOUT
        )
    assert json.loads(metadata.parameters["class_labels"].string_param) == labels


def test_statistics_count_exactly_the_calls_made(served) -> None:
    _, stub, client, _ = served
    before = _stats(client)
    version = before.version
    assert version == str(stub.GetTask(evolve_pb2.GetTaskRequest(name="digits"), timeout=TIMEOUT).path_version)

    for _ in range(3):
        _infer(client, _images(4))
    array_images = _images(2)
    array = evolve_pb2.Tensor(shape=list(array_images.shape), datatype="UINT8", data=array_images.tobytes())
    for _ in range(2):
        stub.Predict(evolve_pb2.PredictRequest(task="digits", array=array), timeout=TIMEOUT)
    # Two failures of digits: ModelInfer of a 2-D tensor, Predict without input.
    bad = triton_grpc.InferInput("images", [4, 3], "UINT8")
    bad.set_data_from_numpy(np.zeros((4, 3), np.uint8))
    with pytest.raises(InferenceServerException):
        client.infer("digits", [bad])
    with pytest.raises(grpc.RpcError) as error:
        stub.Predict(evolve_pb2.PredictRequest(task="digits"), timeout=TIMEOUT)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Neither an unknown model nor an unknown version of digits counts anywhere.
    with pytest.raises(InferenceServerException):
        _infer(client, _images(1), model="ghost_task")
    with pytest.raises(InferenceServerException):
        _infer(client, _images(1), version="999")

    after = _stats(client)
    assert (after.name, after.version) == ("digits", version)
    assert after.inference_count - before.inference_count == 3 * 4 + 2 * 2
    assert after.execution_count - before.execution_count == 5
    success, fail = after.inference_stats.success, after.inference_stats.fail
    assert success.count - before.inference_stats.success.count == 5
    assert fail.count - before.inference_stats.fail.count == 2
    assert success.ns > before.inference_stats.success.ns and fail.ns > before.inference_stats.fail.ns
    # Each success passed queue (0 ns: no inference queue), input, compute and output once, as
    # perf_analyzer requires; the phases add up to no more than the requests' time.
    phases = [getattr(after.inference_stats, p) for p in ("compute_input", "compute_infer", "compute_output")]
    assert [p.count for p in phases] == [success.count] * 3 and after.inference_stats.queue.count == success.count
    assert all(p.ns > 0 for p in phases) and sum(p.ns for p in phases) <= success.ns
    assert after.last_inference >= int(time.time() * 1000) - 60_000

    # One version asked for: the same entry; an unknown one: NOT_FOUND.
    (same,) = client.get_inference_statistics("digits", model_version=version).model_stats
    assert same.inference_count == after.inference_count
    with pytest.raises(InferenceServerException) as error:
        client.get_inference_statistics("digits", model_version="999")
    assert "NOT_FOUND" in str(error.value.status())
    with pytest.raises(InferenceServerException) as error:
        client.get_inference_statistics("ghost_task")
    assert "NOT_FOUND" in str(error.value.status())
    # Every model: digits among them, the same counts.
    everything = {s.name: s for s in client.get_inference_statistics().model_stats}
    assert everything["digits"].inference_count == after.inference_count
    as_json = client.get_inference_statistics("digits", as_json=True)
    assert int(as_json["model_stats"][0]["inference_count"]) == after.inference_count


def _ready_index(server) -> list:
    """RepositoryIndex(ready=True), with Triton's own generated stub (tritonclient has no `ready` argument)."""
    with server.channel() as channel:
        theirs = triton_grpc.service_pb2_grpc.GRPCInferenceServiceStub(channel)
        return list(theirs.RepositoryIndex(triton_grpc.service_pb2.RepositoryIndexRequest(ready=True),
                                           timeout=TIMEOUT).models)


def test_repository_index(served) -> None:
    server, stub, client, early = served
    # Just after the submits neither task had a model: both UNAVAILABLE, with a reason.
    assert sorted(m.name for m in early) == ["digits", "digits_parity"]
    assert all(m.state == "UNAVAILABLE" and m.reason and not m.version for m in early), early

    index = {m.name: m for m in client.get_model_repository_index().models}
    digits = stub.GetTask(evolve_pb2.GetTaskRequest(name="digits"), timeout=TIMEOUT)
    assert (index["digits"].state, index["digits"].version, index["digits"].reason) == (
        "READY", str(digits.path_version), "")
    tasks = {t.name: t for t in stub.ListTasks(evolve_pb2.ListTasksRequest(), timeout=TIMEOUT).tasks}
    assert set(index) == set(tasks)
    for name, model in index.items():  # the cancelled digits_parity, if it is still listed
        ready = tasks[name].status == evolve_pb2.TASK_STATUS_READY
        assert (model.state == "READY") == ready and bool(model.reason) == (not ready), model
    ready_only = {m.name for m in _ready_index(server)}
    assert ready_only == {name for name, t in tasks.items() if t.status == evolve_pb2.TASK_STATUS_READY}
    assert "digits" in ready_only
    as_json = client.get_model_repository_index(as_json=True)
    assert {m["name"] for m in as_json["models"]} == set(index)
