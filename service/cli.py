"""`evolve`: the command line of an evolve server.

    evolve serve --port 8500 --state-dir state/       start a server
    evolve submit digits --bundled digits --watch     add a task, follow its search
    evolve tasks | task NAME | operations | system    inspect
    evolve report --out report/                       an HTML page with plots and the sharing graph
    evolve predict digits --images a.png b.png        classify images
    evolve demo                                       the whole story on the bundled tasks

Global options (--server, --token, --tls-ca, --json, --timeout) go before or
after the subcommand. Exit codes: 0 ok, 1 an RPC or operation failed, 2 usage.
Only `serve` and `export` import the training stack (JAX); `demo` runs the
server in a subprocess, and the other commands need nothing beyond gRPC and
numpy. Errors go to stderr, once; with --json as one JSON object
{"error": {"status", "message", ...}} (see `error_record`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import re
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterable, Sequence, TextIO

import grpc
import numpy as np
from google.protobuf import json_format
from google.protobuf.message import Message

from evolve import __version__, types
from evolve.errors import EvolveError
from evolve.statedir import write_text_atomically
from service import client as client_lib
from service import report as report_page
from service.report import human, percent  # one number formatting for the CLI and the page
from service.gen.evolve.v1 import evolve_pb2

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
PREDICT_BATCH = 256


class UsageError(Exception):
    """Bad command-line input found after parsing (exit code 2)."""


# ---- formatting ----------------------------------------------------------------


def to_jsonable(value: Any) -> Any:
    """Protos as MessageToDict (proto field names, defaults included); lists and dicts recursively."""
    if isinstance(value, Message):
        return json_format.MessageToDict(
            value, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def print_json(value: Any, out: TextIO | None = None, *, indent: int | None = 2) -> None:
    print(json.dumps(to_jsonable(value), indent=indent, sort_keys=False), file=out or sys.stdout, flush=True)


def short_id(identifier: str, width: int = 14) -> str:
    """An id cut in the middle to `width` characters."""
    if len(identifier) <= width:
        return identifier
    keep = width - 1
    return identifier[: keep - keep // 2] + "~" + identifier[-(keep // 2):]


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """A plain text table with columns padded to their widest cell."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def source_text(spec: evolve_pb2.TaskSpec) -> str:
    """One line naming a spec's data source."""
    kind = spec.WhichOneof("source")
    if kind == "bundled":
        return f"bundled {spec.bundled.name}"
    if kind == "npz":
        return f"npz {spec.npz.path}"
    if kind == "image_folder":
        return f"image folder {spec.image_folder.path}"
    if kind == "tfds":
        where = f" (data_dir {spec.tfds.data_dir})" if spec.tfds.HasField("data_dir") else ""
        return f"tfds {spec.tfds.name}{where}"
    return "-"


def path_params(task: evolve_pb2.Task) -> int:
    """The whole model's parameters (`params` from servers that predate path_params)."""
    return task.path_params or task.params


def render_tasks(tasks: Sequence[evolve_pb2.Task]) -> str:
    if not tasks:
        return "no tasks"
    rows = [
        (
            t.name, client_lib.task_status_name(t), t.path_version, f"{t.best_score:.4f}",
            percent(t.validation_accuracy), percent(t.test_accuracy) if t.test_accuracy else "-",
            human(t.own_params), human(t.accounted_params), human(path_params(t)), human(t.flops),
            ", ".join(t.shares_with) or "-",
        )
        for t in tasks
    ]
    header = ("NAME", "STATUS", "VERSION", "SCORE", "VALIDATION", "TEST", "OWN PARAMS", "CHARGED", "PATH PARAMS",
              "FLOPS", "SHARES WITH")
    return table(rows, header)


def render_task(task: evolve_pb2.Task, *, all_hparams: bool = False) -> str:
    lines = [
        f"task {task.name}: {client_lib.task_status_name(task)} (model version {task.path_version})",
        *([f"  why:          {task.status_message}"] if task.status_message else []),
        f"  source:       {source_text(task.spec)}",
        f"  classes:      {task.num_classes}",
        f"  score:        {task.best_score:.4f}",
        f"  accuracy:     validation {percent(task.validation_accuracy)}, test "
        + (percent(task.test_accuracy) if task.test_accuracy else "-"),
        (f"  parameters:   {task.own_params:,} own (only this task uses them), {task.accounted_params:,.0f} "
         f"charged (shared ones divided), {path_params(task):,} in the whole model"),
        f"  FLOPs/image:  {human(task.flops)}",
        f"  shares with:  {', '.join(task.shares_with) or 'no other task'}",
        "  components:",
    ]
    rows = [(c.name, c.id, human(c.params), ", ".join(c.locked_by) or "-") for c in task.components]
    lines += ["    " + line for line in table(rows, ("NAME", "ID", "PARAMS", "LOCKED BY")).splitlines()]
    if task.probes:
        lines.append("  first parents (probe: ridge readout on each model's frozen features, validation accuracy):")
        rows = [(p.path_id, p.task, percent(p.accuracy), p.chosen or "-", p.reason) for p in task.probes]
        lines += ["    " + line for line in table(rows, ("MODEL", "TASK", "PROBE", "CANDIDATES", "WHY")).splitlines()]
    learned = sorted(k for k in task.hparams if k.startswith("_mu_|"))
    shown = sorted(k for k in task.hparams if all_hparams or not k.startswith("_mu_|"))
    lines.append("  hyperparameters:")
    lines += [f"    {key} = {task.hparams[key]}" for key in shown]
    if learned and not all_hparams:
        lines.append(f"    (+ {len(learned)} learned mutation probabilities _mu_|...; --all shows them)")
    return "\n".join(lines)


def planned_generations(meta: evolve_pb2.OperationMetadata) -> int:
    return meta.generations or meta.plan.generations


def generation_text(meta: evolve_pb2.OperationMetadata, state: str) -> str:
    """"2/5", or for an operation that has not started "queued, 5 planned" (never "0/0")."""
    generations = planned_generations(meta)
    if state == "QUEUED" or (not meta.generation and state == "RUNNING"):
        return f"{state.lower()}, {generations} planned" if generations else state.lower()
    return f"{meta.generation}/{generations}" if generations else "-"


def current_task_text(meta: evolve_pb2.OperationMetadata) -> str:
    """For an improvement of every ready task: which task its progress is of, e.g. "digits (task 2 of 3)"."""
    if meta.task or not meta.current_task:
        return ""
    tasks = list(meta.tasks)
    where = f" (task {tasks.index(meta.current_task) + 1} of {len(tasks)})" if meta.current_task in tasks else ""
    return f"{meta.current_task}{where}"


def render_operation(operation: evolve_pb2.Operation) -> str:
    meta = operation.metadata
    state = client_lib.operation_state_name(operation)
    text = f"{operation.name}: {meta.kind or 'search'} of {meta.task or 'all tasks'} {state}"
    current = current_task_text(meta)
    if current:
        text += f"; {'now' if state == 'RUNNING' else 'last'} {current}"
    if meta.generation:
        text += (f", generation {meta.generation}/{planned_generations(meta)}, "
                 f"{meta.candidates_scored} candidates scored")
    elif planned_generations(meta) and state in ("QUEUED", "RUNNING"):
        text += f", {planned_generations(meta)} generations planned"
    if meta.best_score or meta.best_quality:
        of = f" of {meta.current_task}" if current else ""
        text += f", best score{of} {meta.best_score:.4f} (validation {percent(meta.best_quality)})"
    if meta.plan.description:
        text += f"\n  budget: {meta.plan.description}"
    if operation.HasField("error"):
        text += "\n  " + client_lib.describe_operation_error(operation.error).replace("\n", "\n  ")
    return text


def render_operations(operations: Sequence[evolve_pb2.Operation]) -> str:
    if not operations:
        return "no operations"
    rows = []
    for op in operations:
        meta = op.metadata
        created = meta.create_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S") if meta.HasField("create_time") else "-"
        state = client_lib.operation_state_name(op)
        task = meta.task or (f"(all) {meta.current_task}" if meta.current_task else "(all)")
        rows.append((op.name, meta.kind or "-", task, state, generation_text(meta, state), meta.candidates_scored,
                     f"{meta.best_score:.4f}", created))
    return table(rows, ("NAME", "KIND", "TASK", "STATE", "GENERATION", "SCORED", "BEST SCORE", "CREATED"))


def render_system(summary: evolve_pb2.SystemSummary) -> str:
    lines = [
        f"system: {summary.num_tasks} tasks, {summary.num_components} components, "
        f"{summary.total_params:,} parameters",
        f"  root model: {summary.root_model or '-'}, configuration: {summary.config_name or '-'}, "
        f"checkpoint step: {summary.checkpoint_step}",
        "  parameters charged per task (shared components divided):",
    ]
    lines += [f"    {task}: {params:,.0f}" for task, params in sorted(summary.params_per_task.items())]
    lines.append("  sharing graph:" if summary.edges else "  sharing graph: no task shares a component yet")
    lines += [f"    {e.task_a} -- {e.task_b}: {e.shared_components} shared components" for e in summary.edges]
    return "\n".join(lines)


# ---- the live view of an evolution ------------------------------------------------

CANDIDATE_HEADER = ("gen", "path", "parent task", "score", "quality", "params", "FLOPs", "accepted", "mutations")
_WIDTHS = (4, 14, 14, 7, 7, 7, 7, 8, 0)


def _row(cells: Sequence[str]) -> str:
    return "  ".join(c.ljust(w) if w else c for c, w in zip(cells, _WIDTHS)).rstrip()


def _mutations(names: Sequence[str], width: int = 60) -> str:
    text = ""
    for i, name in enumerate(names):
        candidate = f"{text}, {name}" if text else name
        if len(candidate) > width:
            return f"{text} (+{len(names) - i} more)"
        text = candidate
    return text or "-"


def _seconds(event: evolve_pb2.Event) -> float:
    """When an event happened (server clock), or now when it carries no time."""
    return event.time.ToNanoseconds() / 1e9 if event.HasField("time") else time.time()


def clock_text(seconds: float) -> str:
    """12s, 3m05s, 1h02m."""
    seconds = max(round(seconds), 0)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def eta_seconds(elapsed: float, fraction: float) -> float | None:
    """Seconds left if the rest goes as fast as what is done: the observed time
    per candidate (elapsed / candidates done, a generation's candidates counted
    by the training steps they did) times the candidates the plan has left."""
    if fraction <= 0.0 or elapsed <= 0.0:
        return None
    return elapsed * max(1.0 - fraction, 0.0) / fraction


STATUS_TICK_S = 1.0  # how often a terminal's live line is redrawn
PROGRESS_LINE_S = 10.0  # off a terminal, at most one training progress line this often per search


class _Progress:
    """Per-search progress for the live line: the plan, where the search is, and when it began."""

    def __init__(self, task: str, first_event_time: float):
        self.task = task
        # The local clock at the search's first event, even when that event is a replay.
        self.started = time.monotonic() - min(max(time.time() - first_event_time, 0.0), 7 * 86400.0)
        self.first_event_time = first_event_time
        self.generation = 0
        self.generations = 0
        self.candidates = 0
        self.scored_in_generation = 0
        self.step = 0
        self.steps = 0
        self.examples_per_second = 0.0
        self.best_score: float | None = None
        self.best_path = ""
        self.last_progress_line = -math.inf  # event time of the last progress line (off a terminal)

    def plan(self, plan: evolve_pb2.SearchPlan) -> None:
        self.generations = plan.generations or self.generations
        self.candidates = plan.candidates_per_generation or self.candidates
        self.steps = int(plan.steps_per_candidate) or self.steps

    def fraction(self) -> float:
        """Of the planned candidates, how much is done; inside a generation by training steps."""
        if not self.generations or not self.candidates or not self.generation:
            return 0.0
        in_generation = min(self.scored_in_generation / self.candidates, 1.0)
        if self.steps:
            in_generation = max(in_generation, 0.99 * min(self.step / self.steps, 1.0))  # scoring follows training
        return min((self.generation - 1 + in_generation) / self.generations, 1.0)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def timing(self, elapsed: float | None = None) -> str:
        """"elapsed 1m05s, ETA 2m10s" (no ETA before anything is done); `elapsed`
        defaults to now (the live line), a line printed for an event passes the event's."""
        elapsed = self.elapsed() if elapsed is None else elapsed
        eta = eta_seconds(elapsed, self.fraction())
        return f"elapsed {clock_text(elapsed)}" + (f", ETA {clock_text(eta)}" if eta is not None else "")


class EvolutionView:
    """Renders Event protos: a line per generation, a table row per candidate,
    the results of each search; on a terminal a progress bar below them.

    With `json_lines`, every event is one JSON object on its own line.
    """

    def __init__(self, out: TextIO | None = None, *, tty: bool | None = None, json_lines: bool = False,
                 bar_width: int = 24, tick_seconds: float = STATUS_TICK_S,
                 progress_line_seconds: float = PROGRESS_LINE_S):
        self.out = out or sys.stdout
        self.tty = self.out.isatty() if tty is None else tty
        self.json_lines = json_lines
        self.bar_width = bar_width
        self.tick_seconds = tick_seconds
        self.progress_line_seconds = progress_line_seconds
        self._progress: dict[str, _Progress] = {}
        self._active: str | None = None
        self._status_shown = False
        self._lock = threading.RLock()  # handle() and the ticker both write
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def _start_ticker(self) -> None:
        """On a terminal, redraws the live line every tick so its clock never freezes between events."""
        if self._ticker is not None or not self.tty or self.json_lines:
            return
        self._ticker = threading.Thread(target=self._tick, name="evolve-view-clock", daemon=True)
        self._ticker.start()

    def _tick(self) -> None:
        while not self._stop.wait(self.tick_seconds):
            with self._lock:
                if self._active is not None:
                    self._draw_status()
                    self.out.flush()

    # -- output

    def _clear_status(self) -> None:
        if self._status_shown:
            self.out.write("\r\x1b[K")
            self._status_shown = False

    def _line(self, text: str) -> None:
        self._clear_status()
        self.out.write(text + "\n")

    def _draw_status(self) -> None:
        if not self.tty or self._active is None or self._active not in self._progress:
            return
        progress = self._progress[self._active]
        filled = int(round(progress.fraction() * self.bar_width))
        bar = "#" * filled + "-" * (self.bar_width - filled)
        best = f"  best {progress.best_score:.4f}" if progress.best_score is not None else ""
        step = f" step {progress.step}/{progress.steps}" if progress.step and progress.steps else ""
        self.out.write(
            f"\r\x1b[K{progress.task} [{bar}] {100 * progress.fraction():3.0f}%  generation "
            f"{progress.generation}/{progress.generations}{step}{best}  {progress.timing()}"
        )
        self._status_shown = True

    def close(self) -> None:
        """Stops the clock and removes the progress bar (call once the view is done)."""
        self._stop.set()
        with self._lock:
            self._clear_status()
            self.out.flush()

    # -- events

    def handle(self, event: evolve_pb2.Event) -> None:
        if self.json_lines:
            print_json(event, self.out, indent=None)
            return
        with self._lock:
            self._handle(event)
        self._start_ticker()

    def _handle(self, event: evolve_pb2.Event) -> None:
        kind = event.WhichOneof("kind")
        key = f"{event.operation}|{event.task}"  # an operation over every task runs one search per task
        if kind == "search_started" or (kind and kind != "checkpoint_written" and key not in self._progress):
            self._progress[key] = _Progress(event.task, _seconds(event))
        progress = self._progress.get(key)
        tag = f"[{event.task}]" if event.task else "[system]"
        if kind == "search_started":
            started = event.search_started
            progress.plan(started.plan)
            self._line(f"{tag} {started.kind} search: {started.plan.description}")
            for probe in started.probes:
                chosen = f" -> parent of {probe.chosen} ({probe.reason})" if probe.chosen else ""
                self._line(f"  probe {probe.path_id} ({probe.task}): {percent(probe.accuracy)}{chosen}")
        elif kind == "generation_started":
            started = event.generation_started
            progress.generation, progress.generations = started.generation, started.generations
            progress.candidates, progress.scored_in_generation, progress.step = started.candidates, 0, 0
            self._active = key
            timing = f", {progress.timing(_seconds(event) - progress.first_event_time)}" if started.generation > 1 else ""
            self._line(f"{tag} generation {started.generation}/{started.generations}: "
                       f"{started.candidates} candidates  ({event.operation or 'no operation'}{timing})")
            self._line("  " + _row(CANDIDATE_HEADER))
        elif kind == "candidate_scored":
            scored = event.candidate_scored
            progress.scored_in_generation += 1
            self._active = key
            cells = (
                str(scored.generation), short_id(scored.path_id or "-"), short_id(scored.parent_task or "-"),
                f"{scored.score:.4f}", percent(scored.quality), human(scored.params), human(scored.flops),
                "yes" if scored.accepted_into_population else "no", _mutations(scored.mutations),
            )
            self._line("  " + _row(cells))
        elif kind == "training_progress":
            moved = event.training_progress
            progress.generation, progress.generations = moved.generation, moved.generations
            progress.candidates = moved.candidates or progress.candidates
            progress.step, progress.steps = moved.step, moved.steps
            progress.examples_per_second = moved.examples_per_second
            self._active = key
            at = _seconds(event)
            if not self.tty and at - progress.last_progress_line >= self.progress_line_seconds:
                progress.last_progress_line = at  # off a terminal: a plain line now and then
                self._line(f"{tag} generation {moved.generation}/{moved.generations}: step {moved.step}/"
                           f"{moved.steps} of {moved.candidates} candidates, "
                           f"{moved.examples_per_second:,.0f} examples/s, "
                           f"{progress.timing(at - progress.first_event_time)}")
        elif kind == "candidate_accepted":
            accepted = event.candidate_accepted
            progress.best_score = accepted.score
            if accepted.path_id != progress.best_path:  # searches re-announce an unchanged best
                progress.best_path = accepted.path_id
                self._line(f"{tag} new best: {accepted.path_id} score {accepted.score:.4f} "
                           f"(validation {percent(accepted.quality)})")
        elif kind == "search_finished":
            done = event.search_finished
            if done.state == "SUCCEEDED":
                test = f", test {percent(done.test_accuracy)}" if done.test_accuracy else ""
                took = _seconds(event) - progress.first_event_time
                self._line(f"{tag} search SUCCEEDED in {took:.0f}s: model "
                           f"{done.path_id or '-'}, score {done.score:.4f}, validation {percent(done.quality)}{test}")
            else:
                self._line(f"{tag} search {done.state or 'ENDED'}: {done.message or 'no message'}")
            if self._active == key:
                self._active = None
        elif kind == "checkpoint_written":
            written = event.checkpoint_written
            self._line(f"{tag} checkpoint step {written.step} written ({written.new_components} new components)"
                       + (f" to {written.directory}" if written.directory else ""))
        self._draw_status()
        self.out.flush()


def follow_operations(
    client: client_lib.EvolveClient,
    operations: Iterable[str],
    view: EvolutionView,
    *,
    task: str | None = None,
    poll_seconds: float = 3.0,
    linger_seconds: float = 1.0,
) -> None:
    """Shows the events of the given operations until all have finished.

    Replays the retained events first, so nothing since submission is missed.
    An operation of one task ends with its SearchFinished event (plus
    `linger_seconds` for the checkpoint that follows); one over every task
    runs several searches and ends when the server reports it done. A
    watchdog polls the operations, so the view also ends when an operation
    is done but its events are no longer retained. Checkpoint events without
    an operation are shown once one of ours has produced an event.
    """
    names = list(dict.fromkeys(operations))
    if not names:
        return
    single_task = {name for name in names if client.get_operation(name).metadata.task}
    pending = set(names)
    lock = threading.Lock()
    stream = client.watch(task=task)
    stop = threading.Event()

    def finish(name: str, delay: float) -> None:
        with lock:
            pending.discard(name)
            empty = not pending
        if empty:
            timer = threading.Timer(delay, stream.cancel)
            timer.daemon = True
            timer.start()

    def watchdog() -> None:
        done_since: dict[str, float] = {}
        while not stop.wait(poll_seconds):
            with lock:
                waiting = list(pending)
            for name in waiting:
                try:
                    done = client_lib.is_finished(client.get_operation(name))
                except grpc.RpcError:
                    continue
                if not done:
                    done_since.pop(name, None)
                elif time.monotonic() - done_since.setdefault(name, time.monotonic()) >= poll_seconds:
                    finish(name, 0.0)  # done a while ago, yet its last event never came

    threading.Thread(target=watchdog, name="evolve-follow-watchdog", daemon=True).start()
    seen_any = False
    try:
        for event in stream:
            if event.operation in names or (seen_any and not event.operation and not event.task):
                seen_any = True
                view.handle(event)
            if event.operation in single_task and event.WhichOneof("kind") == "search_finished":
                if event.search_finished.state != "CANCELLED" or _operation_done(client, event.operation):
                    finish(event.operation, linger_seconds)  # a CANCELLED run a restart re-queued goes on
    finally:
        stop.set()
        stream.cancel()
        view.close()


def _operation_done(client: client_lib.EvolveClient, name: str) -> bool:
    try:
        return client_lib.is_finished(client.get_operation(name))
    except grpc.RpcError:
        return True


# ---- task specs from the command line ----------------------------------------------


def client_path(path: str | None) -> str | None:
    """A local path made absolute here, so the server never resolves it against its
    own working directory; URLs (gs://...) and empty values pass unchanged."""
    if not path or "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


def build_spec(args: argparse.Namespace) -> types.TaskSpec:
    """The TaskSpec a `submit` command line describes."""
    if args.bundled:
        source: types.TaskSource = types.BundledSource(name=args.bundled)
    elif args.tfds:
        source = types.TfdsSource(
            name=args.tfds,
            data_dir=client_path(args.data_dir),
            train_split=args.train_split,
            validation_split=args.validation_split or None,
            test_split=args.test_split or None,
            image_key=args.image_key,
            label_key=args.label_key,
        )
    elif args.npz:
        source = types.NpzSource(path=client_path(args.npz))
    else:
        source = types.ImageFolderSource(
            path=client_path(args.image_folder), validation_fraction=args.validation_fraction,
            test_fraction=args.test_fraction,
        )
    tfds_only = ("data_dir", "validation_split")
    if not args.tfds and any(getattr(args, name) is not None for name in tfds_only):
        raise UsageError("--data-dir and --validation-split only apply to --tfds")
    budget = types.SearchBudget(
        generations=args.generations,
        candidates_per_generation=args.candidates,
        train_rounds=args.rounds,
        examples_per_round=args.examples_per_round,
    )
    return types.TaskSpec(name=args.name, source=source, budget=budget)


# ---- the parser ------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _add_connection_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """Options every client command takes; on subcommands they default to
    SUPPRESS so a value given before the subcommand survives."""
    env = os.environ

    def default(value):
        return value if defaults else argparse.SUPPRESS

    group = parser.add_argument_group("connection and output")
    # Help texts name the real defaults: "%(default)s" would show SUPPRESS on subcommands.
    group.add_argument("--server", default=default(env.get("EVOLVE_SERVER", client_lib.DEFAULT_TARGET)),
                       help=f"host:port of the server (env EVOLVE_SERVER; default {client_lib.DEFAULT_TARGET})")
    group.add_argument("--token", default=default(env.get("EVOLVE_TOKEN")),
                       help="bearer token sent with every call (env EVOLVE_TOKEN)")
    group.add_argument("--tls-ca", default=default(env.get("EVOLVE_TLS_CA")),
                       help="PEM CA bundle: connect with TLS (env EVOLVE_TLS_CA)")
    group.add_argument("--tls-server-name", default=default(None),
                       help="name to check the server certificate against (default: the host)")
    group.add_argument("--timeout", type=float, default=default(client_lib.DEFAULT_TIMEOUT_S),
                       help=f"deadline of each call in seconds (default {client_lib.DEFAULT_TIMEOUT_S:g})")
    group.add_argument("--json", action="store_true", default=default(False),
                       help="machine-readable JSON output")


def _add_follow_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--request-id", help="client-chosen id that makes a retry safe")
    parser.add_argument("--wait", action="store_true", help="wait until the search is done")
    parser.add_argument("--watch", action="store_true",
                        help="show the search live until it is done (with --json: JSON lines)")
    parser.add_argument("--wait-timeout", type=float, default=None,
                        help="give up waiting after this many seconds (default: never)")


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are a JSON error_record on stderr when --json is given."""

    def __init__(self, *args: Any, json_errors: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.json_errors = json_errors

    def error(self, message: str):
        if not self.json_errors:
            super().error(message)
        record = error_record("USAGE_ERROR", message, usage=self.format_usage().strip())
        print(json.dumps(record), file=sys.stderr, flush=True)
        sys.exit(EXIT_USAGE)


SUBMIT_EPILOG = """\
data paths (--npz, --image-folder, --data-dir) are read by the SERVER. The CLI
makes a relative path absolute against this shell's working directory before
sending it, so the server must see the same files at the same paths (the same
machine, or a shared mount).

--npz FILE: a numpy .npz archive (numpy.savez or savez_compressed) with arrays
  train_images                         N x H x W [x C], C = 1 or 3, uint8 0..255 or float in [0, 1]
  train_labels                         N integers 0..K-1
  validation_images, validation_labels optional; without them part of train is held out
  test_images, test_labels             optional; give the test accuracy
--image-folder DIR: DIR/<class name>/<PNG or JPEG files>, class names are the sub-folder names
"""


def build_parser(json_errors: bool = False) -> argparse.ArgumentParser:
    """The `evolve` parser; with `json_errors`, usage errors print as JSON (main passes --json)."""
    parser = _Parser(
        prog="evolve", description="Command line of an evolve server (continual multitask training).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `evolve COMMAND --help` for a command's options.", json_errors=json_errors,
    )
    parser.add_argument("--version", action="version", version=f"evolve {__version__}")
    _add_connection_options(parser, defaults=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                     parser_class=functools.partial(_Parser, json_errors=json_errors))

    def command(name: str, help_text: str, **kwargs) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text, **kwargs)
        _add_connection_options(sub, defaults=False)
        return sub

    commands.add_parser("serve", help="run a server (options: evolve serve --help)", add_help=False)

    submit = command("submit", "add a task and start its search", epilog=SUBMIT_EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    submit.add_argument("name", help="task name (also its model name for inference)")
    sources = submit.add_mutually_exclusive_group(required=True)
    sources.add_argument("--bundled", metavar="NAME", help="a bundled demo data set (digits, digits_parity, ...)")
    sources.add_argument("--tfds", metavar="DATASET", help="a TensorFlow Datasets name, e.g. cifar10")
    sources.add_argument("--npz", metavar="FILE",
                         help="a .npz archive of arrays (names below); a relative path is made absolute here")
    sources.add_argument("--image-folder", metavar="DIR",
                         help="a folder with one sub-folder per class; a relative path is made absolute here")
    tfds = submit.add_argument_group("tfds options")
    tfds.add_argument("--data-dir", help="where TFDS finds the data, read by the server; a relative path is made "
                                         "absolute here")
    tfds.add_argument("--train-split", default="train")
    tfds.add_argument("--validation-split", help="default: a slice of the train split")
    tfds.add_argument("--test-split", default="test", help="'' for none (default %(default)s)")
    tfds.add_argument("--image-key", default="image")
    tfds.add_argument("--label-key", default="label")
    folder = submit.add_argument_group("image folder options")
    folder.add_argument("--validation-fraction", type=_fraction, default=0.1)
    folder.add_argument("--test-fraction", type=_fraction, default=0.1)
    budget = submit.add_argument_group("search budget (default: the server's configuration)")
    budget.add_argument("--generations", type=_positive_int)
    budget.add_argument("--candidates", type=_positive_int, help="candidates per generation")
    budget.add_argument("--rounds", type=_positive_int, help="training rounds per candidate")
    budget.add_argument("--examples-per-round", type=_positive_int)
    _add_follow_options(submit)

    command("tasks", "list the tasks")
    task = command("task", "one task in detail: scores, parameters, components, hyperparameters")
    task.add_argument("name")
    task.add_argument("--all", action="store_true", help="also the learned mutation probabilities")

    watch = command("watch", "show the evolution live (Ctrl-C stops)")
    watch.add_argument("--task", help="only this task's events")
    watch.add_argument("--after", type=int, default=0, metavar="N",
                       help="replay retained events after sequence N (default 0: all retained)")
    watch.add_argument("--operation", help="stop once this operation's search has finished")

    predict = command("predict", "classify images with a task's model")
    predict.add_argument("task")
    inputs = predict.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--images", nargs="+", metavar="FILE", help="PNG or JPEG files")
    inputs.add_argument("--npz", metavar="FILE", help="a local .npz file with an image array")
    predict.add_argument("--key", default="test_images", help="array of --npz to classify (default %(default)s)")
    predict.add_argument("--limit", type=_positive_int, help="classify only the first N images")

    improve = command("improve", "start a generalization search of a task (default: every task)")
    improve.add_argument("task", nargs="?")
    _add_follow_options(improve)

    cancel = command("cancel", "cancel an operation")
    cancel.add_argument("operation", help="operations/<id>")

    delete = command("delete", "delete a task and the components only it uses (other tasks are untouched)")
    delete.add_argument("task")

    operations = command("operations", "list operations")
    operations.add_argument("--task", help="only this task's operations")

    operation = command("operation", "one operation (add --wait to block until done)")
    operation.add_argument("operation", help="operations/<id>")
    operation.add_argument("--wait", action="store_true")
    operation.add_argument("--wait-timeout", type=float, default=None)

    system = command("system", "totals, parameters per task and the sharing graph")
    system.add_argument("--dot", metavar="FILE", help="write the sharing graph in Graphviz DOT")

    command("health", "the server's health status")

    report = command("report", "write an HTML page about the system: score and accuracy per generation, the "
                               "accepted lineage, learned mutation probabilities, parameters and FLOPs, the "
                               "sharing graph (inline SVG, works offline)")
    report.add_argument("--out", default="evolve-report", metavar="DIR",
                        help="directory to write index.html into, created if missing (default %(default)s)")
    report.add_argument("--graph", choices=("auto", "graphviz", "builtin"), default="auto",
                        help="who lays out the sharing graph: Graphviz's dot when installed (auto), or the "
                             "builtin layered layout (default %(default)s)")
    report.add_argument("--replay-wait", type=float, default=2.0, metavar="SECONDS",
                        help="the event replay is over once no event came for this long (default %(default)s)")

    export = commands.add_parser(
        "export", help="write a READY task's model as a standalone artefact (offline, from a state directory)",
        description="Writes the served model of TASK, as the newest checkpoint in the state directory holds it, "
                    "to DIR: orbax parameters, config.json and jax.export functions (uint8 images in, "
                    "probabilities out, any batch size). Reads the state directory only: no server is needed and "
                    "a running one is not disturbed. Load it with evolve.export_runtime.load_exported(DIR).")
    export.add_argument("task")
    export.add_argument("--out", required=True, metavar="DIR", help="a new or empty directory")
    export.add_argument("--state-dir", default=os.environ.get("EVOLVE_STATE_DIR", "state"),
                        help="the server's state directory (env EVOLVE_STATE_DIR; default %(default)s)")
    export.add_argument("--platform", action="append", choices=("cpu", "cuda", "rocm", "tpu"),
                        help="lower the functions for this platform (repeatable; default: cpu and cuda)")
    export.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")

    demo = commands.add_parser("demo", help="start a server and run the bundled demo end to end",
                               description="Starts a real server, trains the three bundled demo tasks and "
                                           "shows evolution, accuracy, sharing and predictions.")
    demo.add_argument("--state-dir", default="state/demo",
                      help="the server's state; a second run reuses it (default %(default)s)")
    demo.add_argument("--port", type=int, default=0, help="server port (default 0: a free one)")
    demo.add_argument("--keep-server", action="store_true", help="leave the server running at the end")
    demo.add_argument("--quick", action="store_true",
                      help="a smaller model and search for a new system (tests, impatient people)")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="configuration override passed to the server (repeatable)")
    demo.add_argument("--startup-timeout", type=float, default=180.0,
                      help="seconds the server may take to load (default %(default)s)")
    return parser


# ---- commands -----------------------------------------------------------------------------


def _connect(args: argparse.Namespace) -> client_lib.EvolveClient:
    return client_lib.EvolveClient(args.server, token=args.token, tls_ca=args.tls_ca,
                                   tls_server_name=args.tls_server_name, timeout=args.timeout)


def _operation_result(client: client_lib.EvolveClient, args: argparse.Namespace,
                      operation: evolve_pb2.Operation) -> int:
    """After submit / improve: follow or wait as asked, then report."""
    if not args.json:
        print(render_operation(operation), flush=True)
    if args.watch or args.wait:
        try:
            if args.watch and not client_lib.is_finished(operation):
                view = EvolutionView(json_lines=args.json)
                follow_operations(client, [operation.name], view, task=operation.metadata.task or None)
            operation = _wait_done(client, args, operation.name, progress=not (args.json or args.watch))
        except KeyboardInterrupt:
            return _interrupted(args, operation.name)
        if args.json:  # with --watch, JSON lines: the events, then the operation
            print_json(operation, indent=None if args.watch else 2)
        else:
            print(render_operation(operation))
            if operation.HasField("response") and operation.response.HasField("task"):
                print(render_task(operation.response.task))
        state = client_lib.operation_state_name(operation)
        return EXIT_OK if not operation.HasField("error") and state != "FAILED" else EXIT_FAILED
    if args.json:
        print_json(operation)
    return EXIT_OK


WAIT_POLL_S = 10.0  # how often a waiting command reports progress


def _wait_done(client: client_lib.EvolveClient, args: argparse.Namespace, name: str, *,
               progress: bool) -> evolve_pb2.Operation:
    """Waits for an operation; with `progress`, a line on stderr whenever it moved on."""
    if not progress:
        return client.wait_done(name, timeout=args.wait_timeout)
    last = [""]

    def report(operation: evolve_pb2.Operation) -> None:
        line = render_operation(operation).splitlines()[0]
        if line != last[0]:
            last[0] = line
            print(f"  {time.strftime('%H:%M:%S')} {line}", file=sys.stderr, flush=True)

    print(f"waiting for {name} (Ctrl-C stops waiting, not the operation)", file=sys.stderr, flush=True)
    return client.wait_done(name, timeout=args.wait_timeout, poll=WAIT_POLL_S, on_progress=report)


def _server_option(args: argparse.Namespace) -> str:
    """` --server X` when this command's server is not the one a plain `evolve` would use."""
    default = os.environ.get("EVOLVE_SERVER", client_lib.DEFAULT_TARGET)
    return "" if args.server == default else f" --server {args.server}"


def _interrupted(args: argparse.Namespace, name: str) -> int:
    """Ctrl-C while following an operation: it goes on; say how to follow it again."""
    again = f"evolve{_server_option(args)}"
    message = (f"stopped following {name}; the operation goes on on the server. Follow it again with "
               f"`{again} watch --operation {name}` or `{again} operation {name} --wait`; "
               f"stop it with `{again} cancel {name}`")
    report_error(args, message, error_record("INTERRUPTED", message, operation=name), leading_newline=True)
    # Nothing is left to save here: leave at once rather than wait for the
    # watch's gRPC threads and channel to wind down at interpreter exit.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)


def cmd_submit(client, args) -> int:
    spec = build_spec(args)
    operation = client.submit_task(spec, request_id=args.request_id)
    return _operation_result(client, args, operation)


def cmd_improve(client, args) -> int:
    operation = client.improve(args.task, request_id=args.request_id)
    return _operation_result(client, args, operation)


def cmd_tasks(client, args) -> int:
    tasks = client.list_tasks()
    print_json({"tasks": tasks}) if args.json else print(render_tasks(tasks))
    return EXIT_OK


def cmd_task(client, args) -> int:
    task = client.get_task(args.name)
    print_json(task) if args.json else print(render_task(task, all_hparams=args.all))
    return EXIT_OK


def cmd_watch(client, args) -> int:
    view = EvolutionView(json_lines=args.json)
    if args.operation:
        follow_operations(client, [args.operation], view, task=args.task)
        return EXIT_OK
    with client.watch(task=args.task, after_sequence=args.after) as stream:
        try:
            for event in stream:
                view.handle(event)
        finally:
            view.close()
    return EXIT_OK


def _load_npz_images(path: str, key: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Images under `key` of a local .npz and, when present, the matching labels."""
    if not os.path.isfile(path):
        raise UsageError(f"no such file: {path}")
    with np.load(path, allow_pickle=False) as archive:
        if key not in archive.files:
            raise UsageError(f"{path} has no array {key!r}; it has: {', '.join(archive.files)}")
        images = archive[key]
        label_key = key[: -len("_images")] + "_labels" if key.endswith("_images") else None
        labels = archive[label_key] if label_key and label_key in archive.files else None
    return images, labels


_REFUSED_IMAGE = re.compile(r"encoded\.images\[(\d+)\]: (.*)", re.DOTALL)


def _predict_files(client: client_lib.EvolveClient, task: str, names: Sequence[str],
                   blobs: Sequence[bytes]) -> client_lib.Prediction:
    """Predict of encoded files; a file the server refuses is named in the error."""
    try:
        return client.predict_encoded(task, blobs)
    except grpc.RpcError as error:
        refused = _REFUSED_IMAGE.fullmatch(error.details() or "")
        if error.code() != grpc.StatusCode.INVALID_ARGUMENT or refused is None or int(refused.group(1)) >= len(names):
            raise
        raise UsageError(f"{names[int(refused.group(1))]}: {refused.group(2)}") from None


def cmd_predict(client, args) -> int:
    labels = None
    if args.images:
        names = list(args.images[: args.limit] if args.limit else args.images)
        blobs = []
        for name in names:
            if not os.path.isfile(name):
                raise UsageError(f"no such file: {name}")
            with open(name, "rb") as f:
                blobs.append(f.read())
        batches = [_predict_files(client, args.task, names[i:i + PREDICT_BATCH], blobs[i:i + PREDICT_BATCH])
                   for i in range(0, len(blobs), PREDICT_BATCH)]
    else:
        images, labels = _load_npz_images(args.npz, args.key)
        if args.limit:
            images = images[: args.limit]
            labels = None if labels is None else labels[: args.limit]
        names = [f"{args.key}[{i}]" for i in range(len(images))]
        batches = [client.predict(args.task, images[i:i + PREDICT_BATCH])
                   for i in range(0, len(images), PREDICT_BATCH)]
    classes = np.concatenate([b.classes for b in batches]) if batches else np.zeros(0, np.int64)
    probabilities = [float(b.probabilities[j, c]) for b in batches for j, c in enumerate(b.classes)]
    class_names = [n for b in batches for n in b.class_names]
    version = batches[0].version if batches else 0
    records = []
    for i, name in enumerate(names):
        record = {"input": name, "class": int(classes[i]), "probability": probabilities[i]}
        if class_names:
            record["class_name"] = class_names[i]
        if labels is not None:
            record["label"] = int(labels[i])
        records.append(record)
    accuracy = float(np.mean(classes == np.asarray(labels))) if labels is not None and len(names) else None
    if args.json:
        result = {"task": args.task, "version": version, "predictions": records}
        if accuracy is not None:
            result["accuracy"] = accuracy
        print_json(result)
        return EXIT_OK
    header = ["INPUT", "CLASS", "PROBABILITY"] + (["TRUE"] if labels is not None else [])
    rows = []
    for record in records:
        shown = str(record["class"]) + (f" ({record['class_name']})" if "class_name" in record
                                        and record["class_name"] != str(record["class"]) else "")
        row = [record["input"], shown, f"{record['probability']:.3f}"]
        if labels is not None:
            row.append(str(record["label"]) + ("" if record["label"] == record["class"] else "  <- wrong"))
        rows.append(row)
    print(f"task {args.task}, model version {version}:")
    print(table(rows, header))
    if accuracy is not None:
        print(f"accuracy {percent(accuracy)} on {len(names)} images")
    return EXIT_OK


def cmd_cancel(client, args) -> int:
    operation = client.cancel_operation(args.operation)
    print_json(operation) if args.json else print(render_operation(operation))
    return EXIT_OK


def cmd_delete(client, args) -> int:
    response = client.delete_task(args.task)
    print_json(response) if args.json else print(f"task {response.name} deleted")
    return EXIT_OK


def cmd_operations(client, args) -> int:
    operations = client.list_operations(task=args.task)
    print_json({"operations": operations}) if args.json else print(render_operations(operations))
    return EXIT_OK


def cmd_operation(client, args) -> int:
    operation = client.get_operation(args.operation)
    if args.wait and not client_lib.is_finished(operation):
        if not args.json:
            print(render_operation(operation).splitlines()[0], file=sys.stderr, flush=True)
        try:
            operation = _wait_done(client, args, args.operation, progress=not args.json)
        except KeyboardInterrupt:
            return _interrupted(args, args.operation)
    print_json(operation) if args.json else print(render_operation(operation))
    return EXIT_OK


def cmd_system(client, args) -> int:
    summary = client.system()
    if args.dot:
        with open(args.dot, "w", encoding="utf-8") as f:
            f.write(summary.dot if summary.dot.endswith("\n") or not summary.dot else summary.dot + "\n")
    if args.json:
        print_json(summary)
    else:
        print(render_system(summary))
        if args.dot:
            print(f"sharing graph written to {args.dot} (render: dot -Tsvg {args.dot} -o system.svg)")
    return EXIT_OK


def cmd_report(client, args) -> int:
    if args.replay_wait <= 0:
        raise UsageError("--replay-wait must be positive")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out} exists and is not a directory")
    tasks = client.list_tasks()
    summary = client.system()
    # Connecting and the first replayed event take longer than the gaps inside the replay.
    first_wait = max(args.replay_wait, 5.0) if tasks else args.replay_wait
    events = report_page.collect_events(client.watch(), idle_seconds=args.replay_wait, first_event_seconds=first_wait)
    page = report_page.render_html(report_page.build_report(tasks, summary, events, server=args.server),
                                   graph_layout=args.graph)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "index.html")
    write_text_atomically(path, page)  # a reader never sees half a page
    if args.json:
        print_json({"path": os.path.abspath(path), "tasks": len(tasks), "events": len(events)})
    else:
        print(f"report of {len(tasks)} tasks ({len(events)} events) written to {path}")
    return EXIT_OK


def cmd_health(client, args) -> int:
    status = client.health()
    print_json({"status": status}) if args.json else print(status)
    return EXIT_OK if status == "SERVING" else EXIT_FAILED


def cmd_export(args: argparse.Namespace) -> int:
    """`evolve export`: offline, from a state directory (no server, no connection)."""
    from evolve import export  # lazy: JAX  # pylint: disable=import-outside-toplevel

    platforms = tuple(dict.fromkeys(args.platform or export.DEFAULT_PLATFORMS))
    result = export.export_task(args.state_dir, args.task, args.out, platforms=platforms)
    if args.json:
        print_json(dataclasses.asdict(result))
        return EXIT_OK
    size = result.image_size
    print(f"exported task {result.task} (model {result.path_id}, version {result.path_version}, checkpoint step "
          f"{result.checkpoint_step}) to {result.directory}")
    print(f"  {export.PREDICT_FILE}: uint8 N x {size} x {size} x 3 -> probabilities of {len(result.class_names)} "
          f"classes, any N, for {', '.join(result.platforms)}")
    print(f"  {export.PARAMS_DIR}/: {sum(b for f, b in result.files.items() if f.startswith(export.PARAMS_DIR)):,} "
          f"bytes (orbax); {export.CONFIG_FILE}: classes, image size, ViT structure, hyperparameters")
    print(f"  load it without the server: python -c \"from evolve.export_runtime import load_exported; "
          f"print(load_exported('{result.directory}').class_names)\"")
    return EXIT_OK


# ---- errors ---------------------------------------------------------------------------

# What grpc says when nothing listens at the target.
_UNREACHABLE = ("failed to connect", "connection refused", "dns resolution failed", "name or service not known")


def connection_hint(error: grpc.RpcError, target: str) -> str:
    """A hint for an RPC error that says no server answered at `target` ('' otherwise)."""
    if error.code() != grpc.StatusCode.UNAVAILABLE or not any(
            text in (error.details() or "").lower() for text in _UNREACHABLE):
        return ""
    return f"is the server running at {target}? start one with `evolve serve`"


def error_record(status: str, message: str, **extra: Any) -> dict[str, Any]:
    """The JSON form of an error, printed on stderr with --json:
    {"error": {"status": "NOT_FOUND", "message": "...", "code": 5, "details": [...], "hint": "..."}}.

    `status` is a gRPC status code name for RPC and library errors, else
    USAGE_ERROR (exit code 2), DEADLINE_EXCEEDED (a --wait-timeout passed) or
    INTERRUPTED (Ctrl-C; the operation goes on). `code` (the gRPC code
    number) and `details` (google.rpc details as JSON) come with RPC errors.
    """
    return {"error": {"status": status, "message": message,
                      **{key: value for key, value in extra.items() if value not in (None, "", [])}}}


def status_record(status, hint: str = "") -> dict[str, Any]:
    """error_record of a google.rpc.Status."""
    from google.rpc import error_details_pb2  # noqa: F401  (registers the detail types for JSON)

    name = next((c.name for c in grpc.StatusCode if c.value[0] == status.code), "UNKNOWN")
    return error_record(name, status.message, code=status.code, details=[to_jsonable(d) for d in status.details],
                        hint=hint)


def rpc_error_record(error: grpc.RpcError, hint: str = "") -> dict[str, Any]:
    """error_record of an RPC error, with the google.rpc details of its trailers."""
    status = client_lib.rich_status(error)
    if status is not None:
        return status_record(status, hint)
    code = error.code() or grpc.StatusCode.UNKNOWN
    return error_record(code.name, error.details() or "", code=code.value[0], hint=hint)


def report_error(args: argparse.Namespace, text: str, record: dict[str, Any], *,
                 leading_newline: bool = False) -> None:
    """An error on stderr, once: `text`, or `record` as one JSON line with --json."""
    if getattr(args, "json", False):
        print(json.dumps(record), file=sys.stderr, flush=True)
    else:
        print(("\n" if leading_newline else "") + text, file=sys.stderr, flush=True)


COMMANDS: dict[str, Callable[[client_lib.EvolveClient, argparse.Namespace], int]] = {
    "submit": cmd_submit, "improve": cmd_improve, "tasks": cmd_tasks, "task": cmd_task, "watch": cmd_watch,
    "predict": cmd_predict, "cancel": cmd_cancel, "delete": cmd_delete, "operations": cmd_operations, "operation": cmd_operation,
    "system": cmd_system, "health": cmd_health, "report": cmd_report,
}


def _serve(argv: Sequence[str]) -> int:
    from service import server  # lazy: the server imports JAX  # pylint: disable=import-outside-toplevel

    parser = argparse.ArgumentParser(prog="evolve serve", description="Run an evolve server.")
    server.add_serve_arguments(parser)
    result = server.serve_from_args(parser.parse_args(list(argv)))
    return int(result or 0)


def main(argv: Sequence[str] | None = None) -> int:
    # Ctrl-C must reach the watch even when started from a background job,
    # which inherits SIGINT ignored (and then Python installs no handler).
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(json_errors="--json" in argv)
    args, extra = parser.parse_known_args(argv)
    if args.command == "serve":
        return _serve(extra)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "demo":
            from service import demo  # pylint: disable=import-outside-toplevel

            return demo.run_from_args(args)
        if args.command == "export":
            return cmd_export(args)
        with _connect(args) as client:
            return COMMANDS[args.command](client, args)
    except UsageError as error:
        report_error(args, f"evolve: error: {error}", error_record("USAGE_ERROR", str(error)))
        return EXIT_USAGE
    except grpc.RpcError as error:
        hint = connection_hint(error, getattr(args, "server", ""))
        text = client_lib.describe_error(error) + (f"\n  {hint}" if hint else "")
        report_error(args, text, rpc_error_record(error, hint=hint))
        return EXIT_FAILED
    except EvolveError as error:  # a library call in this process (export)
        from service.errors import status_of  # pylint: disable=import-outside-toplevel

        status = status_of(error)
        report_error(args, client_lib.describe_status(status), status_record(status))
        return EXIT_FAILED
    except TimeoutError as error:
        report_error(args, f"evolve: {error}", error_record("DEADLINE_EXCEEDED", str(error)))
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # `evolve watch | head`
        sys.stderr.close()
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
