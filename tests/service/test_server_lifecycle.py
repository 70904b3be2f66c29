"""Starting and stopping: health NOT_SERVING while the system loads, calls
UNAVAILABLE until then, bad flags, a busy port, the warning for an exposed
server without a token, and a drain while still loading."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from grpc_status import rpc_status

from service.gen.evolve.v1 import evolve_pb2, evolve_pb2_grpc
from service.gen.inference import grpc_predict_v2_pb2 as infer_pb2
from service.gen.inference import grpc_predict_v2_pb2_grpc as infer_pb2_grpc
from tests.service.conftest import ROOT, health_status

SERVICES = ("", "evolve.v1.EvolutionService", "inference.GRPCInferenceService")
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING


def test_not_serving_until_the_system_is_loaded(server_factory):
    server = server_factory.start("--startup-delay-seconds", "4", wait=False)
    server.wait_for_port()
    with server.channel() as channel:
        assert [health_status(channel, name) for name in SERVICES] == [NOT_SERVING] * 3
        infer = infer_pb2_grpc.GRPCInferenceServiceStub(channel)
        assert infer.ServerLive(infer_pb2.ServerLiveRequest(), timeout=5).live
        assert not infer.ServerReady(infer_pb2.ServerReadyRequest(), timeout=5).ready
        with pytest.raises(grpc.RpcError) as raised:
            evolve_pb2_grpc.EvolutionServiceStub(channel).GetSystem(evolve_pb2.GetSystemRequest(), timeout=5)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        status = rpc_status.from_call(raised.value)
        assert any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in status.details)

        seen = server.wait_serving()
        assert seen[0] == NOT_SERVING and seen[-1] == SERVING
        assert [health_status(channel, name) for name in SERVICES] == [SERVING] * 3
        assert infer.ServerReady(infer_pb2.ServerReadyRequest(), timeout=5).ready
    assert server.stop() == 0


def test_exposed_server_warns_and_drains_while_loading(server_factory):
    server = server_factory.start("--host", "0.0.0.0", "--startup-delay-seconds", "60", wait=False)
    server.wait_for_port()
    started = time.monotonic()
    assert server.stop(signal.SIGTERM, timeout=30) == 0
    assert time.monotonic() - started < 20
    log = server.log()
    assert "WITHOUT A TOKEN" in log and "WARNING" in log
    # tfds is imported before the gRPC server serves a call (evolve.data.tfds_source.preload)
    assert 0 <= log.index("tensorflow_datasets imported") < log.index("listening on")


def test_busy_port_exits_nonzero(server_factory):
    first = server_factory.start("--startup-delay-seconds", "60", wait=False)
    port = first.wait_for_port()
    busy = subprocess.run(
        [sys.executable, "-m", "service.server", "--port", str(port), "--state-dir", str(first.state_dir)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert busy.returncode == 1, busy.stderr
    assert "cannot" in busy.stderr
    assert first.stop() == 0


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--read-token", "r"], "--read-token needs --token"),
        (["--set", "no_such_field=1"], "no_such_field"),
        (["--set", "generations"], "KEY=VALUE"),
        (["--tls-cert", "/no/cert.pem"], "--tls-cert and --tls-key"),
        (["--root", "/no/root.npz"], "--root"),
        (["--config", "huge"], "unknown configuration"),
    ],
)
def test_bad_flags_exit_2(tmp_path, flags, message):
    result = subprocess.run(
        [sys.executable, "-m", "service.server", "--state-dir", str(tmp_path), *flags],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


def test_root_from_a_vit_jax_npz(server_factory, tmp_path):
    jax = pytest.importorskip("jax")
    from evolve.models import root
    from evolve.types import ViTSize

    size = ViTSize("npz-test", patch_size=4, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64)
    params = root.random_root(size, image_size=16, rng=jax.random.key(0))
    path = tmp_path / "ViT-test.npz"
    root.save_vit_npz(path, size, params, num_classes=10)
    server = server_factory.start("--root", str(path), tiny=False)
    with server.channel() as channel:
        system = evolve_pb2_grpc.EvolutionServiceStub(channel).GetSystem(evolve_pb2.GetSystemRequest(), timeout=10)
    assert system.root_model.startswith("vit_npz:ViT-test.npz") and system.num_components == 6
    assert server.stop() == 0
