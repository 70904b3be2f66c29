"""The typed client and the `evolve` command line.

Unit tests (parsing, spec building, tensors, rendering, error rendering and
watch resumption against small in-process gRPC servers) run in a second or
two; the rest talks to a real `python -m service.server` subprocess (the
`server_factory` of tests/service/conftest.py, tiny configuration), through
the client and through the CLI in subprocesses.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import types as pytypes
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from evolve import types
from service import cli
from service import client as client_lib
from service.gen.evolve.v1 import evolve_pb2, evolve_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]


# ---- helpers ------------------------------------------------------------------------


def run_main(argv, capsys):
    """main(argv) in-process: (exit code, stdout, stderr)."""
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class InProcessServer:
    """A grpc server on a free local port with the given servicer."""

    def __init__(self, servicer):
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        evolve_pb2_grpc.add_EvolutionServiceServicer_to_server(servicer, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.target = f"127.0.0.1:{self.port}"

    def __enter__(self):
        self.server.start()
        return self

    def __exit__(self, *exc_info):
        self.server.stop(None)


def event(sequence, task="digits", operation="operations/1", **kind):
    message = evolve_pb2.Event(sequence=sequence, task=task, operation=operation)
    for name, value in kind.items():
        getattr(message, name).CopyFrom(value)
    return message


def search_events(operation="operations/1", task="digits", start=1):
    """A plausible search: 1 generation of 2 candidates, then the end."""
    return [
        event(start, task, operation,
              generation_started=evolve_pb2.GenerationStarted(generation=1, generations=1, candidates=2)),
        event(start + 1, task, operation, candidate_scored=evolve_pb2.CandidateScored(
            path_id="p-1", parent_id="root", parent_task="__root__", generation=1, score=0.81, quality=0.81,
            params=12345, flops=2.5e6, mutations=["clone:head", "hp:learning_rate"], accepted_into_population=True)),
        event(start + 2, task, operation,
              candidate_accepted=evolve_pb2.CandidateAccepted(path_id="p-1", score=0.81, quality=0.81)),
        event(start + 3, task, operation, candidate_scored=evolve_pb2.CandidateScored(
            path_id="p-2", parent_id="p-1", parent_task=task, generation=1, score=0.5, quality=0.5,
            params=23456, flops=3e6, mutations=[], accepted_into_population=False)),
        event(start + 4, task, operation, search_finished=evolve_pb2.SearchFinished(
            path_id="p-1", score=0.81, quality=0.81, test_accuracy=0.79, state="SUCCEEDED")),
        event(start + 5, "", operation,
              checkpoint_written=evolve_pb2.CheckpointWritten(step=1, directory="/s", new_components=3)),
    ]


def sample_task(name="digits") -> evolve_pb2.Task:
    task = evolve_pb2.Task(
        name=name, status=evolve_pb2.TASK_STATUS_READY, best_score=0.9, validation_accuracy=0.9,
        test_accuracy=0.88, params=1450, accounted_params=1050.5, own_params=650, path_params=1450, flops=2e6,
        path_version=2, num_classes=10,
        shares_with=["digits_parity"], spec=client_lib.spec_to_proto(types.TaskSpec(name, types.BundledSource(name))),
    )
    task.components.add(name="embedding", id="c-1", locked_by=["__root__", name, "digits_parity"], params=800)
    task.components.add(name="head", id="c-2", locked_by=[name], params=650)
    task.hparams["learning_rate"] = "0.05"
    task.hparams["_mu_|clone:head"] = "0.1"
    return task


# ---- parsing ---------------------------------------------------------------------------


def test_global_options_go_before_or_after_the_command(monkeypatch):
    monkeypatch.delenv("EVOLVE_SERVER", raising=False)
    parser = cli.build_parser()
    before = parser.parse_args(["--server", "h:1", "--json", "--token", "t", "tasks"])
    after = parser.parse_args(["tasks", "--server", "h:1", "--json", "--token", "t"])
    for args in (before, after):
        assert (args.server, args.json, args.token, args.command) == ("h:1", True, "t", "tasks")
    plain = parser.parse_args(["tasks"])
    assert (plain.server, plain.json, plain.token) == ("localhost:8500", False, None)


def test_environment_gives_server_and_token(monkeypatch):
    monkeypatch.setenv("EVOLVE_SERVER", "example:9000")
    monkeypatch.setenv("EVOLVE_TOKEN", "secret")
    args = cli.build_parser().parse_args(["task", "digits"])
    assert (args.server, args.token, args.name) == ("example:9000", "secret", "digits")


@pytest.mark.parametrize("argv", [
    ["submit", "x"],                                       # no source
    ["submit", "x", "--bundled", "a", "--npz", "b.npz"],   # two sources
    ["submit", "x", "--bundled", "a", "--generations", "0"],
    ["predict", "digits"],                                 # no input
    ["nonsense"],
    ["tasks", "--bogus"],
])
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert "usage:" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["submit", "tasks", "task", "watch", "predict", "improve", "cancel",
                                     "operations", "operation", "system", "health", "demo"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0 and f"usage: evolve {command}" in capsys.readouterr().out


def test_tfds_options_without_tfds_are_a_usage_error(capsys):
    code, _, err = run_main(["submit", "x", "--npz", "a.npz", "--validation-split", "train[:10]"], capsys)
    assert code == 2 and "--tfds" in err


def test_serve_forwards_its_arguments_without_parsing_them(monkeypatch):
    seen = {}
    fake = pytypes.ModuleType("service.server")

    def add_serve_arguments(parser):
        parser.add_argument("--port", type=int)
        parser.add_argument("--token")
        parser.add_argument("--set", action="append", default=[])

    def serve_from_args(args):
        seen.update(vars(args))
        return 0

    fake.add_serve_arguments, fake.serve_from_args = add_serve_arguments, serve_from_args
    import service

    monkeypatch.setitem(sys.modules, "service.server", fake)
    monkeypatch.setattr(service, "server", fake, raising=False)
    assert cli.main(["serve", "--port", "5", "--token", "t", "--set", "generations=1"]) == 0
    assert seen == {"port": 5, "token": "t", "set": ["generations=1"]}


def test_client_commands_do_not_import_jax():
    code = ("import sys, service.cli, service.client, service.demo; "
            "bad = [m for m in ('jax', 'tensorflow', 'service.server') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


# ---- task specs -------------------------------------------------------------------------


def spec_of(argv):
    return client_lib.spec_to_proto(cli.build_spec(cli.build_parser().parse_args(argv)))


def test_bundled_spec_with_budget():
    spec = spec_of(["submit", "d", "--bundled", "digits", "--generations", "3", "--candidates", "2",
                    "--rounds", "1", "--examples-per-round", "512"])
    assert spec.name == "d" and spec.WhichOneof("source") == "bundled" and spec.bundled.name == "digits"
    assert (spec.budget.generations, spec.budget.candidates_per_generation, spec.budget.train_rounds,
            spec.budget.examples_per_round) == (3, 2, 1, 512)


def test_budget_left_unset_stays_unset():
    spec = spec_of(["submit", "d", "--bundled", "digits", "--rounds", "2"])
    assert spec.budget.HasField("train_rounds") and not spec.budget.HasField("generations")
    assert not spec.budget.HasField("candidates_per_generation")


def test_tfds_spec_defaults_and_options():
    spec = spec_of(["submit", "c", "--tfds", "cifar10"])
    tfds = spec.tfds
    assert (tfds.name, tfds.train_split, tfds.test_split, tfds.image_key, tfds.label_key) == (
        "cifar10", "train", "test", "image", "label")
    assert not tfds.HasField("validation_split") and not tfds.HasField("data_dir")
    spec = spec_of(["submit", "c", "--tfds", "oxford_flowers102:2.1.1", "--data-dir", "/data",
                    "--train-split", "train[:800]", "--validation-split", "validation", "--test-split", "",
                    "--image-key", "img", "--label-key", "y"])
    tfds = spec.tfds
    assert (tfds.name, tfds.data_dir, tfds.train_split, tfds.validation_split) == (
        "oxford_flowers102:2.1.1", "/data", "train[:800]", "validation")
    assert tfds.HasField("test_split") and tfds.test_split == ""  # no test split
    assert (tfds.image_key, tfds.label_key) == ("img", "y")


def test_npz_and_image_folder_specs():
    assert spec_of(["submit", "n", "--npz", "/d/task.npz"]).npz.path == "/d/task.npz"
    folder = spec_of(["submit", "f", "--image-folder", "/d/pics", "--test-fraction", "0.2"]).image_folder
    assert (folder.path, folder.validation_fraction, folder.test_fraction) == ("/d/pics", 0.1, 0.2)


def test_spec_to_proto_from_library_types_and_passthrough():
    spec = types.TaskSpec("t", types.TfdsSource("mnist", validation_split="train[90%:]", test_split=None),
                          types.SearchBudget(generations=1))
    message = client_lib.spec_to_proto(spec)
    assert message.tfds.validation_split == "train[90%:]" and message.tfds.test_split == ""
    assert message.budget.generations == 1 and not message.budget.HasField("train_rounds")
    assert client_lib.spec_to_proto(message) is message
    with pytest.raises(TypeError):
        client_lib.spec_to_proto({"name": "t"})


# ---- tensors ------------------------------------------------------------------------------


def test_uint8_images_round_trip():
    images = np.random.default_rng(0).integers(0, 256, (2, 5, 4, 3), dtype=np.uint8)
    tensor = client_lib.images_to_tensor(images)
    assert (tensor.datatype, list(tensor.shape), len(tensor.data)) == ("UINT8", [2, 5, 4, 3], images.size)
    np.testing.assert_array_equal(client_lib.tensor_to_array(tensor), images)


def test_grayscale_is_repeated_to_three_channels():
    gray = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    for images in (gray, gray[..., None]):
        array = client_lib.tensor_to_array(client_lib.images_to_tensor(images))
        assert array.shape == (2, 3, 3, 3)
        np.testing.assert_array_equal(array[..., 2], gray)


def test_float_and_integer_images():
    floats = np.full((1, 2, 2, 3), 0.5, dtype=np.float64)
    tensor = client_lib.images_to_tensor(floats)
    assert tensor.datatype == "FP32" and len(tensor.data) == 12 * 4
    assert client_lib.tensor_to_array(tensor).dtype == np.float32
    assert client_lib.images_to_tensor(np.full((1, 2, 2, 3), 7, dtype=np.int64)).datatype == "UINT8"
    for bad in (np.full((1, 2, 2, 3), 300, dtype=np.int32), np.zeros((1, 2, 2, 2), np.uint8),
                np.zeros((4, 4), np.uint8), np.zeros((1, 2, 2, 3), dtype=bool)):
        with pytest.raises(ValueError):
            client_lib.images_to_tensor(bad)


# ---- rendering ----------------------------------------------------------------------------------


def test_evolution_view_renders_generations_candidates_and_results():
    out = io.StringIO()
    view = cli.EvolutionView(out, tty=False)
    for message in search_events():
        view.handle(message)
    view.close()
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text  # no progress bar off a terminal
    assert "[digits] generation 1/1: 2 candidates" in text
    header = next(line for line in text.splitlines() if "parent task" in line)
    assert all(column in header for column in ("gen", "path", "score", "quality", "params", "FLOPs", "accepted"))
    row = next(line for line in text.splitlines() if "p-1" in line and "__root__" in line)
    assert "0.8100" in row and "81.0%" in row and "12.3k" in row and "yes" in row and "clone:head" in row
    assert "search SUCCEEDED" in text and "test 79.0%" in text
    assert "checkpoint step 1 written (3 new components)" in text


def test_evolution_view_draws_a_progress_bar_on_a_terminal():
    out = io.StringIO()
    view = cli.EvolutionView(out, tty=True, bar_width=10)
    events = search_events()
    view.handle(events[0])
    view.handle(events[1])  # one of two candidates scored: half way
    assert "\r\x1b[Kdigits [#####-----]  50%" in out.getvalue()
    view.close()
    assert out.getvalue().endswith("\r\x1b[K")


def test_evolution_view_json_lines():
    out = io.StringIO()
    view = cli.EvolutionView(out, json_lines=True)
    for message in search_events():
        view.handle(message)
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["sequence"] for r in records] == ["1", "2", "3", "4", "5", "6"]  # int64 is a JSON string
    assert records[1]["candidate_scored"]["mutations"] == ["clone:head", "hp:learning_rate"]


def test_task_and_system_rendering():
    task = sample_task()
    text = cli.render_task(task)
    for expected in ("task digits: READY", "bundled digits", "test 88.0%", "650 own", "1,050 charged",
                     "1,450 in the whole model", "shares with:  digits_parity",
                     "LOCKED BY", "__root__, digits, digits_parity", "learning_rate = 0.05", "+ 1 learned"):
        assert expected in text
    assert "_mu_|clone:head" in cli.render_task(task, all_hparams=True)
    listing = cli.render_tasks([task, sample_task("digits_parity")])
    assert listing.splitlines()[0].startswith("NAME") and len(listing.splitlines()) == 3
    header, row = listing.splitlines()[:2]
    columns = [c.strip() for c in header.split("  ") if c.strip()]
    assert [c for c in columns if "PARAMS" in c or "CHARGED" in c] == ["OWN PARAMS", "CHARGED", "PATH PARAMS"]
    assert "650  " in row and "1.05k" in row and "1.45k" in row
    old_server = evolve_pb2.Task(name="old", params=1450)  # no path_params yet: params is the whole path
    assert cli.path_params(old_server) == 1450
    summary = evolve_pb2.SystemSummary(num_tasks=2, num_components=5, total_params=12345, root_model="ViT tiny",
                                       dot="graph { a -- b }")
    summary.params_per_task["digits"] = 1500.5
    summary.edges.add(task_a="digits", task_b="digits_parity", shared_components=3)
    text = cli.render_system(summary)
    assert "2 tasks, 5 components, 12,345 parameters" in text
    assert "digits -- digits_parity: 3 shared components" in text


def test_json_of_protos_is_parseable():
    text = json.dumps(cli.to_jsonable({"tasks": [sample_task()]}))
    task = json.loads(text)["tasks"][0]
    assert task["status"] == "TASK_STATUS_READY" and task["components"][0]["locked_by"][0] == "__root__"
    assert task["spec"]["bundled"]["name"] == "digits"


def test_human_numbers():
    assert [cli.human(v) for v in (0, 950, 12345, 4.56e6, 7.8e9, 0.5)] == ["0", "950", "12.3k", "4.56M", "7.8G", "0.5"]


# ---- errors and streams against in-process servers ----------------------------------------


def _rich_status(code, message, *details):
    packed = []
    for detail in details:
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)
        packed.append(any_detail)
    return rpc_status.to_status(status_pb2.Status(code=code, message=message, details=packed))


class _Failing(evolve_pb2_grpc.EvolutionServiceServicer):
    def SubmitTask(self, request, context):
        violation = error_details_pb2.BadRequest.FieldViolation(field="spec.name", description="bad characters")
        context.abort_with_status(_rich_status(code_pb2.INVALID_ARGUMENT, "spec.name: bad characters",
                                               error_details_pb2.BadRequest(field_violations=[violation])))

    def Improve(self, request, context):
        retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=3))
        context.abort_with_status(_rich_status(code_pb2.RESOURCE_EXHAUSTED, "queue is full", retry))

    def GetTask(self, request, context):
        context.abort(grpc.StatusCode.NOT_FOUND, f"task {request.name!r} not found")


def test_describe_error_renders_rich_details():
    with InProcessServer(_Failing()) as server, client_lib.EvolveClient(server.target, timeout=5) as client:
        with pytest.raises(grpc.RpcError) as bad:
            client.submit_task(types.TaskSpec("bad name", types.BundledSource("digits")))
        # the message already names the field: the violation is not printed a second time
        assert client_lib.describe_error(bad.value) == "INVALID_ARGUMENT: spec.name: bad characters"
        with pytest.raises(grpc.RpcError) as busy:
            client.improve()
        assert client_lib.describe_error(busy.value) == "RESOURCE_EXHAUSTED: queue is full\n  retry after 3 s"
        with pytest.raises(grpc.RpcError) as missing:
            client.get_task("nope")
        assert client_lib.describe_error(missing.value) == "NOT_FOUND: task 'nope' not found"
    assert client_lib.describe_error(ValueError("x")) == "ValueError: x"


def test_rpc_errors_exit_1_with_the_description_on_stderr(capsys):
    with InProcessServer(_Failing()) as server:
        code, out, err = run_main(["--server", server.target, "task", "nope"], capsys)
        assert (code, out) == (1, "") and err.strip() == "NOT_FOUND: task 'nope' not found"
        code, _, err = run_main(["--server", server.target, "submit", "bad name", "--bundled", "digits"], capsys)
        assert code == 1 and err == "INVALID_ARGUMENT: spec.name: bad characters\n"  # printed once
    code, _, err = run_main(["--server", f"127.0.0.1:{free_port()}", "--timeout", "2", "tasks"], capsys)
    assert code == 1 and err.startswith("UNAVAILABLE")


def test_version(capsys):
    from importlib import metadata

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"evolve {metadata.version('evolve-service')}"


def test_json_errors_are_one_json_object_on_stderr(capsys):
    with InProcessServer(_Failing()) as server:
        code, out, err = run_main(["--server", server.target, "--json", "submit", "bad name", "--bundled", "x"],
                                  capsys)
        assert (code, out) == (1, "") and len(err.splitlines()) == 1
        error = json.loads(err)["error"]
        assert (error["status"], error["code"], error["message"]) == ("INVALID_ARGUMENT", 3,
                                                                      "spec.name: bad characters")
        assert error["details"][0]["@type"].endswith("google.rpc.BadRequest")
        assert error["details"][0]["field_violations"][0]["field"] == "spec.name"
        code, _, err = run_main(["--server", server.target, "task", "nope", "--json"], capsys)
        assert code == 1 and json.loads(err)["error"]["status"] == "NOT_FOUND"
    with pytest.raises(SystemExit) as exit_info:  # argparse's own errors too
        cli.main(["--json", "tasks", "--bogus"])
    captured = capsys.readouterr()
    assert (exit_info.value.code, captured.out) == (2, "")
    error = json.loads(captured.err)["error"]
    assert error["status"] == "USAGE_ERROR" and error["message"] == "unrecognized arguments: --bogus"
    code, out, err = run_main(["--json", "predict", "d", "--images", "/no/such.png"], capsys)
    assert code == 2 and json.loads(err)["error"] == {"status": "USAGE_ERROR", "message": "no such file: /no/such.png"}


def test_a_refused_connection_gets_a_hint(capsys):
    target = f"127.0.0.1:{free_port()}"
    code, _, err = run_main(["--server", target, "--timeout", "5", "tasks"], capsys)
    hint = f"is the server running at {target}? start one with `evolve serve`"
    assert code == 1 and err.startswith("UNAVAILABLE") and err.strip().endswith(hint)
    assert err.count("UNAVAILABLE") == 1
    code, _, err = run_main(["--server", target, "--timeout", "5", "--json", "health"], capsys)
    error = json.loads(err)["error"]
    assert code == 1 and (error["status"], error["code"], error["hint"]) == ("UNAVAILABLE", 14, hint)
    with InProcessServer(_Failing()) as server:  # a server that answers: no hint
        _, _, err = run_main(["--server", server.target, "task", "nope"], capsys)
        assert "evolve serve" not in err


def test_relative_data_paths_are_made_absolute_here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert spec_of(["submit", "n", "--npz", "data/t.npz"]).npz.path == str(tmp_path / "data" / "t.npz")
    assert spec_of(["submit", "f", "--image-folder", "pics"]).image_folder.path == str(tmp_path / "pics")
    assert spec_of(["submit", "c", "--tfds", "mnist", "--data-dir", "tfds"]).tfds.data_dir == str(tmp_path / "tfds")
    assert spec_of(["submit", "c", "--tfds", "mnist", "--data-dir", "gs://b/tfds"]).tfds.data_dir == "gs://b/tfds"
    assert spec_of(["submit", "n", "--npz", "/abs/t.npz"]).npz.path == "/abs/t.npz"


def test_submit_help_names_the_npz_arrays_and_the_path_rule(capsys):
    with pytest.raises(SystemExit):
        cli.main(["submit", "--help"])
    text = capsys.readouterr().out
    for name in ("train_images", "train_labels", "validation_images", "validation_labels", "test_images",
                 "test_labels"):
        assert name in text
    assert "made absolute" in text and "read by the SERVER" in text


class _FlakyWatch(evolve_pb2_grpc.EvolutionServiceServicer):
    """Streams 1-2 then breaks (UNAVAILABLE); on resume streams what follows."""

    def __init__(self):
        self.requests = []

    def WatchEvolution(self, request, context):
        self.requests.append(request.after_sequence)
        if len(self.requests) == 1:
            yield from search_events()[:2]
            context.abort(grpc.StatusCode.UNAVAILABLE, "server restarting")
        # a replay that overlaps what the client already has
        yield from [e for e in search_events() if e.sequence > request.after_sequence - 1]


def test_watch_resumes_after_unavailable_without_repeats():
    servicer = _FlakyWatch()
    with InProcessServer(servicer) as server, client_lib.EvolveClient(server.target) as client:
        stream = client.watch(task="digits")
        received = [e.sequence for e in stream]
    assert received == [1, 2, 3, 4, 5, 6]
    assert servicer.requests == [0, 2]


class _EndlessWatch(evolve_pb2_grpc.EvolutionServiceServicer):
    """A search's events, then a stream that stays open; operations report done."""

    def WatchEvolution(self, request, context):
        yield from search_events()
        while context.is_active():
            time.sleep(0.05)

    def GetOperation(self, request, context):
        return evolve_pb2.Operation(name=request.name, done=True,
                                    metadata=evolve_pb2.OperationMetadata(task="digits"))


def test_follow_operations_stops_at_search_finished_and_watchdog_stops_a_silent_stream():
    with InProcessServer(_EndlessWatch()) as server, client_lib.EvolveClient(server.target) as client:
        out = io.StringIO()
        started = time.monotonic()
        cli.follow_operations(client, ["operations/1"], cli.EvolutionView(out, tty=False), linger_seconds=0.3)
        assert "search SUCCEEDED" in out.getvalue() and "checkpoint step 1" in out.getvalue()
        assert time.monotonic() - started < 2.5  # ended by the event, not by the watchdog
        started = time.monotonic()
        quiet = io.StringIO()  # an operation with no events: the watchdog ends the wait
        cli.follow_operations(client, ["operations/9"], cli.EvolutionView(quiet, tty=False), poll_seconds=0.2)
        assert time.monotonic() - started < 10 and quiet.getvalue() == ""


def test_event_stream_cancel_from_another_thread():
    with InProcessServer(_EndlessWatch()) as server, client_lib.EvolveClient(server.target) as client:
        stream = client.watch()
        threading.Timer(0.5, stream.cancel).start()
        assert len(list(stream)) == 6 and stream.cancelled


class _RecordingMetadata(evolve_pb2_grpc.EvolutionServiceServicer):
    def __init__(self):
        self.metadata = []

    def GetSystem(self, request, context):
        self.metadata.append(dict(context.invocation_metadata()))
        return evolve_pb2.SystemSummary(num_tasks=0)


def test_bearer_token_goes_with_every_call():
    servicer = _RecordingMetadata()
    with InProcessServer(servicer) as server:
        with client_lib.EvolveClient(server.target, token="s3cret") as client:
            client.system()
        with client_lib.EvolveClient(server.target) as client:
            client.system()
    assert servicer.metadata[0]["authorization"] == "Bearer s3cret"
    assert "authorization" not in servicer.metadata[1]


def test_tls_with_a_ca_file(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not available")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=60)
    servicer = _RecordingMetadata()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    evolve_pb2_grpc.add_EvolutionServiceServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())]))
    server.start()
    try:
        with client_lib.EvolveClient(f"localhost:{port}", tls_ca=str(cert), token="t", timeout=10) as client:
            assert client.system().num_tasks == 0
        with client_lib.EvolveClient(f"localhost:{port}", timeout=3) as plaintext:
            with pytest.raises(grpc.RpcError):
                plaintext.system()
    finally:
        server.stop(None)
    assert servicer.metadata[0]["authorization"] == "Bearer t"


# ---- against a real server --------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(server_factory):
    """A real `python -m service.server` subprocess with the tiny test
    configuration (tests/service/conftest.py); it must stop cleanly."""
    running = server_factory.start()
    yield running
    assert running.stop() == 0, running.log()[-4000:]


@pytest.fixture
def client(server):
    with client_lib.EvolveClient(server.address, timeout=60) as connected:
        yield connected


def evolve_cli(server, *argv, check=True):
    """`python -m service.cli --server ... ARGV` in a subprocess."""
    result = subprocess.run([sys.executable, "-m", "service.cli", "--server", server.address, *argv],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, f"{result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def digits_operation(server):
    """`evolve submit digits --bundled digits --wait --json`: the finished operation."""
    result = evolve_cli(server, "submit", "digits", "--bundled", "digits", "--wait", "--json",
                        "--request-id", "test-digits")
    return json.loads(result.stdout)


def test_describe_error_on_real_server_errors(client):
    with pytest.raises(grpc.RpcError) as missing:
        client.get_task("no_such_task")
    assert client_lib.describe_error(missing.value).splitlines() == [
        "NOT_FOUND: task 'no_such_task' not found", "  resource: task no_such_task"]
    with pytest.raises(grpc.RpcError) as bad:
        client.submit_task(types.TaskSpec("bad name!", types.BundledSource("digits")))
    text = client_lib.describe_error(bad.value)
    assert text.startswith("INVALID_ARGUMENT: spec.name: ") and "\n" not in text  # said once
    with pytest.raises(grpc.RpcError) as no_file:
        client.submit_task(types.TaskSpec("x", types.NpzSource("/no/such/file.npz")))
    text = client_lib.describe_error(no_file.value)
    assert text.startswith("INVALID_ARGUMENT: spec.npz.path: no such file") and text.count("no such file") == 1
    with pytest.raises(grpc.RpcError) as no_operation:
        client.cancel_operation("operations/999")
    assert client_lib.describe_error(no_operation.value).startswith("NOT_FOUND: operation")


def test_cli_tasks_json_is_parseable(server):
    listing = json.loads(evolve_cli(server, "tasks", "--json").stdout)
    assert isinstance(listing["tasks"], list)
    assert all({"name", "status", "components"} <= set(task) for task in listing["tasks"])


def test_cli_submit_bundled_wait(server, client, digits_operation):
    operation = digits_operation
    assert operation["done"] is True and operation["metadata"]["state"] == "OPERATION_STATE_SUCCEEDED"
    task = operation["response"]["task"]
    assert task["name"] == "digits" and task["status"] == "TASK_STATUS_READY" and task["num_classes"] == 10
    # the typed client sees the same
    assert client.wait_done(operation["name"], timeout=10).done
    assert client_lib.task_status_name(client.get_task("digits")) == "READY"
    assert [op.name for op in client.list_operations(task="digits")] == [operation["name"]]
    # a retry with the same request id returns the same operation
    again = client.submit_task(types.TaskSpec("digits", types.BundledSource("digits")), request_id="test-digits")
    assert again.name == operation["name"]
    # ... and a different request for the same name is refused, with a readable message
    result = evolve_cli(server, "submit", "digits", "--bundled", "digits", check=False)
    assert result.returncode == 1 and result.stderr.startswith("ALREADY_EXISTS")
    human_text = evolve_cli(server, "task", "digits").stdout
    assert "task digits: READY" in human_text and "LOCKED BY" in human_text and "learning_rate" in human_text


def test_cli_predict_npz(server, client, digits_operation, tmp_path):
    from evolve.data import bundled_task_specs, load_task_data, write_npz_task

    data = load_task_data(bundled_task_specs()[0])
    path = write_npz_task(tmp_path / "digits.npz", data.train.images[:4], data.train.labels[:4],
                          test_images=data.test.images[:20], test_labels=data.test.labels[:20])
    result = json.loads(evolve_cli(server, "predict", "digits", "--npz", path, "--json").stdout)
    assert result["task"] == "digits" and len(result["predictions"]) == 20
    assert [p["label"] for p in result["predictions"]] == data.test.labels[:20].tolist()
    assert all(0 <= p["class"] < 10 and 0 < p["probability"] <= 1 for p in result["predictions"])
    assert 0 <= result["accuracy"] <= 1
    human_text = evolve_cli(server, "predict", "digits", "--npz", path, "--limit", "3").stdout
    assert "test_images[2]" in human_text and "test_images[3]" not in human_text and "accuracy" in human_text
    # the library client, the encoded path and the inference protocol agree
    prediction = client.predict("digits", data.test.images[:20])
    assert prediction.classes.tolist() == [p["class"] for p in result["predictions"]]
    assert prediction.probabilities.shape == (20, 10) and prediction.class_names[0] == str(prediction.classes[0])
    np.testing.assert_array_equal(client.infer("digits", data.test.images[:20]), prediction.probabilities)
    from PIL import Image

    encoded = io.BytesIO()
    Image.fromarray(data.test.images[0]).save(encoded, format="PNG")
    assert client.predict_encoded("digits", [encoded.getvalue()]).classes[0] == prediction.classes[0]


def test_cli_system_dot(server, digits_operation, tmp_path):
    dot = tmp_path / "system.dot"
    text = evolve_cli(server, "system", "--dot", str(dot)).stdout
    assert "system: 1 tasks" in text and "digits:" in text
    assert dot.read_text().lstrip().startswith(("graph", "digraph", "strict")) and "digits" in dot.read_text()
    summary = json.loads(evolve_cli(server, "--json", "system").stdout)
    assert summary["num_tasks"] == 1 and "digits" in summary["params_per_task"]


def test_watch_replays_a_finished_search(server, client, digits_operation):
    name = digits_operation["name"]
    result = evolve_cli(server, "watch", "--task", "digits", "--operation", name, "--json")
    events = [json.loads(line) for line in result.stdout.splitlines()]
    sequences = [int(e["sequence"]) for e in events]
    assert sequences == sorted(set(sequences)) and all(e["operation"] == name for e in events)
    kinds = [next(k for k in e if k in ("search_started", "generation_started", "candidate_scored",
                                        "candidate_accepted", "search_finished", "checkpoint_written",
                                        "training_progress"))
             for e in events]
    assert kinds[:2] == ["search_started", "generation_started"]
    assert "candidate_scored" in kinds and "search_finished" in kinds
    assert int(events[0]["search_started"]["plan"]["steps_per_candidate"]) > 0
    assert events[0]["search_started"]["probes"][0]["task"] == "__root__"  # the first task probes the root only
    # resuming after a sequence replays only what follows it
    with client.watch(task="digits", after_sequence=sequences[1]) as stream:
        assert next(stream).sequence == sequences[2]
    assert client.health() == "SERVING" and client.model_ready("digits")


def test_cli_cancel_and_operations(server, client, digits_operation):
    spec = types.TaskSpec("digits_loops", types.BundledSource("digits_loops"), types.SearchBudget(generations=50))
    name = client.submit_task(spec).name
    cancelled = json.loads(evolve_cli(server, "cancel", name, "--json").stdout)
    assert cancelled["name"] == name
    final = json.loads(evolve_cli(server, "operation", name, "--wait", "--wait-timeout", "120", "--json").stdout)
    assert final["done"] and final["metadata"]["state"] == "OPERATION_STATE_CANCELLED"
    assert final["error"]["code"] == grpc.StatusCode.CANCELLED.value[0]
    listing = json.loads(evolve_cli(server, "operations", "--json").stdout)
    assert {digits_operation["name"], name} <= {op["name"] for op in listing["operations"]}
    assert "CANCELLED" in evolve_cli(server, "operations", "--task", "digits_loops").stdout
    client.wait_until_serving(timeout=5)


def test_own_charged_and_path_params_of_a_sharing_task():
    """Engine -> Task proto -> CLI: a task with its own head, a block shared with
    another task and the root's frozen components."""
    from evolve.engine import Engine
    from evolve.system import TaskRecord, TaskStatus
    from service.converters import task_to_proto
    from tests.conftest import tiny_config

    engine = Engine.create(tiny_config())
    system = engine.system
    names = dict(system.root_path.components)
    head_params = {"kernel": np.zeros((32, 10), np.float32), "bias": np.zeros((10,), np.float32)}
    head = types.Component(system.new_id("c"), "head", head_params, origin="t")
    root_block = system.components[names["encoderblock_1"]]
    block = types.Component(system.new_id("c"), "encoderblock_1", root_block.params, origin="u",
                            locked_by=frozenset({"u"}))
    for component in (head, block):
        system.components[component.id] = component
    names.update(head=head.id, encoderblock_1=block.id)
    path = types.Path(system.new_id("p"), "t", names, dict(system.root_path.hparams))
    system.paths[path.id] = path
    system.tasks["t"] = TaskRecord(types.TaskSpec("t", types.BundledSource("digits")), TaskStatus.READY, 10)
    system.best["t"] = path.id
    system.lock("t", path)
    engine.refresh_views()  # the system was changed by hand, not through the engine

    info = engine.task("t")
    whole = sum(c.num_params for c in system.path_components(path))
    assert (info.own_params, info.path_params, info.params) == (head.num_params, whole, whole) == (330, whole, whole)
    assert info.accounted_params == pytest.approx(330 + (whole - 330) / 2)  # every other part has one more locker
    task = task_to_proto(info)
    assert (task.own_params, task.path_params, task.params) == (330, whole, whole)
    assert task.accounted_params == pytest.approx(info.accounted_params)
    text = cli.render_task(task)
    assert f"330 own (only this task uses them), {info.accounted_params:,.0f} charged" in text
    assert f"{whole:,} in the whole model" in text


def test_cli_task_shows_own_charged_and_path_params(server, digits_operation):
    task = json.loads(evolve_cli(server, "task", "digits", "--json").stdout)
    components = task["components"]
    path = sum(int(c["params"]) for c in components)
    own = sum(int(c["params"]) for c in components if c["locked_by"] == ["digits"])
    charged = sum(int(c["params"]) / (len(set(c["locked_by"]) - {"digits"}) + 1) for c in components)
    assert int(task["path_params"]) == int(task["params"]) == path
    assert int(task["own_params"]) == own
    assert task["accounted_params"] == pytest.approx(charged)
    text = evolve_cli(server, "task", "digits").stdout
    assert f"{own:,} own (only this task uses them)" in text and f"{path:,} in the whole model" in text
    assert "OWN PARAMS" in evolve_cli(server, "tasks").stdout


def test_cli_bad_image_file_is_named(server, digits_operation, tmp_path):
    from PIL import Image

    good, bad = tmp_path / "good.png", tmp_path / "notes.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(good)
    bad.write_bytes(b"these are my notes, not an image")
    result = evolve_cli(server, "predict", "digits", "--images", str(good), str(bad), check=False)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == f"evolve: error: {bad}: not a PNG or JPEG image"
    assert "BytesIO" not in result.stderr


def test_cli_relative_npz_path_reaches_the_server_absolute_and_watch_interrupt(server, client, digits_operation,
                                                                                  tmp_path):
    """A relative --npz path arrives absolute; Ctrl-C on `submit --watch` leaves the
    search running and says how to follow it; `operation --wait` says it waits."""
    from evolve.data import bundled_task_specs, load_task_data, write_npz_task

    data = load_task_data(bundled_task_specs()[0])
    (tmp_path / "rel").mkdir()
    write_npz_task(tmp_path / "rel" / "task.npz", data.train.images[:400], data.train.labels[:400])
    command = [sys.executable, "-m", "service.cli", "--server", server.address, "submit", "relative",
               "--npz", "rel/task.npz", "--generations", "50", "--watch"]
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}  # SIGABRT dumps every thread's stack
    watching = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env)
    name = ""
    try:
        first = watching.stdout.readline()  # the operation, printed before the watch starts
        assert first.startswith("operations/"), first + watching.stderr.read()
        name = first.split(":", 1)[0]
        # Interrupt once the watch shows the search (not while it still sets up).
        deadline = time.monotonic() + 120
        while "generation" not in watching.stdout.readline() and time.monotonic() < deadline:
            pass
        watching.send_signal(signal.SIGINT)
        try:
            _, err = watching.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            watching.send_signal(signal.SIGABRT)
            raise AssertionError("the CLI did not stop on SIGINT:\n" + watching.communicate(timeout=30)[1][-6000:])
        assert watching.returncode == 130, err
        assert f"stopped following {name}; the operation goes on on the server" in err
        assert f"watch --operation {name}" in err and f"cancel {name}" in err and "Traceback" not in err
        assert not client_lib.is_finished(client.get_operation(name))  # Ctrl-C did not cancel it
        spec = json.loads(evolve_cli(server, "task", "relative", "--json").stdout)["spec"]
        assert spec["npz"]["path"] == str(tmp_path / "rel" / "task.npz")
        waited = evolve_cli(server, "operation", name, "--wait", "--wait-timeout", "2", check=False)
        assert waited.returncode == 1 and f"waiting for {name}" in waited.stderr
        assert f"{name} is not done after 2 s" in waited.stderr
    finally:
        if watching.poll() is None:
            watching.kill()
        if name:  # never leave the 50-generation search to later tests
            client.cancel_operation(name)
            assert client.wait_done(name, timeout=120).done


def _status_draws(text: str) -> list[str]:
    """The live line's drawings, in order."""
    return [part.split("\n")[0] for part in text.split("\r\x1b[K")[1:] if part.strip()]


def test_live_clock_and_eta_over_a_real_search_and_improve_all_in_submission_order(server, client,
                                                                                   digits_operation):
    """Watching a search on a terminal: the elapsed clock moves between events
    and an ETA appears once a candidate is done. Improve-all then runs digits
    (submitted first) before alpha (alphabetically first), each search labelled
    by its own task, never "(all)" with another task's score."""
    spec = types.TaskSpec("alpha", types.BundledSource("digits"), types.SearchBudget(generations=3))
    operation = client.submit_task(spec)
    queued = cli.render_operation(operation)
    assert "generation 0/" not in queued and "0/0" not in cli.render_operations([operation])
    out = io.StringIO()
    view = cli.EvolutionView(out, tty=True, tick_seconds=0.1)
    started = time.monotonic()
    cli.follow_operations(client, [operation.name], view, task="alpha")
    took = time.monotonic() - started
    draws = _status_draws(out.getvalue())
    handled = out.getvalue().count("\n")  # every handled event printed at least one line
    assert len(draws) > handled, "the live line is redrawn between events, not only when one arrives"
    elapsed = [int(d.split("elapsed ")[1].split("s")[0]) for d in draws if "elapsed " in d and "m" not in
               d.split("elapsed ")[1].split(",")[0]]
    assert elapsed == sorted(elapsed) and elapsed[-1] >= min(int(took) - 1, 2), (took, draws[-3:])
    assert any("ETA " in d for d in draws) and "generation 3/3" in out.getvalue()

    result = evolve_cli(server, "improve", "--watch")  # every ready task; stdout is a pipe: plain lines
    text = result.stdout
    assert "\r" not in text and "\x1b" not in text
    finished = [line for line in text.splitlines() if "search SUCCEEDED" in line]
    assert [line.split("]")[0] for line in finished] == ["[digits", "[alpha"], text
    assert "last alpha (task 2 of 2)" in text.splitlines()[-1] or "last alpha (task 2 of 2)" in text, text
    name = text.split(":", 1)[0]
    listed = evolve_cli(server, "operations").stdout
    row = next(line for line in listed.splitlines() if line.startswith(name + " "))
    assert "(all) alpha" in row, listed
    meta = client.get_operation(name).metadata
    assert list(meta.tasks) == ["digits", "alpha"] and meta.current_task == "alpha" and not meta.task
