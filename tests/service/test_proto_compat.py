"""Wire compatibility of protos/inference with the Open Inference Protocol.

Checked against the definitions tritonclient ships (its own generated code of
Triton's grpc_service.proto, a superset of the KServe v2 protocol): same
service name, same field numbers and types, messages that parse both ways, and
a real tritonclient InferenceServerClient talking to a server built on our
generated servicer.
"""

from __future__ import annotations

import sys
from concurrent import futures
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import descriptor as _descriptor
from google.protobuf.internal import api_implementation

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

if api_implementation.Type() == "python":  # pragma: no cover
    pytest.skip(
        "the pure-python protobuf runtime registers every generated class in the default pool, "
        "so our `inference` package and tritonclient's cannot be loaded together",
        allow_module_level=True,
    )

grpc = pytest.importorskip("grpc")
triton_grpc = pytest.importorskip("tritonclient.grpc")

from tritonclient.grpc import model_config_pb2 as theirs_config  # noqa: E402
from tritonclient.grpc import service_pb2 as theirs  # noqa: E402

from service.gen.evolve.v1 import evolve_pb2  # noqa: E402
from service.gen.inference import grpc_predict_v2_pb2 as ours  # noqa: E402
from service.gen.inference import grpc_predict_v2_pb2_grpc as ours_grpc  # noqa: E402

SERVICE = "inference.GRPCInferenceService"
# evolve's own additions, at numbers the reference leaves unused.
EXTRA_FIELDS = {"inference.ModelMetadataResponse.parameters"}
# Triton's model config messages, of which we declare only the fields we fill.
SUBSET_MESSAGES = {"inference.ModelConfig", "inference.ModelInput", "inference.ModelOutput"}


def _messages(container) -> list[_descriptor.Descriptor]:
    """All message descriptors of a file or a message, nested ones included."""
    if isinstance(container, _descriptor.FileDescriptor):
        children = list(container.message_types_by_name.values())
    else:
        children = list(container.nested_types)
    found = []
    for message in children:
        found.append(message)
        found.extend(_messages(message))
    return found


def test_service_name_and_methods_match() -> None:
    service = ours.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == SERVICE
    reference = theirs.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert reference.full_name == SERVICE
    assert [m.name for m in service.methods] == [
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
        "ModelConfig",
        "ModelStatistics",
        "RepositoryIndex",
    ]
    for method in service.methods:
        other = reference.methods_by_name[method.name]
        assert method.input_type.full_name == other.input_type.full_name
        assert method.output_type.full_name == other.output_type.full_name
        assert method.client_streaming == other.client_streaming
        assert method.server_streaming == other.server_streaming


def test_every_field_matches_the_reference() -> None:
    messages = _messages(ours.DESCRIPTOR)
    assert len(messages) >= 20
    for message in messages:
        if message.full_name == "inference.ModelMetadataResponse.ParametersEntry":
            continue  # the map entry of an EXTRA_FIELDS field
        other = theirs.DESCRIPTOR.pool.FindMessageTypeByName(message.full_name)
        assert other.GetOptions().map_entry == message.GetOptions().map_entry, message.full_name
        for field in message.fields:
            where = f"{message.full_name}.{field.name}"
            if where in EXTRA_FIELDS:
                assert field.number not in other.fields_by_number, f"{where}: its number is taken"
                continue
            assert field.name in other.fields_by_name, f"{where}: not in the reference"
            ref = other.fields_by_name[field.name]
            assert field.number == ref.number, where
            assert field.type == ref.type, where
            assert field.is_repeated == ref.is_repeated, where
            if field.message_type is not None:
                assert field.message_type.full_name == ref.message_type.full_name, where
            oneof = field.containing_oneof.name if field.containing_oneof else None
            ref_oneof = ref.containing_oneof.name if ref.containing_oneof else None
            assert oneof == ref_oneof, where
        # We may leave out fields of the reference only where nothing depends
        # on them: only in the model config messages, of which we fill a few.
        ours_names = set(message.fields_by_name) - {f.rpartition(".")[2] for f in EXTRA_FIELDS
                                                    if f.startswith(message.full_name + ".")}
        if message.full_name in SUBSET_MESSAGES:
            assert ours_names <= set(other.fields_by_name), message.full_name
        else:
            assert set(other.fields_by_name) == ours_names, message.full_name


def test_enums_match_the_reference() -> None:
    for enum in (ours.DataType.DESCRIPTOR, ours.ModelInput.Format.DESCRIPTOR):
        other = theirs.DESCRIPTOR.pool.FindEnumTypeByName(enum.full_name)
        assert [(v.name, v.number) for v in enum.values] == [(v.name, v.number) for v in other.values]


def test_extension_messages_decode_with_the_reference() -> None:
    config = ours.ModelConfigResponse()
    config.config.name, config.config.max_batch_size, config.config.backend = "cifar10", 64, "jax"
    config.config.input.add(name="images", data_type=ours.TYPE_UINT8, format=ours.ModelInput.FORMAT_NHWC,
                            dims=[-1, -1, 3])
    config.config.output.add(name="classes", data_type=ours.TYPE_INT64, dims=[1]).reshape.SetInParent()
    config.config.parameters["class_labels"].string_value = '["cat", "dog"]'
    stats = ours.ModelStatisticsResponse()
    entry = stats.model_stats.add(name="cifar10", version="3", inference_count=5, execution_count=2)
    entry.inference_stats.success.count, entry.inference_stats.success.ns = 2, 10**9
    entry.inference_stats.fail.count = 1
    index = ours.RepositoryIndexResponse()
    index.models.add(name="cifar10", version="3", state="READY")
    index.models.add(name="new", state="UNAVAILABLE", reason="training")
    for sent in (config, stats, index):
        received = getattr(theirs, type(sent).__name__).FromString(sent.SerializeToString())
        assert received.SerializeToString(deterministic=True) == sent.SerializeToString(deterministic=True)
    parsed = theirs.ModelConfigResponse.FromString(config.SerializeToString()).config
    assert parsed.input[0].data_type == theirs_config.TYPE_UINT8
    assert parsed.output[0].HasField("reshape") and list(parsed.input[0].dims) == [-1, -1, 3]
    assert parsed.parameters["class_labels"].string_value == '["cat", "dog"]'
    metadata = ours.ModelMetadataResponse(name="cifar10")
    metadata.parameters["class_labels"].string_param = '["cat"]'
    assert theirs.ModelMetadataResponse.FromString(metadata.SerializeToString()).name == "cifar10"


def _fill_request(module):
    request = module.ModelInferRequest(model_name="cifar10", model_version="3", id="req-1")
    request.parameters["priority"].int64_param = 2
    request.parameters["flag"].bool_param = True
    request.parameters["tag"].string_param = "x"
    request.parameters["scale"].double_param = 0.5
    request.parameters["big"].uint64_param = 2**63 + 1
    tensor = request.inputs.add(name="images", datatype="UINT8", shape=[2, 4, 4, 3])
    tensor.parameters["binary_data_size"].int64_param = 96
    request.inputs.add(name="extra", datatype="FP32", shape=[2]).contents.fp32_contents.extend([1.5, -2.0])
    request.outputs.add(name="probabilities").parameters["classification"].int64_param = 3
    request.raw_input_contents.append(bytes(range(96)))
    return request


def _fill_response(module):
    response = module.ModelInferResponse(model_name="cifar10", model_version="3", id="req-1")
    response.parameters["sequence"].string_param = "done"
    out = response.outputs.add(name="probabilities", datatype="FP32", shape=[2, 10])
    out.parameters["p"].double_param = 1.0
    labels = response.outputs.add(name="labels", datatype="INT64", shape=[2])
    labels.contents.int64_contents.extend([7, -1])
    response.raw_output_contents.append(np.arange(20, dtype="<f4").tobytes())
    return response


@pytest.mark.parametrize("message", ["ModelInferRequest", "ModelInferResponse"])
@pytest.mark.parametrize("direction", ["ours_to_theirs", "theirs_to_ours"])
def test_infer_messages_survive_both_ways(message: str, direction: str) -> None:
    fill = _fill_request if message == "ModelInferRequest" else _fill_response
    source, target = (ours, theirs) if direction == "ours_to_theirs" else (theirs, ours)
    sent = fill(source)
    received = getattr(target, message).FromString(sent.SerializeToString())
    expected = fill(target)
    assert received == expected
    assert received.ListFields(), "nothing parsed"
    # Both encode the same content to the same bytes: same numbers and wire
    # types everywhere, nothing left as unknown fields.
    assert sent.SerializeToString(deterministic=True) == expected.SerializeToString(deterministic=True)
    assert received.SerializeToString(deterministic=True) == sent.SerializeToString(deterministic=True)
    if message == "ModelInferRequest":
        assert received.raw_input_contents[0] == bytes(range(96))
        assert received.parameters["big"].uint64_param == 2**63 + 1
        assert list(received.inputs[0].shape) == [2, 4, 4, 3]
    else:
        assert np.frombuffer(received.raw_output_contents[0], "<f4").tolist() == list(range(20))
        assert list(received.outputs[1].contents.int64_contents) == [7, -1]


def test_metadata_messages_survive() -> None:
    metadata = ours.ModelMetadataResponse(name="cifar10", versions=["3"], platform="evolve")
    metadata.inputs.add(name="images", datatype="UINT8", shape=[-1, 224, 224, 3])
    metadata.outputs.add(name="probabilities", datatype="FP32", shape=[-1, 10])
    parsed = theirs.ModelMetadataResponse.FromString(metadata.SerializeToString())
    assert parsed.inputs[0].shape == [-1, 224, 224, 3]
    assert parsed.outputs[0].name == "probabilities"
    server = ours.ServerMetadataResponse(name="evolve", version="0.1", extensions=["x"])
    assert theirs.ServerMetadataResponse.FromString(server.SerializeToString()).extensions == ["x"]


class _Servicer(ours_grpc.GRPCInferenceServiceServicer):
    """A toy model "double": FP32 output = 2 * UINT8 input."""

    def ServerLive(self, request, context):
        return ours.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return ours.ServerReadyResponse(ready=True)

    def ModelReady(self, request, context):
        return ours.ModelReadyResponse(ready=request.name == "double")

    def ServerMetadata(self, request, context):
        return ours.ServerMetadataResponse(name="evolve-test", version="1")

    def ModelMetadata(self, request, context):
        if request.name != "double":
            context.abort(grpc.StatusCode.NOT_FOUND, f"no model {request.name!r}")
        response = ours.ModelMetadataResponse(name="double", versions=["1"], platform="evolve")
        response.inputs.add(name="x", datatype="UINT8", shape=[-1, 3])
        response.outputs.add(name="y", datatype="FP32", shape=[-1, 3])
        return response

    def ModelInfer(self, request, context):
        (tensor,) = request.inputs
        x = np.frombuffer(request.raw_input_contents[0], np.uint8).reshape(tuple(tensor.shape))
        y = (2.0 * x).astype("<f4")
        response = ours.ModelInferResponse(model_name=request.model_name, model_version="1", id=request.id)
        response.outputs.add(name="y", datatype="FP32", shape=list(y.shape))
        response.raw_output_contents.append(y.tobytes())
        return response


@pytest.fixture
def server_address():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    ours_grpc.add_GRPCInferenceServiceServicer_to_server(_Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


def test_tritonclient_talks_to_our_service(server_address: str) -> None:
    client = triton_grpc.InferenceServerClient(server_address)
    try:
        assert client.is_server_live()
        assert client.is_server_ready()
        assert client.is_model_ready("double")
        assert not client.is_model_ready("other")
        assert client.get_server_metadata().name == "evolve-test"
        metadata = client.get_model_metadata("double")
        assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("x", "UINT8", [-1, 3])]

        x = np.arange(6, dtype=np.uint8).reshape(2, 3)
        inputs = [triton_grpc.InferInput("x", list(x.shape), "UINT8")]
        inputs[0].set_data_from_numpy(x)
        result = client.infer("double", inputs, request_id="r1", outputs=[triton_grpc.InferRequestedOutput("y")])
        np.testing.assert_array_equal(result.as_numpy("y"), 2.0 * x)
        assert result.get_response().id == "r1"
    finally:
        client.close()


def test_evolution_service_shape() -> None:
    service = evolve_pb2.DESCRIPTOR.services_by_name["EvolutionService"]
    assert service.full_name == "evolve.v1.EvolutionService"
    methods = {m.name: m for m in service.methods}
    assert set(methods) == {
        "SubmitTask",
        "GetOperation",
        "ListOperations",
        "CancelOperation",
        "WaitOperation",
        "DeleteOperation",
        "GetTask",
        "ListTasks",
        "Improve",
        "WatchEvolution",
        "Predict",
        "GetSystem",
        "DeleteTask",
    }
    assert methods["WatchEvolution"].server_streaming
    for name in ("SubmitTask", "GetOperation", "CancelOperation", "WaitOperation", "Improve"):
        assert methods[name].output_type.full_name == "evolve.v1.Operation"
    operation = evolve_pb2.Operation(name="operations/1", done=True)
    operation.error.code = 1
    assert operation.WhichOneof("result") == "error"
    assert evolve_pb2.OperationState.Name(5) == "OPERATION_STATE_CANCELLED"
    assert evolve_pb2.TaskStatus.Name(3) == "TASK_STATUS_READY"
