"""Bearer tokens and TLS: a server with a full token, a read token and a
self-signed certificate made at test time."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import grpc
import numpy as np
import pytest

from service.gen.evolve.v1 import evolve_pb2, evolve_pb2_grpc
from service.gen.inference import grpc_predict_v2_pb2 as infer_pb2
from service.gen.inference import grpc_predict_v2_pb2_grpc as infer_pb2_grpc
from tests.service.conftest import health_status

TOKEN = "full-secret-token"
READ_TOKEN = "read-only-token"
TIMEOUT = 30.0


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for localhost / 127.0.0.1 and its key (PEM files)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    try:
        _with_cryptography(cert, key)
    except ImportError:
        if shutil.which("openssl") is None:
            pytest.skip("neither the cryptography package nor openssl is available")
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
             "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
            check=True, capture_output=True, timeout=60,
        )
    return cert, key


def _with_cryptography(cert_path: Path, key_path: Path) -> None:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


@pytest.fixture(scope="module")
def server(server_factory, tmp_path_factory):
    cert, key = self_signed_certificate(tmp_path_factory.mktemp("tls"))
    credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    return server_factory.start(
        "--tls-cert", str(cert), "--tls-key", str(key), "--read-token", READ_TOKEN,
        credentials=credentials, env={"EVOLVE_TOKEN": TOKEN},  # the token from the environment
    )


@pytest.fixture(scope="module")
def channel(server):
    with server.channel() as channel:
        yield channel


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def code_of(call, request, metadata=None) -> grpc.StatusCode:
    try:
        call(request, timeout=TIMEOUT, metadata=metadata)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def submit(name: str) -> evolve_pb2.SubmitTaskRequest:
    spec = evolve_pb2.TaskSpec(
        name=name, bundled=evolve_pb2.BundledSource(name="digits_parity"),
        budget=evolve_pb2.SearchBudget(generations=1, train_rounds=1, examples_per_round=128),
    )
    return evolve_pb2.SubmitTaskRequest(spec=spec, request_id=f"id-{name}")


def test_probes_are_open(channel):
    assert health_status(channel) == 1  # SERVING, no token
    infer = infer_pb2_grpc.GRPCInferenceServiceStub(channel)
    assert infer.ServerLive(infer_pb2.ServerLiveRequest(), timeout=TIMEOUT).live
    assert infer.ServerReady(infer_pb2.ServerReadyRequest(), timeout=TIMEOUT).ready


def test_mutating_calls_need_the_full_token(channel):
    stub = evolve_pb2_grpc.EvolutionServiceStub(channel)
    assert code_of(stub.SubmitTask, submit("parity")) == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(stub.SubmitTask, submit("parity"), bearer("wrong")) == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(stub.SubmitTask, submit("parity"), [("authorization", TOKEN)]) == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(stub.SubmitTask, submit("parity"), bearer(READ_TOKEN)) == grpc.StatusCode.PERMISSION_DENIED
    assert code_of(stub.SubmitTask, submit("parity"), bearer(TOKEN)) == grpc.StatusCode.OK
    cancel = evolve_pb2.CancelOperationRequest(name="operations/1")
    assert code_of(stub.CancelOperation, cancel) == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(stub.Improve, evolve_pb2.ImproveRequest(), bearer(READ_TOKEN)) == grpc.StatusCode.PERMISSION_DENIED


def test_read_calls_accept_either_token(channel):
    stub = evolve_pb2_grpc.EvolutionServiceStub(channel)
    infer = infer_pb2_grpc.GRPCInferenceServiceStub(channel)
    assert code_of(stub.ListTasks, evolve_pb2.ListTasksRequest()) == grpc.StatusCode.UNAUTHENTICATED
    for token in (READ_TOKEN, TOKEN):
        assert code_of(stub.ListTasks, evolve_pb2.ListTasksRequest(), bearer(token)) == grpc.StatusCode.OK
    wait = evolve_pb2.WaitOperationRequest(name="operations/1", timeout_seconds=120)
    operation = stub.WaitOperation(wait, timeout=150, metadata=bearer(READ_TOKEN))
    assert operation.metadata.state == evolve_pb2.OPERATION_STATE_SUCCEEDED, operation

    images = np.zeros((2, 8, 8, 3), np.uint8)
    predict = evolve_pb2.PredictRequest(
        task="parity", array=evolve_pb2.Tensor(shape=[2, 8, 8, 3], datatype="UINT8", data=images.tobytes())
    )
    assert code_of(stub.Predict, predict) == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(stub.Predict, predict, bearer("wrong")) == grpc.StatusCode.UNAUTHENTICATED
    response = stub.Predict(predict, timeout=TIMEOUT, metadata=bearer(READ_TOKEN))
    assert len(response.classes) == 2
    infer_request = infer_pb2.ModelInferRequest(model_name="parity", raw_input_contents=[images.tobytes()])
    infer_request.inputs.add(name="images", datatype="UINT8", shape=[2, 8, 8, 3])
    assert code_of(infer.ModelInfer, infer_request) == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(infer.ModelInfer, infer_request, bearer(READ_TOKEN)) == grpc.StatusCode.OK
    watch = stub.WatchEvolution(evolve_pb2.WatchEvolutionRequest(), timeout=TIMEOUT)
    with pytest.raises(grpc.RpcError) as raised:
        next(watch)
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_plaintext_clients_are_refused(server):
    with grpc.insecure_channel(server.address) as plaintext:
        infer = infer_pb2_grpc.GRPCInferenceServiceStub(plaintext)
        with pytest.raises(grpc.RpcError) as raised:
            infer.ServerLive(infer_pb2.ServerLiveRequest(), timeout=5)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
