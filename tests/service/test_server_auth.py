"""Bearer tokens and TLS over real server processes (issue 9: secure by default).

Three servers, one per way of giving a token: `--token-file` alone (every
RPC but the probes needs the token), `EVOLVE_TOKEN` with `--read-token` and a
self-signed certificate made at test time (reads take either token, mutating
calls only the full one), and `EVOLVE_TOKEN` with `EVOLVE_OPEN_READS` (reads
open, mutating calls not). Bad token settings must stop the server at once
with exit code 2, and grpc health (Check and Watch) is open everywhere.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from service.auth import MUTATING, OPEN, READ, AuthInterceptor, access_class
from service.errors import ErrorInterceptor
from service.gen.evolve.v1 import evolve_pb2, evolve_pb2_grpc
from service.gen.inference import grpc_predict_v2_pb2 as infer_pb2
from service.gen.inference import grpc_predict_v2_pb2_grpc as infer_pb2_grpc
from tests.service.conftest import ROOT, health_status

TOKEN = "full-secret-token"
READ_TOKEN = "read-only-token"
TIMEOUT = 30.0
SERVING = health_pb2.HealthCheckResponse.SERVING


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




# ---- calls: every RPC of both services, the way a client makes it -------------------------------------


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def code_of(call, request, metadata=None) -> grpc.StatusCode:
    try:
        call(request, timeout=TIMEOUT, metadata=metadata)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def first_message_code(responses: Iterator) -> grpc.StatusCode:
    """OK when a stream's first message arrives, else the stream's status."""
    try:
        next(responses)
    except grpc.RpcError as error:
        return error.code()
    finally:
        responses.cancel()
    return grpc.StatusCode.OK


def images(count: int = 1) -> np.ndarray:
    return np.zeros((count, 8, 8, 3), np.uint8)


def predict_request(task: str, count: int = 1) -> evolve_pb2.PredictRequest:
    array = evolve_pb2.Tensor(shape=[count, 8, 8, 3], datatype="UINT8", data=images(count).tobytes())
    return evolve_pb2.PredictRequest(task=task, array=array)


def infer_request(model: str, count: int = 1) -> infer_pb2.ModelInferRequest:
    request = infer_pb2.ModelInferRequest(model_name=model, raw_input_contents=[images(count).tobytes()])
    request.inputs.add(name="images", datatype="UINT8", shape=[count, 8, 8, 3])
    return request


def reflection_code(channel: grpc.Channel, metadata=None) -> grpc.StatusCode:
    """Lists the services through server reflection (what grpcurl does first)."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    responses = stub.ServerReflectionInfo(iter([request]), timeout=TIMEOUT, metadata=metadata)
    try:
        response = next(responses)
    except grpc.RpcError as error:
        return error.code()
    finally:
        responses.cancel()
    assert "evolve.v1.EvolutionService" in {service.name for service in response.list_services_response.service}
    return grpc.StatusCode.OK


Call = Callable[[grpc.Channel, "list | None"], grpc.StatusCode]


def _evolve(method: str, request) -> Call:
    return lambda channel, metadata: code_of(getattr(evolve_pb2_grpc.EvolutionServiceStub(channel), method),
                                             request, metadata)


def _infer(method: str, request) -> Call:
    return lambda channel, metadata: code_of(getattr(infer_pb2_grpc.GRPCInferenceServiceStub(channel), method),
                                             request, metadata)


def _watch_evolution(channel: grpc.Channel, metadata) -> grpc.StatusCode:
    stub = evolve_pb2_grpc.EvolutionServiceStub(channel)
    request = evolve_pb2.WatchEvolutionRequest(after_sequence=-1)  # INVALID_ARGUMENT once past auth
    return first_message_code(stub.WatchEvolution(request, timeout=TIMEOUT, metadata=metadata))


# name: (call, its status with a token that may make it: the call's ordinary answer on a server
# without tasks). None of these trains anything.
READ_CALLS: dict[str, tuple[Call, grpc.StatusCode]] = {
    "ListTasks": (_evolve("ListTasks", evolve_pb2.ListTasksRequest()), grpc.StatusCode.OK),
    "GetTask": (_evolve("GetTask", evolve_pb2.GetTaskRequest(name="nope")), grpc.StatusCode.NOT_FOUND),
    "ListOperations": (_evolve("ListOperations", evolve_pb2.ListOperationsRequest()), grpc.StatusCode.OK),
    "GetOperation": (_evolve("GetOperation", evolve_pb2.GetOperationRequest(name="operations/999")),
                     grpc.StatusCode.NOT_FOUND),
    "WaitOperation": (_evolve("WaitOperation", evolve_pb2.WaitOperationRequest(
        name="operations/999", timeout_seconds=1)), grpc.StatusCode.NOT_FOUND),
    "GetSystem": (_evolve("GetSystem", evolve_pb2.GetSystemRequest()), grpc.StatusCode.OK),
    "Predict": (_evolve("Predict", predict_request("nope")), grpc.StatusCode.NOT_FOUND),
    "WatchEvolution": (_watch_evolution, grpc.StatusCode.INVALID_ARGUMENT),
    "ModelInfer": (_infer("ModelInfer", infer_request("nope")), grpc.StatusCode.NOT_FOUND),
    "ModelMetadata": (_infer("ModelMetadata", infer_pb2.ModelMetadataRequest(name="nope")),
                      grpc.StatusCode.NOT_FOUND),
    "ModelReady": (_infer("ModelReady", infer_pb2.ModelReadyRequest(name="nope")), grpc.StatusCode.OK),
    "ServerMetadata": (_infer("ServerMetadata", infer_pb2.ServerMetadataRequest()), grpc.StatusCode.OK),
    "reflection": (reflection_code, grpc.StatusCode.OK),
}
MUTATING_CALLS: dict[str, tuple[Call, grpc.StatusCode]] = {
    "SubmitTask": (_evolve("SubmitTask", evolve_pb2.SubmitTaskRequest()), grpc.StatusCode.INVALID_ARGUMENT),
    "Improve": (_evolve("Improve", evolve_pb2.ImproveRequest(task="nope")), grpc.StatusCode.NOT_FOUND),
    "CancelOperation": (_evolve("CancelOperation", evolve_pb2.CancelOperationRequest(name="operations/999")),
                        grpc.StatusCode.NOT_FOUND),
}
if hasattr(evolve_pb2, "DeleteTaskRequest"):  # the RPC lands with issue 9's task deletion
    MUTATING_CALLS["DeleteTask"] = (_evolve("DeleteTask", evolve_pb2.DeleteTaskRequest(name="nope")),
                                    grpc.StatusCode.NOT_FOUND)


# ---- unit rules (no server) ----------------------------------------------------------------------


def test_access_classes_deny_by_default():
    for method in ("SubmitTask", "Improve", "CancelOperation", "DeleteTask"):
        assert access_class(f"/evolve.v1.EvolutionService/{method}") == MUTATING, method
    assert access_class("/google.longrunning.Operations/DeleteOperation") == MUTATING  # by its verb
    for method in ("/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch",
                   "/inference.GRPCInferenceService/ServerLive", "/inference.GRPCInferenceService/ServerReady"):
        assert access_class(method) == OPEN, method
    for method in ("/evolve.v1.EvolutionService/Predict", "/evolve.v1.EvolutionService/WatchEvolution",
                   "/inference.GRPCInferenceService/ModelReady",
                   "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                   "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", "/some.New/Service"):
        assert access_class(method) == READ, method


def test_interceptor_rules():
    predict, submit = "/evolve.v1.EvolutionService/Predict", "/evolve.v1.EvolutionService/SubmitTask"
    token_only = AuthInterceptor("full")
    assert token_only.check(predict, [])[0] == grpc.StatusCode.UNAUTHENTICATED  # was open before issue 9
    assert token_only.check(predict, bearer("full")) is None
    open_reads = AuthInterceptor("full", open_reads=True)
    assert open_reads.check(predict, []) is None
    assert open_reads.check(submit, [])[0] == grpc.StatusCode.UNAUTHENTICATED
    assert AuthInterceptor(None).check(submit, []) is None
    assert AuthInterceptor(" full\n").check(submit, bearer("full")) is None  # a file's newline is dropped
    for arguments in (("",), ("  ",), ("full", ""), (None, "read"), ("same", "same"), ("a b",)):
        with pytest.raises(ValueError):
            AuthInterceptor(*arguments)
    for arguments in ((None, None), ("full", "read")):
        with pytest.raises(ValueError):
            AuthInterceptor(*arguments, open_reads=True)


def test_health_watch_through_the_error_interceptor():
    """Health's Watch is non-blocking (a send-callback, no generator); the wrapper must keep that style."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), interceptors=[ErrorInterceptor()])
    servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=10)
            assert next(watch).status == SERVING
            servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()
    finally:
        server.stop(None)


# ---- bad token settings: exit 2 at once, before anything is written -----------------------------


@pytest.mark.parametrize(
    "flags, env, message",
    [
        (["--token", ""], {}, "--token (EVOLVE_TOKEN) is empty"),
        ([], {"EVOLVE_TOKEN": ""}, "--token (EVOLVE_TOKEN) is empty"),
        ([], {"EVOLVE_TOKEN": " \t"}, "--token (EVOLVE_TOKEN) is empty"),
        (["--token", "t", "--read-token", ""], {}, "--read-token (EVOLVE_READ_TOKEN) is empty"),
        (["--token-file", "{empty}"], {}, "is empty"),
        ([], {"EVOLVE_TOKEN_FILE": "{empty}"}, "is empty"),
        (["--token-file", "{missing}"], {}, "cannot read"),
        (["--token", "t", "--token-file", "{full}"], {}, "not both"),
        (["--open-reads", "--read-token", "r"], {"EVOLVE_TOKEN": "t"}, "exclude each other"),
        ([], {"EVOLVE_TOKEN": "t", "EVOLVE_OPEN_READS": "maybe"}, "must be true or false"),
        (["--open-reads"], {}, "--open-reads needs --token"),
        (["--token", "same", "--read-token", "same"], {}, "must differ"),
        (["--read-token", "r"], {}, "--read-token needs --token"),
    ],
)
def test_bad_token_settings_exit_2(tmp_path, flags, env, message):
    files = {"empty": tmp_path / "empty", "missing": tmp_path / "missing", "full": tmp_path / "full"}
    files["empty"].write_text("\n")
    files["full"].write_text(TOKEN)

    def expand(text: str) -> str:
        return text.format(**{name: str(path) for name, path in files.items()})

    state = tmp_path / "state"
    process_env = {k: v for k, v in os.environ.items() if not k.startswith("EVOLVE_")}
    process_env.update({key: expand(value) for key, value in env.items()})
    result = subprocess.run(  # refused before loading anything: well under a second; a server would hang
        [sys.executable, "-m", "service.server", "--state-dir", str(state), *map(expand, flags)],
        cwd=ROOT, env=process_env, capture_output=True, text=True, timeout=20, check=False,
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert not state.exists()


# ---- --token (from a file) alone: every RPC but the probes needs it -----------------------------------


@pytest.fixture(scope="module")
def token_server(server_factory, tmp_path_factory):
    token_file = tmp_path_factory.mktemp("secret") / "token"
    token_file.write_text(TOKEN + "\n")  # as `echo` or a mounted Secret leave it
    return server_factory.start("--token-file", str(token_file), "--workers", "4")


@pytest.fixture(scope="module")
def token_channel(token_server):
    with token_server.channel() as channel:
        yield channel


@pytest.mark.parametrize("name", sorted(READ_CALLS))
def test_token_alone_guards_reads(token_channel, name):
    call, answer = READ_CALLS[name]
    assert call(token_channel, None) == grpc.StatusCode.UNAUTHENTICATED
    assert call(token_channel, bearer("wrong")) == grpc.StatusCode.UNAUTHENTICATED
    assert call(token_channel, bearer(TOKEN)) == answer


@pytest.mark.parametrize("name", sorted(MUTATING_CALLS))
def test_token_alone_guards_mutating_calls(token_channel, name):
    call, answer = MUTATING_CALLS[name]
    assert call(token_channel, None) == grpc.StatusCode.UNAUTHENTICATED
    assert call(token_channel, [("authorization", TOKEN)]) == grpc.StatusCode.UNAUTHENTICATED  # no scheme
    assert call(token_channel, bearer(TOKEN)) == answer


def test_probes_and_health_watch_are_open(token_channel):
    assert health_status(token_channel) == SERVING
    assert health_status(token_channel, "evolve.v1.EvolutionService") == SERVING
    infer = infer_pb2_grpc.GRPCInferenceServiceStub(token_channel)
    assert infer.ServerLive(infer_pb2.ServerLiveRequest(), timeout=TIMEOUT).live
    assert infer.ServerReady(infer_pb2.ServerReadyRequest(), timeout=TIMEOUT).ready
    watch = health_pb2_grpc.HealthStub(token_channel).Watch(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
    assert next(watch).status == SERVING  # was UNKNOWN: "takes 2 positional arguments but 3 were given"
    watch.cancel()


def test_health_watches_hold_no_worker(token_channel):
    """Open, so anyone may watch: 8 watches on 4 workers must leave the server answering."""
    stub = health_pb2_grpc.HealthStub(token_channel)
    watches = [stub.Watch(health_pb2.HealthCheckRequest(), timeout=TIMEOUT) for _ in range(8)]
    try:
        assert [next(watch).status for watch in watches] == [SERVING] * 8
        list_tasks = evolve_pb2_grpc.EvolutionServiceStub(token_channel).ListTasks
        list_tasks(evolve_pb2.ListTasksRequest(), timeout=5, metadata=bearer(TOKEN))
        assert health_status(token_channel, timeout=5) == SERVING
    finally:
        for watch in watches:
            watch.cancel()


# ---- EVOLVE_OPEN_READS: reads open on purpose, mutating calls still guarded ---------------------------


@pytest.fixture(scope="module")
def open_reads_channel(server_factory):
    server = server_factory.start(env={"EVOLVE_TOKEN": TOKEN, "EVOLVE_OPEN_READS": "true"})
    with server.channel() as channel:
        yield channel


@pytest.mark.parametrize("name", sorted(READ_CALLS))
def test_open_reads_need_no_token(open_reads_channel, name):
    call, answer = READ_CALLS[name]
    assert call(open_reads_channel, None) == answer


@pytest.mark.parametrize("name", sorted(MUTATING_CALLS))
def test_open_reads_still_guard_mutating_calls(open_reads_channel, name):
    call, answer = MUTATING_CALLS[name]
    assert call(open_reads_channel, None) == grpc.StatusCode.UNAUTHENTICATED
    assert call(open_reads_channel, bearer("wrong")) == grpc.StatusCode.UNAUTHENTICATED
    assert call(open_reads_channel, bearer(TOKEN)) == answer


# ---- EVOLVE_TOKEN with --read-token over TLS ----------------------------------------------------------


@pytest.fixture(scope="module")
def tls_server(server_factory, tmp_path_factory):
    cert, key = self_signed_certificate(tmp_path_factory.mktemp("tls"))
    credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    return server_factory.start(
        "--tls-cert", str(cert), "--tls-key", str(key), "--read-token", READ_TOKEN,
        credentials=credentials, env={"EVOLVE_TOKEN": TOKEN},  # the token from the environment
    )


@pytest.fixture(scope="module")
def tls_channel(tls_server):
    with tls_server.channel() as channel:
        yield channel


@pytest.mark.parametrize("name", sorted(READ_CALLS))
def test_read_token_allows_reads(tls_channel, name):
    call, answer = READ_CALLS[name]
    assert call(tls_channel, None) == grpc.StatusCode.UNAUTHENTICATED
    assert call(tls_channel, bearer("wrong")) == grpc.StatusCode.UNAUTHENTICATED
    assert call(tls_channel, bearer(READ_TOKEN)) == answer
    assert call(tls_channel, bearer(TOKEN)) == answer


@pytest.mark.parametrize("name", sorted(MUTATING_CALLS))
def test_read_token_is_denied_mutating_calls(tls_channel, name):
    call, answer = MUTATING_CALLS[name]
    assert call(tls_channel, None) == grpc.StatusCode.UNAUTHENTICATED
    assert call(tls_channel, bearer(READ_TOKEN)) == grpc.StatusCode.PERMISSION_DENIED
    assert call(tls_channel, bearer(TOKEN)) == answer


def test_tls_probes_are_open(tls_channel):
    assert health_status(tls_channel) == SERVING
    infer = infer_pb2_grpc.GRPCInferenceServiceStub(tls_channel)
    assert infer.ServerReady(infer_pb2.ServerReadyRequest(), timeout=TIMEOUT).ready


def test_plaintext_clients_are_refused(tls_server):
    with grpc.insecure_channel(tls_server.address) as plaintext:
        infer = infer_pb2_grpc.GRPCInferenceServiceStub(plaintext)
        with pytest.raises(grpc.RpcError) as raised:
            infer.ServerLive(infer_pb2.ServerLiveRequest(), timeout=5)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
