"""`evolve demo`: the whole story on the bundled tasks, over a real server.

Starts `python -m service.server` as a subprocess, submits the three bundled
demo tasks (digits, digits_parity, digits_loops) through the client, shows
the evolution live, then per task: test accuracy, parameters, the components
it shares with other tasks and predictions for a few test images against
their true labels; then the system summary (sharing graph), and finally stops
the server with SIGTERM and checks that it exits cleanly.

Run again on the same state directory, it restores the system, trains nothing
that is already READY, and checks that the predictions on the test images are
the ones the previous run recorded (demo-predictions.json in the state dir).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence, TextIO

import grpc
import numpy as np

from evolve import types
from service import cli
from service import client as client_lib
from service.gen.evolve.v1 import evolve_pb2

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PREDICTIONS_FILE = "demo-predictions.json"
SERVER_LOG = "server.log"
SHOWN_TEST_IMAGES = 8
# Every demo: the bundled digits are 8 x 8 images, which reach 97% at 16 px;
# the tiny configuration's default 32 px would make the demo 4x longer for them.
DEMO_OVERRIDES = ("image_sizes=[16]", "default_image_size=16")
# --quick: a smaller root and search for a new system (tests, impatient people):
# about 10 s per task on 2 CPU cores, at the price of accuracy.
QUICK_OVERRIDES = (
    "size.hidden_size=32", "size.num_layers=2", "size.num_heads=2", "size.mlp_dim=64", "max_layers=3",
    "generations=2", "train_rounds=2", "examples_per_round=512",
)


class ServerProcess:
    """A `python -m service.server` subprocess with its output in a log file.

    The server writes the port it bound to a file (so port 0 picks a free one
    without races); `target` is known once `wait_port` returned.
    """

    def __init__(self, state_dir: str | os.PathLike, *, port: int = 0, overrides: Sequence[str] = (),
                 token: str | None = None, host: str = "127.0.0.1", extra_args: Sequence[str] = (),
                 run_dir: str | os.PathLike | None = None):
        """`run_dir`: where the server's log and port file go (default: the
        state directory; a read-only replica's must be elsewhere)."""
        self.state_dir = Path(state_dir)
        self.run_dir = Path(run_dir) if run_dir is not None else self.state_dir
        self.host = host
        self.port = port
        self.token = token
        self.log_path = self.run_dir / SERVER_LOG
        self.port_file = self.run_dir / "server.port"
        self.command = [sys.executable, "-m", "service.server", "--host", host, "--port", str(port),
                        "--port-file", str(self.port_file), "--state-dir", str(self.state_dir)]
        for override in overrides:
            self.command += ["--set", override]
        self.command += list(extra_args)
        self.process: subprocess.Popen | None = None

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.port_file.unlink(missing_ok=True)
        # The demo decides the server's settings: EVOLVE_* variables meant for
        # another server (TLS, a token, a configuration) must not leak in.
        env = {key: value for key, value in os.environ.items() if not key.startswith("EVOLVE_")}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
        env.setdefault("PYTHONUNBUFFERED", "1")
        if self.token:
            env["EVOLVE_TOKEN"] = self.token  # the environment, not a flag: flags show in `ps`
        with open(self.log_path, "ab") as log:
            log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(self.command)}\n".encode())
            log.flush()
            # A session of its own: Ctrl-C in the terminal reaches the demo,
            # which then stops the server in order.
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=env, start_new_session=True)

    def wait_port(self, timeout: float = 60.0) -> str:
        """Waits until the server listens; returns its target host:port."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running():
                raise RuntimeError(f"the server exited with code {self.process.returncode} while starting")
            try:
                self.port = int(self.port_file.read_text().strip())
                return self.target
            except (OSError, ValueError):
                time.sleep(0.1)
        raise TimeoutError(f"the server did not listen within {timeout:.0f} s")

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_serving(self, client: client_lib.EvolveClient, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running():
                raise RuntimeError(f"the server exited with code {self.process.returncode} while starting")
            try:
                if client.health() == "SERVING":
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"the server was not SERVING after {timeout:.0f} s")

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM, then wait; SIGKILL after `timeout`. Returns the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class Demo:
    """The steps of the demo against a serving client; prints to `out`."""

    def __init__(self, client: client_lib.EvolveClient, state_dir: Path, *, out: TextIO | None = None):
        from evolve.data import bundled_task_specs  # pylint: disable=import-outside-toplevel

        self.client = client
        self.state_dir = state_dir
        self.out = out or sys.stdout
        self.specs = bundled_task_specs()

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    # -- 1. tasks: submit what is missing, follow what is running

    def submit_missing(self) -> dict[str, str]:
        """Submits the tasks the system lacks; returns operation name -> task of
        the searches to follow (new ones and interrupted ones the server resumed)."""
        existing = {task.name: task for task in self.client.list_tasks()}
        to_follow: dict[str, str] = {}
        for spec in self.specs:
            task = existing.get(spec.name)
            if task is None:
                operation = self.client.submit_task(spec, request_id=f"demo-{spec.name}")
                to_follow[operation.name] = spec.name
                self.say(f"submitted {spec.name} ({spec.source.name}): {operation.name}")
                continue
            status = client_lib.task_status_name(task)
            if status == "READY":
                self.say(f"{spec.name}: already READY in {self.state_dir} (model version {task.path_version}, "
                         f"test accuracy {cli.percent(task.test_accuracy)}): restored, not retrained")
                continue
            running = [op for op in self.client.list_operations(task=spec.name) if not client_lib.is_finished(op)]
            for operation in running:
                to_follow[operation.name] = spec.name
                self.say(f"{spec.name}: {status}, following its search {operation.name}")
            if not running:
                self.say(f"{spec.name}: {status} and no search is running for it")
        return to_follow

    def follow(self, operations: dict[str, str]) -> list[str]:
        """Shows the searches live; returns the tasks whose search did not succeed."""
        if not operations:
            return []
        self.say(f"\nevolution of {len(operations)} task(s), live:")
        cli.follow_operations(self.client, list(operations), cli.EvolutionView(self.out))
        failed = []
        for name, task in operations.items():
            operation = self.client.wait_done(name, timeout=600)
            if operation.HasField("error") or client_lib.operation_state_name(operation) != "SUCCEEDED":
                failed.append(task)
                self.say(cli.render_operation(operation))
        return failed

    # -- 2. results per task

    def report(self) -> bool:
        """Per task: accuracy, size, sharing and predictions. Returns whether
        the predictions agree with those a previous run recorded."""
        from evolve.data import load_task_data  # pylint: disable=import-outside-toplevel

        previous = self._load_previous()
        recorded: dict[str, dict] = {}
        consistent = True
        self.say("\n== results ==")
        for spec in self.specs:
            try:
                task = self.client.get_task(spec.name)
            except grpc.RpcError as error:
                self.say(f"{spec.name}: {client_lib.describe_error(error)}")
                consistent = False
                continue
            self._describe_task(task)
            if client_lib.task_status_name(task) != "READY":
                continue
            data = load_task_data(spec)
            prediction = self.client.predict(spec.name, data.test.images)
            accuracy = float(np.mean(prediction.classes == data.test.labels))
            self.say(f"  checked here: {cli.percent(accuracy)} of {len(data.test.labels)} test images right")
            self._show_predictions(prediction, data.test.labels, data.class_names)
            recorded[spec.name] = {
                "version": prediction.version,
                "classes": prediction.classes.tolist(),
                "probabilities": prediction.probabilities.astype(float).tolist(),
            }
            consistent &= self._compare(spec.name, recorded[spec.name], previous.get(spec.name))
        self._save(previous | recorded)
        if recorded and not previous:
            self.say(f"\npredictions recorded in {self.state_dir / PREDICTIONS_FILE}; run the demo again on "
                     "this state directory: it trains nothing and checks they are unchanged")
        return consistent

    def _describe_task(self, task: evolve_pb2.Task) -> None:
        self.say(f"\n{task.name}: {client_lib.task_status_name(task)}, {task.num_classes} classes, "
                 f"model version {task.path_version}")
        self.say(f"  test accuracy {cli.percent(task.test_accuracy)} (validation "
                 f"{cli.percent(task.validation_accuracy)}, score {task.best_score:.4f})")
        self.say(f"  parameters: {task.params:,} in its own components, {task.accounted_params:,.0f} charged "
                 f"(shared ones divided); {cli.human(task.flops)} FLOPs per image")
        shared: dict[str, list[str]] = {}
        for component in task.components:
            for owner in component.locked_by:
                if owner != task.name:
                    shared.setdefault(owner, []).append(component.name)
        for owner, names in sorted(shared.items(), key=lambda item: (item[0] != types.ROOT_TASK, item[0])):
            who = "the root model (frozen)" if owner == types.ROOT_TASK else owner
            self.say(f"  shares with {who}: {', '.join(names)}")
        if not shared:
            self.say("  shares no component with other tasks")
        structure = " > ".join(c.name for c in task.components)
        self.say(f"  model: {structure}")

    def _show_predictions(self, prediction: client_lib.Prediction, labels: np.ndarray,
                          class_names: Sequence[str]) -> None:
        def name(index: int) -> str:
            return class_names[index] if class_names else str(index)

        rows = []
        for i in range(min(SHOWN_TEST_IMAGES, len(labels))):
            predicted, true = int(prediction.classes[i]), int(labels[i])
            rows.append((f"test image {i}", name(predicted), f"{prediction.probabilities[i, predicted]:.3f}",
                         name(true), "" if predicted == true else "wrong"))
        table = cli.table(rows, ("", "PREDICTED", "PROBABILITY", "TRUE", ""))
        self.say("\n".join("    " + line for line in table.splitlines()))

    def _compare(self, task: str, now: dict, before: dict | None) -> bool:
        if before is None:
            return True
        if before["version"] != now["version"]:
            self.say(f"  model version {before['version']} -> {now['version']} since the last run (improved)")
            return True
        same_classes = before["classes"] == now["classes"]
        difference = float(np.max(np.abs(np.asarray(before["probabilities"]) - np.asarray(now["probabilities"]))))
        if same_classes and difference == 0.0:
            self.say("  predictions on every test image bit-identical to the previous run: nothing was lost")
            return True
        self.say(f"  predictions DIFFER from the previous run (same classes: {same_classes}, "
                 f"largest probability change {difference:.2e})")
        return False

    def _load_previous(self) -> dict:
        path = self.state_dir / PREDICTIONS_FILE
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {}

    def _save(self, recorded: dict) -> None:
        path = self.state_dir / PREDICTIONS_FILE
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(recorded))
        temporary.replace(path)

    # -- 3. the system

    def system(self) -> None:
        summary = self.client.system()
        self.say("\n== the system ==")
        self.say(cli.render_system(summary))
        if summary.dot:
            dot_path = self.state_dir / "system.dot"
            dot_path.write_text(summary.dot)
            self.say(f"  sharing graph in DOT: {dot_path} (render: dot -Tsvg {dot_path} -o system.svg)")


def run_demo(
    state_dir: str | os.PathLike = "state/demo",
    *,
    port: int = 0,
    keep_server: bool = False,
    quick: bool = False,
    overrides: Sequence[str] = (),
    startup_timeout: float = 180.0,
    token: str | None = None,
    out: TextIO | None = None,
) -> int:
    """Runs the demo; returns the process exit code (0: all went well)."""
    out = out or sys.stdout
    started = time.monotonic()
    state = Path(state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    overrides = (*DEMO_OVERRIDES, *(QUICK_OVERRIDES if quick else ()), *overrides)  # later ones win
    server = ServerProcess(state, port=port, overrides=overrides, token=token)

    def say(text: str = "") -> None:
        print(text, file=out, flush=True)

    say(f"evolve demo: starting a server, state in {state} (log: {server.log_path})")
    server.start()
    ok = False
    try:
        server.wait_port(startup_timeout)
        with client_lib.EvolveClient(server.target, token=token, timeout=60.0) as client:
            say(f"server listening on {server.target}; loading the system ...")
            server.wait_serving(client, startup_timeout)
            say(f"server SERVING after {time.monotonic() - started:.1f}s")
            demo = Demo(client, state, out=out)
            failed = demo.follow(demo.submit_missing())
            consistent = demo.report()
            demo.system()
            ok = not failed and consistent
            if failed:
                say(f"\nsearches that did not succeed: {', '.join(failed)}")
    except (grpc.RpcError, RuntimeError, TimeoutError) as error:
        message = client_lib.describe_error(error) if isinstance(error, grpc.RpcError) else str(error)
        say(f"\ndemo failed: {message}")
        tail = server.log_tail()
        if tail:
            say(f"last lines of {server.log_path}:\n{tail}")
    except KeyboardInterrupt:
        say("\ninterrupted")
        keep_server = False
    finally:
        if keep_server and server.running():
            say(f"\nthe server keeps running on {server.target} (pid {server.process.pid}); "
                f"try: evolve --server {server.target} tasks; stop it with: kill {server.process.pid}")
        else:
            say("\nstopping the server (SIGTERM) ...")
            code = server.stop()
            clean = code == 0
            say(f"server exited with code {code}" + ("" if clean else f"; see {server.log_path}"))
            ok = ok and clean
    say(f"demo {'finished' if ok else 'FAILED'} in {time.monotonic() - started:.0f}s")
    return cli.EXIT_OK if ok else cli.EXIT_FAILED


def run_from_args(args: argparse.Namespace) -> int:
    """`evolve demo` (the parser lives in service.cli)."""
    return run_demo(args.state_dir, port=args.port, keep_server=args.keep_server, quick=args.quick,
                    overrides=args.set, startup_timeout=args.startup_timeout, token=args.token)


if __name__ == "__main__":
    sys.exit(cli.main(["demo", *sys.argv[1:]]))
