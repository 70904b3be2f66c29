"""Fixtures that run a REAL server (`python -m service.server`) in a subprocess.

    def test_something(server_factory):
        server = server_factory.start("--max-queue", "1")   # waits for SERVING
        with server.channel() as channel: ...
        assert server.stop() == 0                           # SIGTERM, exit code

Servers use TINY_ARGS (a 2-block width-32 ViT, one generation of two
candidates: a bundled task's search takes a few seconds on 2 CPU cores) and
share one JAX compilation cache per test session. `server_factory` is module
scoped: a module shares its servers, and whatever is still running at the end
of the module is stopped (killed if it will not stop).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]

# The test configuration of tests/conftest.py:tiny_config(), as server flags,
# with a one-generation search.
TINY_SETTINGS = {
    "size.name": "test",
    "size.hidden_size": 32,
    "size.num_layers": 2,
    "size.num_heads": 2,
    "size.mlp_dim": 64,
    "max_layers": 3,
    "generations": 1,
    "candidates_per_generation": 2,
    "train_rounds": 2,
    "examples_per_round": 256,
    "batch_size": 32,
    "eval_batch_size": 256,
    "population_size": 4,
    "image_sizes": [16],
    "default_image_size": 16,
}
TINY_ARGS = tuple(arg for key, value in TINY_SETTINGS.items() for arg in ("--set", f"{key}={value}"))

STARTUP_TIMEOUT = 180.0


def health_status(channel: grpc.Channel, service: str = "", timeout: float = 2.0) -> int:
    """The server's health status (health_pb2.HealthCheckResponse enum)."""
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout).status


@dataclasses.dataclass
class RunningServer:
    """A server subprocess; its stderr log is in `log_path`."""

    process: subprocess.Popen
    state_dir: Path
    log_path: Path
    port_file: Path
    credentials: grpc.ChannelCredentials | None = None
    tls_server_name: str | None = None
    port: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def channel(self, credentials: grpc.ChannelCredentials | None = None) -> grpc.Channel:
        """A new channel to the server (TLS with the server's credentials when it has them)."""
        credentials = credentials or self.credentials
        if credentials is None:
            return grpc.insecure_channel(self.address)
        options = [("grpc.ssl_target_name_override", self.tls_server_name)] if self.tls_server_name else []
        return grpc.secure_channel(self.address, credentials, options=options)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_port(self, timeout: float = STARTUP_TIMEOUT) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.port_file.exists() and self.port_file.read_text().strip():
                self.port = int(self.port_file.read_text())
                return self.port
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            time.sleep(0.05)
        raise TimeoutError(f"server did not listen within {timeout} s:\n{self.log()[-4000:]}")

    def wait_serving(self, timeout: float = STARTUP_TIMEOUT) -> list[int]:
        """Polls health until SERVING; returns the distinct statuses seen, in order."""
        self.wait_for_port(timeout)
        seen: list[int] = []
        deadline = time.monotonic() + timeout
        with self.channel() as channel:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()[-4000:]}")
                try:
                    status = health_status(channel)
                except grpc.RpcError:
                    status = None
                if status is not None and (not seen or seen[-1] != status):
                    seen.append(status)
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return seen
                time.sleep(0.1)
        raise TimeoutError(f"server not SERVING within {timeout} s:\n{self.log()[-4000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120.0) -> int:
        """Sends `sig` and returns the exit code (kills after `timeout`)."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise
        return self.process.returncode


def _copy_stream(stream, path: Path) -> None:
    with open(path, "ab", buffering=0) as out:
        for chunk in iter(lambda: stream.read1(65536), b""):
            out.write(chunk)


class ServerFactory:
    """Starts servers and stops those still running when the module ends."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory, cache_dir: Path):
        self._tmp = tmp_path_factory
        self._cache_dir = cache_dir
        self._servers: list[RunningServer] = []

    def start(
        self,
        *args: str,
        state_dir: Path | None = None,
        tiny: bool = True,
        wait: bool = True,
        credentials: grpc.ChannelCredentials | None = None,
        tls_server_name: str | None = None,
        env: dict[str, str] | None = None,
        log_pipe: bool = False,
    ) -> RunningServer:
        """Starts `python -m service.server` on a free port; waits for SERVING.

        With `log_pipe` the server writes its log into a pipe that this process
        copies to the log file, so the log survives a file size limit put on
        the server (the disk-full tests)."""
        run_dir = self._tmp.mktemp("server")
        state_dir = state_dir or run_dir / "state"
        port_file = run_dir / "port"
        command = [
            sys.executable, "-m", "service.server", "--port", "0", "--port-file", str(port_file),
            "--state-dir", str(state_dir), "--compilation-cache-dir", str(self._cache_dir),
            "--grace-seconds", "5", *(TINY_ARGS if tiny else ()), *args,
        ]
        log_path = run_dir / "server.log"
        process_env = {k: v for k, v in os.environ.items() if not k.startswith("EVOLVE_")}
        process_env.update(env or {})
        process_env.setdefault("JAX_PLATFORMS", "cpu")
        if log_pipe:
            process = subprocess.Popen(
                command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=process_env
            )
            threading.Thread(target=_copy_stream, args=(process.stdout, log_path), daemon=True).start()
        else:
            with open(log_path, "wb") as log:
                process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=process_env)
        server = RunningServer(process, Path(state_dir), log_path, port_file, credentials, tls_server_name)
        self._servers.append(server)
        if wait:
            server.wait_serving()
        return server

    def close(self) -> None:
        for server in self._servers:
            if server.process.poll() is None:
                try:
                    server.stop(timeout=30)
                except subprocess.TimeoutExpired:
                    pass


@pytest.fixture(scope="session")
def compilation_cache_dir(tmp_path_factory) -> Path:
    """One JAX compilation cache for every server of the session."""
    return tmp_path_factory.mktemp("xla_cache")


@pytest.fixture(scope="module")
def server_factory(tmp_path_factory, compilation_cache_dir):
    factory = ServerFactory(tmp_path_factory, compilation_cache_dir)
    yield factory
    factory.close()
