"""Metrics, access logs and request ids (DESIGN §8, issue 11 items 1 and 2).

One real server (`--metrics-port 0 --log-format json --token ...`) for the
module: its /metrics is scraped before, during and after a tiny search, and
its log is read as JSON lines. In-process tests cover the pure helpers and
the interceptor around a plain gRPC server (no JAX).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from service import observability
from service.errors import ErrorInterceptor
from service.gen.evolve.v1 import evolve_pb2, evolve_pb2_grpc
from service.gen.inference import grpc_predict_v2_pb2 as infer_pb2
from service.gen.inference import grpc_predict_v2_pb2_grpc as infer_pb2_grpc
from service.metrics import (
    MAX_TASK_LABELS,
    OTHER_TASK,
    ServerMetrics,
    TaskLabels,
    method_labels,
)
from service.observability import JsonFormatter, ObservabilityInterceptor

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "observability-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
TIMEOUT = 30.0
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


# ---- scraping ---------------------------------------------------------------------------


def scrape(port: int) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of the server's /metrics as (name, labels, value)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return [(s.name, dict(s.labels), s.value) for family in text_string_to_metric_families(text) for s in family.samples]


def value(samples, name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels` (0 when none)."""
    return sum(v for n, ls, v in samples if n == name and labels.items() <= ls.items())


def label_values(samples, name: str, label: str) -> set[str]:
    return {ls[label] for n, ls, _ in samples if n == name and label in ls}


def wait_for(port: int, condition, timeout: float = 60.0, every: float = 0.2):
    """Scrapes until condition(samples) holds; returns those samples."""
    deadline = time.monotonic() + timeout
    samples = scrape(port)
    while not condition(samples):
        if time.monotonic() > deadline:
            raise AssertionError("metrics condition not met; last scrape:\n" + "\n".join(
                f"{n}{ls} {v}" for n, ls, v in samples if n.startswith(("evolve_", "grpc_"))))
        time.sleep(every)
        samples = scrape(port)
    return samples


# ---- the server ---------------------------------------------------------------------------


@dataclasses.dataclass
class Served:
    server: Any  # conftest.RunningServer
    port: int  # of /metrics
    channel: grpc.Channel
    stub: evolve_pb2_grpc.EvolutionServiceStub


@pytest.fixture(scope="module")
def served(server_factory, tmp_path_factory) -> Served:
    """A server with metrics, JSON logs and a token."""
    metrics_file = tmp_path_factory.mktemp("metrics") / "port"
    server = server_factory.start("--metrics-port", "0", "--metrics-port-file", str(metrics_file),
                                  "--log-format", "json", "--token", TOKEN)
    channel = server.channel()
    yield Served(server, int(metrics_file.read_text()), channel, evolve_pb2_grpc.EvolutionServiceStub(channel))
    channel.close()


def submit(stub, name: str) -> evolve_pb2.Operation:
    spec = evolve_pb2.TaskSpec(name=name, bundled=evolve_pb2.BundledSource(name=name))
    return stub.SubmitTask(evolve_pb2.SubmitTaskRequest(spec=spec), metadata=AUTH, timeout=TIMEOUT)


def wait_done(stub, name: str, timeout: float = 300.0) -> evolve_pb2.Operation:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        operation = stub.GetOperation(evolve_pb2.GetOperationRequest(name=name), metadata=AUTH, timeout=TIMEOUT)
        if operation.done:
            return operation
        time.sleep(0.2)
    raise AssertionError(f"{name} not done within {timeout} s")


def images(count: int) -> np.ndarray:
    return np.random.default_rng(7).integers(0, 256, size=(count, 8, 8, 3), dtype=np.uint8)


def test_rpc_counts_and_latency_by_method_and_code(served):
    key = {"grpc_service": "evolve.v1.EvolutionService", "grpc_method": "GetTask"}
    before = scrape(served.port)
    with pytest.raises(grpc.RpcError) as missing:
        served.stub.GetTask(evolve_pb2.GetTaskRequest(name="no_such_task"), metadata=AUTH, timeout=TIMEOUT)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as denied:  # denied by service.auth, inside the observing interceptor
        served.stub.GetTask(evolve_pb2.GetTaskRequest(name="no_such_task"), timeout=TIMEOUT)
    assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
    served.stub.GetSystem(evolve_pb2.GetSystemRequest(), metadata=AUTH, timeout=TIMEOUT)
    after = scrape(served.port)
    for code in ("NOT_FOUND", "UNAUTHENTICATED"):
        for name in ("grpc_server_handled_total", "grpc_server_handling_seconds_count"):
            assert value(after, name, **key, grpc_code=code) - value(before, name, **key, grpc_code=code) == 1, name
    assert value(after, "grpc_server_started_total", **key) - value(before, "grpc_server_started_total", **key) == 2
    ok = {"grpc_method": "GetSystem", "grpc_code": "OK", "grpc_type": "unary"}
    assert value(after, "grpc_server_handled_total", **ok) == value(before, "grpc_server_handled_total", **ok) + 1
    assert value(after, "grpc_server_handling_seconds_sum", **ok) > value(before, "grpc_server_handling_seconds_sum", **ok)
    assert value(after, "evolve_ready") == 1
    assert value(after, "process_resident_memory_bytes") > 0


def test_unknown_methods_share_one_label(served):
    before = scrape(served.port)
    for method in ("/no.such.Service/Anything", "/evolve.v1.EvolutionService/NoSuchMethod", "/x/y\tz"):
        with pytest.raises(grpc.RpcError) as error:
            served.channel.unary_unary(method)(b"", metadata=AUTH, timeout=TIMEOUT)
        assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
    samples = scrape(served.port)
    unknown = {"grpc_service": "unknown", "grpc_method": "unknown", "grpc_code": "UNIMPLEMENTED"}
    assert value(samples, "grpc_server_handled_total", **unknown) - value(before, "grpc_server_handled_total",
                                                                          **unknown) == 3
    assert not {"no.such.Service", "x"} & label_values(samples, "grpc_server_handled_total", "grpc_service")
    assert "NoSuchMethod" not in label_values(samples, "grpc_server_handled_total", "grpc_method")
    logged = wait_for_access(served.server, lambda e: e["method"].startswith("/x/"))
    assert [e["method"] for e in logged] == ["/x/y\\tz"]  # escaped: no raw control character in the log


def test_search_queue_operations_training_and_checkpoints(served):
    before = scrape(served.port)
    first = submit(served.stub, "digits")
    second = submit(served.stub, "digits_parity")  # waits behind the first
    during = wait_for(served.port, lambda s: value(s, "evolve_operations_running") == 1
                      and value(s, "evolve_operation_queue_depth") == 1)
    assert value(during, "evolve_operation_queue_capacity") == 16
    served.stub.CancelOperation(evolve_pb2.CancelOperationRequest(name=second.name), metadata=AUTH, timeout=TIMEOUT)
    done = wait_done(served.stub, first.name)
    assert done.metadata.state == evolve_pb2.OPERATION_STATE_SUCCEEDED, done
    plan = done.metadata.plan
    candidates = plan.generations * plan.candidates_per_generation

    after = wait_for(served.port, lambda s: value(s, "evolve_operation_duration_seconds_count", kind="extension",
                                           state="SUCCEEDED") == 1)
    assert value(after, "evolve_operation_queue_depth") == 0 and value(after, "evolve_operations_running") == 0
    assert value(after, "evolve_operation_duration_seconds_count", kind="extension", state="CANCELLED") == 1
    assert value(after, "evolve_operation_duration_seconds_sum", kind="extension", state="SUCCEEDED") > 0
    assert value(after, "evolve_search_duration_seconds_count", kind="extension", state="SUCCEEDED") == 1
    # Training throughput and compile time, from the search's events.
    assert value(after, "evolve_candidates_total", task="digits") == candidates
    examples_per_candidate = plan.steps_per_candidate * plan.batch_size
    assert value(after, "evolve_train_examples_total", task="digits") == candidates * examples_per_candidate
    assert value(after, "evolve_train_seconds_total", task="digits") > 0
    assert value(after, "evolve_train_examples_per_second", task="digits") > 0
    assert value(after, "evolve_generations_total", task="digits") == plan.generations
    assert value(after, "evolve_search_compile_seconds_count", kind="extension") == 1
    assert value(after, "evolve_candidate_compile_seconds_count") == candidates
    # Checkpoints: the two submits, the cancel, the search's own, the operation's end.
    saves = value(after, "evolve_checkpoint_duration_seconds_count") - value(
        before, "evolve_checkpoint_duration_seconds_count")
    assert saves >= 4
    assert value(after, "evolve_checkpoint_duration_seconds_sum") > 0
    assert value(after, "evolve_checkpoint_new_components_total") >= 1  # the task's trained components
    assert value(after, "evolve_checkpoint_bytes_sum") > value(before, "evolve_checkpoint_bytes_sum") + 1000
    assert value(after, "evolve_checkpoint_bytes_count") == value(after, "evolve_checkpoint_duration_seconds_count")
    assert value(after, "evolve_checkpoint_failures_total") == 0
    assert value(after, "evolve_checkpoint_last_success_timestamp_seconds") > time.time() - 300

    # Parameters per task, as GetSystem reports them (the snapshot refreshes on the search's end).
    system = served.stub.GetSystem(evolve_pb2.GetSystemRequest(), metadata=AUTH, timeout=TIMEOUT)
    charged = system.params_per_task["digits"]
    assert charged > 0
    after = wait_for(served.port, lambda s: value(s, "evolve_task_params", task="digits") == pytest.approx(charged))
    assert value(after, "evolve_tasks", status="READY") == 1
    assert value(after, "evolve_components") == system.num_components
    assert value(after, "evolve_params") == system.total_params
    assert value(after, "evolve_checkpoint_step") >= 2


def test_inference_latency_per_task(served):
    before = scrape(served.port)
    batch = images(4)
    array = evolve_pb2.Tensor(shape=list(batch.shape), datatype="UINT8", data=batch.tobytes())
    for _ in range(3):
        served.stub.Predict(evolve_pb2.PredictRequest(task="digits", array=array), metadata=AUTH, timeout=TIMEOUT)
    infer = infer_pb2_grpc.GRPCInferenceServiceStub(served.channel)
    request = infer_pb2.ModelInferRequest(model_name="digits")
    request.inputs.add(name="images", datatype="UINT8", shape=list(batch.shape))
    request.raw_input_contents.append(batch.tobytes())
    infer.ModelInfer(request, metadata=AUTH, timeout=TIMEOUT)
    with pytest.raises(grpc.RpcError) as error:
        served.stub.Predict(evolve_pb2.PredictRequest(task="ghost_task", array=array), metadata=AUTH, timeout=TIMEOUT)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    after = scrape(served.port)
    name = "evolve_inference_seconds_count"
    assert value(after, name, task="digits", method="Predict") - value(before, name, task="digits",
                                                                       method="Predict") == 3
    assert value(after, name, task="digits", method="ModelInfer") - value(before, name, task="digits",
                                                                          method="ModelInfer") == 1
    assert value(after, "evolve_inference_seconds_bucket", task="digits", method="Predict", le="+Inf") >= 3
    assert "ghost_task" not in label_values(after, "evolve_inference_seconds_count", "task")  # bounded labels
    assert value(after, "grpc_server_handled_total", grpc_method="Predict", grpc_code="NOT_FOUND") >= 1


def test_request_ids_and_traceparent_are_echoed(served):
    request = evolve_pb2.GetSystemRequest()
    sent = AUTH + (("x-request-id", "client-rid-42"), ("traceparent", TRACEPARENT))
    _, call = served.stub.GetSystem.with_call(request, metadata=sent, timeout=TIMEOUT)
    echoed = dict(call.initial_metadata())
    assert echoed["x-request-id"] == "client-rid-42" and echoed["traceparent"] == TRACEPARENT

    _, call = served.stub.GetSystem.with_call(request, metadata=AUTH, timeout=TIMEOUT)
    minted = dict(call.initial_metadata())["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", minted)

    # An id that could break a log line is replaced, not echoed.
    _, call = served.stub.GetSystem.with_call(request, metadata=AUTH + (("x-request-id", 'a "b" c'),), timeout=TIMEOUT)
    assert re.fullmatch(r"[0-9a-f]{32}", dict(call.initial_metadata())["x-request-id"])

    with pytest.raises(grpc.RpcError) as error:  # errors carry it too
        served.stub.GetTask(evolve_pb2.GetTaskRequest(name="no_such_task"), metadata=AUTH + (("x-request-id", "rid-err"),),
                     timeout=TIMEOUT)
    assert dict(error.value.initial_metadata())["x-request-id"] == "rid-err"


def test_streams_are_logged_when_they_end(served):
    stream = served.stub.WatchEvolution(evolve_pb2.WatchEvolutionRequest(after_sequence=0),
                                 metadata=AUTH + (("x-request-id", "rid-watch"),), timeout=TIMEOUT)
    next(stream)  # the search's events are retained
    assert dict(stream.initial_metadata())["x-request-id"] == "rid-watch"
    stream.cancel()
    lines = wait_for_access(served.server, lambda entry: entry.get("request_id") == "rid-watch")
    (entry,) = lines
    assert entry["method"] == "/evolve.v1.EvolutionService/WatchEvolution" and entry["code"] == "CANCELLED"


def json_lines(server) -> list[dict]:
    return [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]


def wait_for_access(server, predicate, timeout: float = 30.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in json_lines(server) if e["logger"] == "evolve.access" and predicate(e)]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def test_busy_metrics_port_fails_the_start(served, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "service.server", "--port", "0", "--state-dir", str(tmp_path / "state"),
         "--metrics-port", str(served.port)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("EVOLVE_")}, "JAX_PLATFORMS": "cpu"},
    )
    assert result.returncode == 1, result.stderr
    assert "cannot serve metrics" in result.stderr


def test_json_log_lines_and_access_lines(served):
    """Last: stops the server, then reads its whole log."""
    assert served.server.stop() == 0
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        scrape(served.port)  # the endpoint stopped with the server
    text = served.server.log()
    lines = [line for line in text.splitlines() if line.strip()]
    entries = []
    for line in lines:
        if line.startswith("{"):
            entries.append(json.loads(line))
        else:  # only gRPC's native core may write outside Python's logging
            assert re.match(r"^(WARNING: All log messages before absl|[IWE]\d{4} )", line), line
    assert len(entries) > 0.9 * len(lines)
    for entry in entries:
        assert {"time", "level", "logger", "message"} <= entry.keys(), entry
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"])
    access = [e for e in entries if e["logger"] == "evolve.access"]
    (traced,) = [e for e in access if e.get("request_id") == "client-rid-42"]
    assert traced["method"] == "/evolve.v1.EvolutionService/GetSystem" and traced["code"] == "OK"
    assert traced["trace_id"] == TRACEPARENT.split("-")[1]
    assert traced["peer"].startswith("ipv4:127.0.0.1:") and traced["duration_ms"] >= 0
    assert traced["level"] == "INFO" and "GetSystem OK" in traced["message"]
    (failed,) = [e for e in access if e.get("request_id") == "rid-err"]
    assert failed["code"] == "NOT_FOUND"
    assert any(e["code"] == "UNAUTHENTICATED" and e["method"].endswith("/GetTask") for e in access)
    assert all(re.fullmatch(r"[!#-\[\]-~]{1,128}", e["request_id"]) for e in access)
    assert any(e["method"] == "/grpc.health.v1.Health/Check" for e in access)
    assert any(e["message"].startswith("final checkpoint") for e in entries)


# ---- in process: helpers, the formatter, the interceptor ------------------------------------------


def test_escape_keeps_control_characters_out():
    assert observability.escape("a\nb\x1b[31m\u2028") == "a\\nb\\x1b[31m\\u2028"
    assert len(observability.escape("x" * 10_000)) == observability.MAX_LOGGED_TEXT
    assert observability.escape("/evolve.v1.EvolutionService/GetTask") == "/evolve.v1.EvolutionService/GetTask"


def test_request_ids_and_trace_headers_are_checked():
    assert observability.valid_request_id(" abc-123 ") == "abc-123"
    assert observability.valid_request_id("Root=1-5759e988;Parent=53995c3f") == "Root=1-5759e988;Parent=53995c3f"
    for bad in ("", "a b", 'a"b', "a\\b", "x" * 129, "é", "a\nb"):
        assert observability.valid_request_id(bad) is None, bad
    trace = observability.parse_traceparent(TRACEPARENT)
    assert trace.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736" and trace.parent_id == "00f067aa0ba902b7"
    for bad in ("", "00-" + "0" * 32 + "-00f067aa0ba902b7-01", "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                TRACEPARENT.upper(), TRACEPARENT + "0", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\n-", "00-4bf9-00f067aa0ba902b7-01"):
        assert observability.parse_traceparent(bad) is None, bad
    context, minted = observability.request_context([("x-request-id", "given")])
    assert (context.request_id, minted) == ("given", False)
    context, minted = observability.request_context([("x-request-id", "bad id")])
    assert minted and re.fullmatch(r"[0-9a-f]{32}", context.request_id)


def test_json_formatter_writes_one_parseable_line():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("test.observability.json")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("client said %r", "line\nbreak", extra={"method": "/x/Y", "duration_ms": 1.5})
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
    finally:
        log.removeHandler(handler)
    first, second = stream.getvalue().splitlines()
    entry = json.loads(first)
    assert entry["level"] == "WARNING" and entry["logger"] == "test.observability.json"
    assert entry["message"] == "client said 'line\\nbreak'" and entry["method"] == "/x/Y" and entry["duration_ms"] == 1.5
    assert "request_id" not in entry
    assert "ValueError: boom" in json.loads(second)["exception"]


def test_bounded_labels():
    labels = TaskLabels(limit=2)
    assert labels.of("a") == "a" and labels.of("b") == "b"
    assert labels.of("c") == OTHER_TASK and labels.of("a") == "a"
    assert TaskLabels().of("never_seen", admit=False) == OTHER_TASK
    assert MAX_TASK_LABELS >= 100
    assert method_labels("/evolve.v1.EvolutionService/GetTask") == ("evolve.v1.EvolutionService", "GetTask")
    assert method_labels("") == ("unknown", "unknown")


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def plain_server():
    """A health service behind the observing and the error interceptors, with metrics (no engine)."""
    metrics = ServerMetrics(ready=lambda: True)
    capture = _Capture()
    access = logging.getLogger(observability.ACCESS_LOGGER)
    access.addHandler(capture)
    access.setLevel(logging.INFO)
    servicer = health.HealthServicer(experimental_non_blocking=True)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2),
                         interceptors=[ObservabilityInterceptor(metrics), ErrorInterceptor()])
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port, metrics, capture.records, servicer
    finally:
        server.stop(None)
        access.removeHandler(capture)


def test_health_watches_stay_non_blocking_and_are_logged_at_their_end(plain_server):
    port, metrics, records, servicer = plain_server
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = health_pb2_grpc.HealthStub(channel)
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    watches = [stub.Watch(health_pb2.HealthCheckRequest(), metadata=(("x-request-id", f"w{i}"),)) for i in range(4)]
    for watch in watches:  # four watches on two worker threads: none holds a thread
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    assert stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    assert not any(r.request_id.startswith("w") for r in records)  # still open: not logged yet
    for watch in watches:
        watch.cancel()
    deadline = time.monotonic() + 10
    while sum(r.request_id.startswith("w") for r in records) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    ended = sorted((r.request_id, r.code) for r in records if r.request_id.startswith("w"))
    assert ended == [(f"w{i}", "CANCELLED") for i in range(4)]
    channel.close()
    samples = _samples(metrics)
    watch = {"grpc_service": "grpc.health.v1.Health", "grpc_method": "Watch", "grpc_type": "server_stream"}
    assert value(samples, "grpc_server_handled_total", **watch, grpc_code="CANCELLED") == 4
    assert value(samples, "grpc_server_handled_total", grpc_method="Check", grpc_code="OK") == 1


def _samples(metrics: ServerMetrics):
    from prometheus_client import generate_latest

    text = generate_latest(metrics.registry).decode()
    return [(s.name, dict(s.labels), s.value) for f in text_string_to_metric_families(text) for s in f.samples]


def test_deadline_exceeded_while_running_is_logged_as_such():
    """A handler still running when the client's deadline passes."""
    capture = _Capture()
    access = logging.getLogger(observability.ACCESS_LOGGER)
    access.addHandler(capture)
    access.setLevel(logging.INFO)
    release = threading.Event()

    def slow(request, context):
        release.wait(5)
        return b""

    handler = grpc.method_handlers_generic_handler("test.Slow", {"Call": grpc.unary_unary_rpc_method_handler(slow)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), interceptors=[ObservabilityInterceptor()])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.RpcError) as error:
                channel.unary_unary("/test.Slow/Call")(b"", timeout=0.3)
            assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            deadline = time.monotonic() + 5
            while not capture.records and time.monotonic() < deadline:
                time.sleep(0.05)
            assert [r.code for r in capture.records] == ["DEADLINE_EXCEEDED"]
    finally:
        release.set()
        server.stop(None)
        access.removeHandler(capture)


# ---- flags and the deployment -------------------------------------------------------------------


def test_metrics_and_log_flags():
    import argparse

    from service.server import add_serve_arguments, options_from_args

    def options(*argv: str):
        return options_from_args(add_serve_arguments(argparse.ArgumentParser()).parse_args(list(argv)))

    assert options().metrics_port is None and options().log_format == "text"
    chosen = options("--metrics-port", "0", "--log-format", "json", "--metrics-host", "0.0.0.0")
    assert (chosen.metrics_port, chosen.log_format, chosen.metrics_host) == (0, "json", "0.0.0.0")
    for bad in (("--metrics-port", "70000"), ("--metrics-port", "8500", "--port", "8500")):
        with pytest.raises(ValueError, match="--metrics-port"):
            options(*bad)


def test_statefulset_exposes_metrics_to_prometheus():
    (statefulset,) = [doc for doc in yaml.safe_load_all((ROOT / "deploy/k8s/base/statefulset.yaml").read_text())
                      if doc and doc["kind"] == "StatefulSet"]
    template = statefulset["spec"]["template"]
    (container,) = template["spec"]["containers"]
    env = {entry["name"]: entry.get("value") for entry in container["env"]}
    (port,) = [p for p in container["ports"] if p["name"] == "metrics"]
    assert port["containerPort"] == int(env["EVOLVE_METRICS_PORT"])
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == env["EVOLVE_METRICS_PORT"]
    assert annotations["prometheus.io/path"] == "/metrics"
