"""`evolve report`: one self-contained HTML page about a running system.

Data in, HTML out. `collect_events` reads the retained evolution events of a
WatchEvolution stream; `build_report` turns what the server answered (the
tasks, the system summary, the events) into a typed `Report`; `render_html`
turns that into a page of inline SVG drawn here: the score and validation
accuracy of every candidate per generation, the accepted lineage with its
mutations, the learned mutation probabilities, parameters and FLOPs per task
and the sharing graph. The page has no script and loads nothing (its
Content-Security-Policy forbids it), so it works offline and as a file.

The sharing graph is laid out by Graphviz (`dot -Tsvg`) when the binary is
installed, else by `layered_layout`, a small layered layout in pure Python.
"""

from __future__ import annotations

import dataclasses
import datetime
import html
import logging
import math
import queue
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Literal, Protocol

from evolve.config import GLOBAL_MU, is_learned_mu
from evolve.types import ROOT_TASK  # the locker name of the root model's components
from service.gen.evolve.v1 import evolve_pb2

logger = logging.getLogger(__name__)

GraphLayout = Literal["auto", "graphviz", "builtin"]
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22")
DOT_TIMEOUT_S = 30.0


# ---- the data ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One CandidateScored event."""

    sequence: int
    generation: int  # 1-based, within its search
    path_id: str  # empty when it did not enter the population
    parent_id: str
    parent_task: str
    score: float
    quality: float
    params: float
    flops: float
    mutations: tuple[str, ...]
    accepted_into_population: bool
    learned_mu: tuple[tuple[str, float], ...] = ()  # its "_mu_" hyperparameters, sorted by key


@dataclasses.dataclass(frozen=True)
class LineageStep:
    """A candidate that became its search's best so far (CandidateAccepted)."""

    path_id: str
    score: float
    quality: float
    candidate: Candidate | None  # its CandidateScored event, when the server still retains it


@dataclasses.dataclass(frozen=True)
class Finished:
    state: str
    path_id: str
    score: float
    quality: float
    test_accuracy: float
    message: str


@dataclasses.dataclass(frozen=True)
class Search:
    """One run of a search of one task: from its SearchStarted (when retained) to its SearchFinished."""

    task: str
    operation: str
    kind: str  # "extension", "generalization", or "" when its start is no longer retained
    planned_generations: int
    candidates: tuple[Candidate, ...]
    lineage: tuple[LineageStep, ...]
    finished: Finished | None

    @property
    def generations(self) -> int:
        """Generations the plot spans: those planned, or seen."""
        return max([self.planned_generations, *(c.generation for c in self.candidates)], default=0)


@dataclasses.dataclass(frozen=True)
class ComponentUse:
    name: str
    id: str
    locked_by: tuple[str, ...]
    params: int


@dataclasses.dataclass(frozen=True)
class TaskRow:
    """A task as GetTask / ListTasks report it."""

    name: str
    status: str
    path_version: int
    best_score: float
    validation_accuracy: float
    test_accuracy: float
    own_params: int
    accounted_params: float
    path_params: int
    flops: float
    num_classes: int
    shares_with: tuple[str, ...]
    learned_mu: Mapping[str, float]  # the served path's `_mu_` and `_mu_|<action>` values
    components: tuple[ComponentUse, ...]


@dataclasses.dataclass(frozen=True)
class SystemTotals:
    num_tasks: int
    num_components: int
    total_params: int
    root_model: str
    config_name: str
    checkpoint_step: int
    damaged_tasks: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Report:
    server: str
    generated_at: str  # ISO 8601, UTC
    system: SystemTotals
    tasks: tuple[TaskRow, ...]  # in the order their searches started, then by name
    searches: tuple[Search, ...]  # in the order they started
    events_read: int

    def searches_of(self, task: str) -> list[Search]:
        return [s for s in self.searches if s.task == task]


# ---- reading the server's answers ----------------------------------------------------------------


class CancellableStream(Protocol):
    def __iter__(self) -> Iterator[evolve_pb2.Event]: ...

    def cancel(self) -> None: ...


def collect_events(stream: CancellableStream, *, idle_seconds: float, first_event_seconds: float,
                   max_seconds: float = 600.0) -> list[evolve_pb2.Event]:
    """The events a WatchEvolution stream replays, up to the first pause.

    The stream replays what the server retains at once, then waits for live
    events, and nothing marks where the replay ends: the replay is over once
    no event came for `idle_seconds` (`first_event_seconds` before the first
    one). The stream is cancelled on return.
    """
    received: queue.Queue = queue.Queue()
    done = object()

    def pump() -> None:
        try:
            for event in stream:
                received.put(event)
        except Exception as error:  # noqa: BLE001  (handed to the caller's thread)
            received.put(error)
        finally:
            received.put(done)

    thread = threading.Thread(target=pump, name="evolve-report-events", daemon=True)
    thread.start()
    events: list[evolve_pb2.Event] = []
    deadline = time.monotonic() + max_seconds
    try:
        while time.monotonic() < deadline:
            try:
                item = received.get(timeout=idle_seconds if events else first_event_seconds)
            except queue.Empty:
                break
            if item is done:
                break
            if isinstance(item, BaseException):
                raise item
            events.append(item)
        else:
            logger.warning("events still arriving after %.0f s; the report stops reading here", max_seconds)
    finally:
        stream.cancel()
    return events


def task_row(task: evolve_pb2.Task) -> TaskRow:
    mu = {}
    for key, value in task.hparams.items():
        if is_learned_mu(key):
            try:
                mu[key] = float(value)
            except ValueError:
                logger.warning("task %s: hyperparameter %s=%r is not a number; left out", task.name, key, value)
    return TaskRow(
        name=task.name,
        status=evolve_pb2.TaskStatus.Name(task.status).removeprefix("TASK_STATUS_"),
        path_version=task.path_version,
        best_score=task.best_score,
        validation_accuracy=task.validation_accuracy,
        test_accuracy=task.test_accuracy,
        own_params=task.own_params,
        accounted_params=task.accounted_params,
        path_params=task.path_params or task.params,
        flops=task.flops,
        num_classes=task.num_classes,
        shares_with=tuple(task.shares_with),
        learned_mu=dict(sorted(mu.items(), key=lambda item: _mu_order(item[0]))),
        components=tuple(ComponentUse(c.name, c.id, tuple(c.locked_by), c.params) for c in task.components),
    )


def _mu_order(key: str) -> tuple[int, str]:
    return (0, "") if key == GLOBAL_MU else (1, key)


class _SearchBuilder:
    def __init__(self, task: str, operation: str, kind: str = "", planned_generations: int = 0):
        self.task, self.operation, self.kind = task, operation, kind
        self.planned_generations = planned_generations
        self.candidates: list[Candidate] = []
        self.accepted: dict[str, tuple[float, float]] = {}  # path id -> (score, quality), first report kept
        self.finished: Finished | None = None

    def build(self) -> Search:
        scored = {c.path_id: c for c in self.candidates if c.path_id}
        lineage = tuple(LineageStep(path_id, score, quality, scored.get(path_id))
                        for path_id, (score, quality) in self.accepted.items())
        return Search(self.task, self.operation, self.kind, self.planned_generations, tuple(self.candidates),
                      lineage, self.finished)


def searches_from_events(events: Iterable[evolve_pb2.Event]) -> list[Search]:
    """The searches the events tell of, in the order they started.

    A search is keyed by (operation, task): an improvement of every task runs
    one search per task. A SearchStarted opens a new run even for a key seen
    before (a search a restart re-queued runs again from its start).
    """
    open_runs: dict[tuple[str, str], _SearchBuilder] = {}
    runs: list[_SearchBuilder] = []
    for event in sorted(events, key=lambda e: e.sequence):
        kind = event.WhichOneof("kind")
        if not event.task or kind in (None, "checkpoint_written", "training_progress"):
            continue
        key = (event.operation, event.task)
        if kind == "search_started" or key not in open_runs:
            started = event.search_started if kind == "search_started" else None
            builder = _SearchBuilder(event.task, event.operation, started.kind if started else "",
                                     started.plan.generations if started else 0)
            open_runs[key] = builder
            runs.append(builder)
        builder = open_runs[key]
        if kind == "generation_started":
            builder.planned_generations = builder.planned_generations or event.generation_started.generations
        elif kind == "candidate_scored":
            c = event.candidate_scored
            builder.candidates.append(Candidate(
                sequence=event.sequence, generation=c.generation, path_id=c.path_id, parent_id=c.parent_id,
                parent_task=c.parent_task, score=c.score, quality=c.quality, params=c.params, flops=c.flops,
                mutations=tuple(c.mutations), accepted_into_population=c.accepted_into_population,
                learned_mu=tuple(sorted(c.learned_mu.items())),
            ))
        elif kind == "candidate_accepted":
            accepted = event.candidate_accepted
            builder.accepted.setdefault(accepted.path_id, (accepted.score, accepted.quality))
        elif kind == "search_finished":
            f = event.search_finished
            builder.finished = Finished(f.state, f.path_id, f.score, f.quality, f.test_accuracy, f.message)
            del open_runs[key]
    return [run.build() for run in runs]


def build_report(tasks: Sequence[evolve_pb2.Task], summary: evolve_pb2.SystemSummary,
                 events: Sequence[evolve_pb2.Event], *, server: str,
                 generated_at: datetime.datetime | None = None) -> Report:
    """The report's data from the server's answers (ListTasks, GetSystem, WatchEvolution's replay)."""
    searches = searches_from_events(events)
    first_seen: dict[str, int] = {}
    for index, search in enumerate(searches):
        first_seen.setdefault(search.task, index)
    rows = sorted((task_row(t) for t in tasks), key=lambda row: (first_seen.get(row.name, len(searches)), row.name))
    totals = SystemTotals(
        num_tasks=summary.num_tasks, num_components=summary.num_components, total_params=summary.total_params,
        root_model=summary.root_model, config_name=summary.config_name, checkpoint_step=summary.checkpoint_step,
        damaged_tasks=tuple(summary.damaged_tasks),
    )
    when = (generated_at or datetime.datetime.now(datetime.timezone.utc)).astimezone(datetime.timezone.utc)
    return Report(server=server, generated_at=when.strftime("%Y-%m-%d %H:%M:%S UTC"), system=totals,
                  tasks=tuple(rows), searches=tuple(searches), events_read=len(events))


# ---- formatting --------------------------------------------------------------------------------------


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def human(value: float) -> str:
    """A count with an SI suffix: 950, 12.3k, 4.56M, 7.8G."""
    value = float(value)
    for limit, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            return f"{value / limit:.3g}{suffix}"
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.3g}"


def percent(fraction: float) -> str:
    return f"{100.0 * fraction:.1f}%"


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high]."""
    if not high > low:
        high = low + 1.0
    raw = (high - low) / max(count, 1)
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1.0, 2.0, 2.5, 5.0, 10.0) if m * magnitude >= raw)
    first = math.ceil(low / step - 1e-9)
    return [round(i * step, 10) for i in range(first, math.floor(high / step + 1e-9) + 1)]


def _fmt(value: float) -> str:
    """An SVG coordinate."""
    return f"{value:.1f}"


def text_width(text: str, font_size: float = 12.0) -> float:
    """A rough width of `text` in a sans-serif font (no font metrics here)."""
    return 0.6 * font_size * len(text)


def wrap(words: Sequence[str], width: int, separator: str = ", ") -> list[str]:
    """Words joined into lines of at most `width` characters (a longer word gets a line of its own)."""
    lines: list[str] = []
    line = ""
    for word in words:
        candidate = f"{line}{separator}{word}" if line else word
        if line and len(candidate) > width:
            lines.append(line + separator.rstrip())
            line = word
        else:
            line = candidate
    return lines + ([line] if line else [])


# ---- plots ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Frame:
    """A plot's box and the data ranges it maps."""

    width: float
    height: float
    x_range: tuple[float, float]
    y_range: tuple[float, float]
    left: float = 56.0
    right: float = 14.0
    top: float = 26.0
    bottom: float = 36.0

    def x(self, value: float) -> float:
        low, high = self.x_range
        return self.left + (value - low) / ((high - low) or 1.0) * (self.width - self.left - self.right)

    def y(self, value: float) -> float:
        low, high = self.y_range
        return self.height - self.bottom - (value - low) / ((high - low) or 1.0) * (
            self.height - self.top - self.bottom)


def _padded_range(values: Sequence[float], *, clamp: tuple[float, float] | None = None) -> tuple[float, float]:
    if not values:
        return (0.0, 1.0)
    low, high = min(values), max(values)
    pad = max((high - low) * 0.1, 0.02)
    low, high = low - pad, high + pad
    if clamp:
        low, high = max(low, clamp[0]), min(high, clamp[1])
    return (low, high)


def _y_axis(frame: Frame, label: str, *, as_percent: bool = False) -> list[str]:
    parts = []
    for tick in nice_ticks(*frame.y_range):
        if not frame.y_range[0] <= tick <= frame.y_range[1]:
            continue
        y = _fmt(frame.y(tick))
        shown = f"{100 * tick:.0f}%" if as_percent else f"{tick:g}"
        parts.append(f'<line class="grid" x1="{_fmt(frame.left)}" x2="{_fmt(frame.width - frame.right)}" '
                     f'y1="{y}" y2="{y}"/>')
        parts.append(f'<text class="tick" x="{_fmt(frame.left - 6)}" y="{y}" text-anchor="end" '
                     f'dominant-baseline="middle">{esc(shown)}</text>')
    parts.append(f'<text class="axis-label" x="12" y="{_fmt(frame.top + (frame.height - frame.top - frame.bottom) / 2)}"'
                 f' transform="rotate(-90 12 {_fmt(frame.top + (frame.height - frame.top - frame.bottom) / 2)})" '
                 f'text-anchor="middle">{esc(label)}</text>')
    return parts


def _svg(element_id: str, css_class: str, width: float, height: float, body: Sequence[str], *,
         title: str, **data: object) -> str:
    attributes = "".join(f' data-{key.replace("_", "-")}="{esc(value)}"' for key, value in data.items())
    return (f'<svg id="{esc(element_id)}" class="{esc(css_class)}" xmlns="http://www.w3.org/2000/svg" '
            f'viewBox="0 0 {_fmt(width)} {_fmt(height)}" width="{_fmt(width)}" height="{_fmt(height)}" '
            f'role="img" aria-label="{esc(title)}"{attributes}><title>{esc(title)}</title>'
            + "".join(body) + "</svg>")


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where one search's generations sit on a task's shared time axis."""

    search: Search
    offset: int  # generation g of the search is at x = offset + g
    color: str


def slots_of(searches: Sequence[Search]) -> list[Slot]:
    """The searches of one task side by side on one generation axis."""
    slots, offset = [], 0
    for index, search in enumerate(searches):
        slots.append(Slot(search, offset, PALETTE[index % len(PALETTE)]))
        offset += max(search.generations, 1)
    return slots


def _jitter(index: int, count: int) -> float:
    """Spreads a generation's candidates around its x position."""
    return 0.0 if count <= 1 else (index / (count - 1) - 0.5) * 0.5


def _generation_axis(frame: Frame, slots: Sequence[Slot]) -> list[str]:
    parts = []
    base = _fmt(frame.height - frame.bottom)
    for slot in slots:
        for generation in range(1, max(slot.search.generations, 1) + 1):
            x = _fmt(frame.x(slot.offset + generation))
            parts.append(f'<text class="tick" x="{x}" y="{_fmt(frame.height - frame.bottom + 14)}" '
                         f'text-anchor="middle">{generation}</text>')
        if slot.offset:
            x = _fmt(frame.x(slot.offset + 0.5))
            parts.append(f'<line class="search-separator" x1="{x}" x2="{x}" y1="{_fmt(frame.top)}" y2="{base}"/>')
        room = frame.x(slot.offset + max(slot.search.generations, 1) + 0.5) - frame.x(slot.offset + 0.6)
        number = slot.search.operation.rsplit("/", 1)[-1]
        label = next((text for text in (f"{slot.search.kind or 'search'} {slot.search.operation}".strip(),
                                        slot.search.operation, f"op {number}") if text_width(text, 11) <= room),
                     f"op {number}")
        parts.append(f'<text class="search-label" x="{_fmt(frame.x(slot.offset + 0.6))}" y="{_fmt(frame.top - 8)}" '
                     f'fill="{slot.color}">{esc(label)}</text>')
    parts.append(f'<text class="axis-label" x="{_fmt((frame.left + frame.width - frame.right) / 2)}" '
                 f'y="{_fmt(frame.height - frame.bottom + 30)}" text-anchor="middle">generation</text>')
    return parts


def generation_plot(task: str, searches: Sequence[Search], metric: Literal["score", "quality"],
                    test_accuracy: float = 0.0) -> str:
    """Every scored candidate of a task per generation (one dot each) and the best per generation (a line)."""
    slots = slots_of(searches)
    span = sum(max(s.generations, 1) for s in searches) or 1
    values = [getattr(c, metric) for s in searches for c in s.candidates]
    if metric == "quality" and test_accuracy:
        values.append(test_accuracy)
    frame = Frame(width=max(360.0, 80.0 * span + 80), height=230.0, x_range=(0.4, span + 0.6),
                  y_range=_padded_range(values, clamp=(0.0, 1.0) if metric == "quality" else None))
    name = "score" if metric == "score" else "validation accuracy"
    body = _y_axis(frame, name, as_percent=metric == "quality") + _generation_axis(frame, slots)
    for slot in slots:
        body += _search_points(frame, slot, metric)
    if metric == "quality" and test_accuracy and slots:
        x, y = frame.x(span + 0.35), frame.y(test_accuracy)
        body.append(f'<path class="test-accuracy" d="M{_fmt(x)} {_fmt(y - 6)}l6 6l-6 6l-6 -6z" '
                    f'data-value="{test_accuracy:.6g}"><title>test accuracy of the served model: '
                    f'{percent(test_accuracy)}</title></path>')
    kind = "score" if metric == "score" else "accuracy"
    return _svg(f"{kind}-{task}", f"plot {kind}-plot", frame.width, frame.height, body,
                title=f"{name} per generation, task {task}", task=task,
                candidates=sum(len(s.candidates) for s in searches))


def _search_points(frame: Frame, slot: Slot, metric: str) -> list[str]:
    by_generation: dict[int, list[Candidate]] = {}
    for candidate in slot.search.candidates:
        by_generation.setdefault(candidate.generation, []).append(candidate)
    best_ids = {step.path_id for step in slot.search.lineage}
    line, dots = [], []
    for generation in sorted(by_generation):
        group = by_generation[generation]
        x0 = slot.offset + generation
        line.append((frame.x(x0), frame.y(max(getattr(c, metric) for c in group))))
        for index, candidate in enumerate(group):
            value = getattr(candidate, metric)
            best = " best" if candidate.path_id and candidate.path_id in best_ids else ""
            rejected = "" if candidate.accepted_into_population else " rejected"
            tip = (f"generation {generation}: {candidate.path_id or '(not kept)'} from {candidate.parent_id} "
                   f"({candidate.parent_task}); score {candidate.score:.4f}, validation {percent(candidate.quality)}"
                   f"; mutations: {', '.join(candidate.mutations) or 'none'}")
            dots.append(f'<circle class="candidate{best}{rejected}" cx="{_fmt(frame.x(x0 + _jitter(index, len(group))))}" '
                        f'cy="{_fmt(frame.y(value))}" r="{5 if best else 3.5}" fill="{slot.color}" '
                        f'data-generation="{generation}" data-value="{value:.6g}" data-path="{esc(candidate.path_id)}">'
                        f'<title>{esc(tip)}</title></circle>')
    points = " ".join(f"{_fmt(x)},{_fmt(y)}" for x, y in line)
    polyline = [f'<polyline class="generation-best" points="{points}" stroke="{slot.color}"/>'] if line else []
    return polyline + dots


def mutation_kind(mutation: str) -> str:
    """The action a mutation name belongs to, its index and value dropped:
    "add:residual_adapter_1" -> "add:residual_adapter", "hp:learning_rate=0.01" -> "hp:learning_rate"."""
    return re.sub(r"_\d+$", "", mutation.split("=", 1)[0])


def mutation_rates(search: Search) -> dict[str, dict[int, float]]:
    """Per mutation kind and generation: the share of the generation's candidates that drew it."""
    per_generation: dict[int, list[Candidate]] = {}
    for candidate in search.candidates:
        per_generation.setdefault(candidate.generation, []).append(candidate)
    kinds = sorted({mutation_kind(m) for c in search.candidates for m in c.mutations})
    return {kind: {g: sum(any(mutation_kind(m) == kind for m in c.mutations) for c in group) / len(group)
                   for g, group in sorted(per_generation.items())}
            for kind in kinds}


def mu_kind(key: str) -> str:
    """The action a learned-mu key belongs to: "_mu_|add:residual_adapter_1" -> "add:residual_adapter";
    the global rate "_mu_" stays "_mu_"."""
    return mutation_kind(key.split("|", 1)[1]) if "|" in key else key


def learned_mu_means(search: Search) -> dict[str, dict[int, float]]:
    """Per action kind and generation: the mean learned probability over the generation's candidates
    (and over the action's instances, e.g. every block's clone)."""
    sums: dict[str, dict[int, list[float]]] = {}
    for candidate in search.candidates:
        for key, value in candidate.learned_mu:
            sums.setdefault(mu_kind(key), {}).setdefault(candidate.generation, []).append(value)
    return {kind: {g: sum(v) / len(v) for g, v in sorted(by_generation.items())}
            for kind, by_generation in sorted(sums.items(), key=lambda item: _mu_order(item[0]))}


def mutation_rate_plot(task: str, searches: Sequence[Search]) -> str:
    """The share of candidates per generation that drew each kind of mutation: the learned mu at work."""
    return _per_generation_plot(
        task, searches, mutation_rates, y_label="share of candidates", y_max=1.0, point_class="rate",
        element_id=f"mutation-rates-{task}", css_class="plot mutation-rate-plot", empty="no mutations recorded",
        title=f"mutations drawn per generation, task {task}", describe=lambda kind, value, g:
        f"{kind}: {percent(value)} of generation {g}")


def learned_mu_plot(task: str, searches: Sequence[Search]) -> str:
    """The learned mutation probabilities per generation (mean over the generation's candidates)."""
    means = [learned_mu_means(search) for search in searches]
    top = max([v for by_kind in means for per_g in by_kind.values() for v in per_g.values()] + [0.05])
    return _per_generation_plot(
        task, searches, learned_mu_means, y_label="learned probability", y_max=top, point_class="mu",
        element_id=f"learned-mu-{task}", css_class="plot learned-mu-plot",
        empty="no learned probabilities in the retained events", title=f"learned mutation probabilities per "
        f"generation, task {task}", describe=lambda kind, value, g: f"{kind}: {value:.3g} in generation {g}")


def _per_generation_plot(task: str, searches: Sequence[Search],
                         series: Callable[[Search], dict[str, dict[int, float]]], *, y_label: str, y_max: float,
                         point_class: str, element_id: str, css_class: str, empty: str, title: str,
                         describe: Callable[[str, float, int], str]) -> str:
    """One line per kind over the generations of a task's searches, with a legend."""
    slots = slots_of(searches)
    span = sum(max(s.generations, 1) for s in searches) or 1
    values = [(slot, series(slot.search)) for slot in slots]
    kinds = sorted({kind for _, by_kind in values for kind in by_kind}, key=_mu_order)
    colors = {kind: PALETTE[i % len(PALETTE)] for i, kind in enumerate(kinds)}
    width = max(360.0, 80.0 * span + 80)
    column = max([text_width(kind, 11) for kind in kinds] + [40.0]) + 24
    per_row = max(int((width - 20) // column), 1)
    legend_rows = math.ceil(len(kinds) / per_row)
    frame = Frame(width=width, height=240.0 + 16 * legend_rows, x_range=(0.4, span + 0.6),
                  y_range=(0.0, 1.05 * y_max), bottom=46.0 + 16 * legend_rows)
    body = _y_axis(frame, y_label, as_percent=y_max == 1.0) + _generation_axis(
        frame, [dataclasses.replace(slot, color="#555") for slot in slots])
    for slot, by_kind in values:
        for kind, per_generation in by_kind.items():
            points = [(frame.x(slot.offset + g), frame.y(value)) for g, value in per_generation.items()]
            body.append(f'<polyline class="{point_class}-line" '
                        f'points="{" ".join(f"{_fmt(x)},{_fmt(y)}" for x, y in points)}" stroke="{colors[kind]}"/>')
            for (x, y), (generation, value) in zip(points, per_generation.items()):
                body.append(f'<circle class="{point_class}" cx="{_fmt(x)}" cy="{_fmt(y)}" r="3" '
                            f'fill="{colors[kind]}" data-kind="{esc(kind)}" data-generation="{generation}" '
                            f'data-value="{value:.6g}"><title>{esc(describe(kind, value, generation))}</title>'
                            f'</circle>')
    for i, kind in enumerate(kinds):
        x, y = 10 + (i % per_row) * column, frame.height - 10 - 16 * (legend_rows - 1 - i // per_row)
        body.append(f'<rect x="{_fmt(x)}" y="{_fmt(y - 9)}" width="10" height="10" fill="{colors[kind]}"/>'
                    f'<text class="legend" x="{_fmt(x + 14)}" y="{_fmt(y)}">{esc(kind)}</text>')
    if not kinds:
        body.append(f'<text class="empty" x="{_fmt(frame.width / 2)}" y="{_fmt(frame.height / 2)}" '
                    f'text-anchor="middle">{esc(empty)}</text>')
    return _svg(element_id, css_class, frame.width, frame.height, body, title=title, task=task, kinds=len(kinds))


def mu_heatmap(tasks: Sequence[TaskRow]) -> str:
    """The learned mutation probabilities of every task's served path: a row per action, a column per task."""
    keys = sorted({key for task in tasks for key in task.learned_mu}, key=_mu_order)
    label_width = max([text_width(k, 11) for k in keys] + [60.0]) + 12
    cell_w, cell_h, top = 84.0, 18.0, 64.0
    width = label_width + cell_w * max(len(tasks), 1) + 12
    height = top + cell_h * max(len(keys), 1) + 12
    values = [v for task in tasks for v in task.learned_mu.values()]
    low, high = min(values, default=0.0), max(values, default=1.0)
    body = []
    for column, task in enumerate(tasks):
        x = label_width + cell_w * (column + 0.5)
        body.append(f'<text class="column-label" x="{_fmt(x)}" y="{_fmt(top - 24)}" text-anchor="middle">'
                    f'{esc(task.name)}</text><text class="tick" x="{_fmt(x)}" y="{_fmt(top - 8)}" '
                    f'text-anchor="middle">version {task.path_version}</text>')
    for row, key in enumerate(keys):
        y = top + cell_h * row
        body.append(f'<text class="row-label" x="{_fmt(label_width - 8)}" y="{_fmt(y + cell_h / 2)}" '
                    f'text-anchor="end" dominant-baseline="middle">{esc(key)}</text>')
        for column, task in enumerate(tasks):
            if key not in task.learned_mu:
                continue
            value = task.learned_mu[key]
            x = label_width + cell_w * column
            shade = 0.1 + 0.8 * ((value - low) / (high - low) if high > low else 0.5)
            fill = f"rgb({int(255 - 200 * shade)},{int(255 - 130 * shade)},255)"
            ink = "#fff" if shade > 0.7 else "#111"
            body.append(f'<g class="mu-cell" data-task="{esc(task.name)}" data-key="{esc(key)}" data-value="{value:.6g}">'
                        f'<rect x="{_fmt(x + 1)}" y="{_fmt(y + 1)}" width="{_fmt(cell_w - 2)}" height="{_fmt(cell_h - 2)}" '
                        f'fill="{fill}"/><text x="{_fmt(x + cell_w / 2)}" y="{_fmt(y + cell_h / 2)}" '
                        f'text-anchor="middle" dominant-baseline="middle" fill="{ink}">{value:.2f}</text>'
                        f'<title>{esc(f"{task.name}: {key} = {value:g}")}</title></g>')
    if not keys:
        body.append(f'<text class="empty" x="{_fmt(width / 2)}" y="{_fmt(top + 10)}" text-anchor="middle">'
                    f'no learned mutation probabilities yet</text>')
    if values:
        body.append(f'<text class="tick" x="{_fmt(label_width)}" y="{_fmt(height - 2)}">lightest {low:g}, '
                    f'darkest {high:g}</text>')
    return _svg("mu-heatmap", "plot mu-plot", width, height + 6, body,
                title="learned mutation probabilities of each task's served model", cells=sum(
                    len(t.learned_mu) for t in tasks))


def bar_chart(element_id: str, title: str, rows: Sequence[tuple[str, Sequence[tuple[str, float]]]],
              *, unit: str = "") -> str:
    """Horizontal bars: per row (a task) one bar per (metric, value)."""
    metrics = list(dict.fromkeys(metric for _, bars in rows for metric, _ in bars))
    colors = {metric: PALETTE[i % len(PALETTE)] for i, metric in enumerate(metrics)}
    label_width = max([text_width(name) for name, _ in rows] + [40.0]) + 16
    bar_h, group_gap, top, plot_w = 14.0, 12.0, 28.0, 340.0
    height = top + sum(bar_h * len(bars) + group_gap for _, bars in rows) + 12
    high = max([value for _, bars in rows for _, value in bars] + [1.0])
    body = []
    for i, metric in enumerate(metrics):
        x = label_width + i * 110
        body.append(f'<rect x="{_fmt(x)}" y="6" width="10" height="10" fill="{colors[metric]}"/>'
                    f'<text class="legend" x="{_fmt(x + 14)}" y="15">{esc(metric)}</text>')
    y = top
    for name, bars in rows:
        body.append(f'<text class="row-label" x="{_fmt(label_width - 8)}" y="{_fmt(y + bar_h * len(bars) / 2)}" '
                    f'text-anchor="end" dominant-baseline="middle">{esc(name)}</text>')
        for metric, value in bars:
            length = max(plot_w * value / high, 0.5)
            body.append(f'<g class="bar" data-task="{esc(name)}" data-metric="{esc(metric)}" data-value="{value:.6g}">'
                        f'<rect x="{_fmt(label_width)}" y="{_fmt(y + 1)}" width="{_fmt(length)}" '
                        f'height="{_fmt(bar_h - 2)}" fill="{colors[metric]}"/><text class="bar-value" '
                        f'x="{_fmt(label_width + length + 4)}" y="{_fmt(y + bar_h / 2)}" dominant-baseline="middle">'
                        f'{esc(human(value) + unit)}</text><title>{esc(f"{name} {metric}: {value:,.0f}{unit}")}</title></g>')
            y += bar_h
        y += group_gap
    return _svg(element_id, "plot bar-chart", label_width + plot_w + 90, height, body, title=title)


# ---- the lineage ------------------------------------------------------------------------------------------


def lineage_svg(task: str, searches: Sequence[Search]) -> str:
    """Each search's chain of accepted candidates (best so far, in order), with parents and mutations."""
    line_h, pad, width, chars = 15.0, 8.0, 760.0, 108
    body, y = [], 10.0
    for index, search in enumerate(searches):
        color = PALETTE[index % len(PALETTE)]
        heading = f"{search.kind or 'search'} {search.operation}".strip()
        if search.finished:
            heading += f": {search.finished.state}"
            if search.finished.path_id:
                heading += f", serves {search.finished.path_id}"
        body.append(f'<text class="lineage-heading" x="0" y="{_fmt(y + 12)}" fill="{color}">{esc(heading)}</text>')
        y += 22
        if not search.lineage:
            beaten = search.kind == "generalization" and search.finished is not None
            empty = "no candidate beat the served model" if beaten else "no accepted candidate in the retained events"
            body.append(f'<text class="empty" x="12" y="{_fmt(y + 10)}">{empty}</text>')
            y += 24
        previous = ""
        for step in search.lineage:
            candidate = step.candidate
            title = f"{step.path_id}: score {step.score:.4f}, validation {percent(step.quality)}"
            lines = []
            if candidate is not None:
                title = f"generation {candidate.generation} · " + title
                relation = " (the previous best)" if candidate.parent_id == previous else ""
                lines.append(f"parent {candidate.parent_id} of {candidate.parent_task}{relation}")
                lines += wrap([f"mutations: {candidate.mutations[0]}", *candidate.mutations[1:]]
                              if candidate.mutations else ["mutations: none"], chars)
            else:
                lines.append("its CandidateScored event is no longer retained")
            box_h = pad * 2 + line_h * (1 + len(lines))
            served = search.finished is not None and search.finished.path_id == step.path_id
            body.append(f'<g class="lineage-node{" served" if served else ""}" data-path="{esc(step.path_id)}" '
                        f'data-mutations="{len(candidate.mutations) if candidate else 0}">'
                        f'<rect x="12" y="{_fmt(y)}" width="{_fmt(width - 24)}" height="{_fmt(box_h)}" rx="6" '
                        f'stroke="{color}"/><text class="lineage-title" x="24" y="{_fmt(y + pad + 11)}">'
                        f'{esc(title)}{" · served" if served else ""}</text>'
                        + "".join(f'<text x="24" y="{_fmt(y + pad + 11 + line_h * (i + 1))}">{esc(text)}</text>'
                                  for i, text in enumerate(lines)) + "</g>")
            y += box_h
            previous = step.path_id
            if step is not search.lineage[-1]:
                body.append(f'<path class="lineage-edge" d="M40 {_fmt(y)}v14m-5 -6l5 6l5 -6" stroke="{color}"/>')
                y += 16
        y += 14
    return _svg(f"lineage-{task}", "lineage", width, max(y, 30.0), body, title=f"accepted lineage, task {task}",
                task=task, steps=sum(len(s.lineage) for s in searches))


# ---- the sharing graph -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GraphNode:
    key: str  # unique in the graph
    kind: Literal["task", "root", "group"]
    lines: tuple[str, ...]  # its label, a line each
    element_id: str


@dataclasses.dataclass(frozen=True)
class SharingGraph:
    """Tasks (and the root model) joined to the groups of components they share.

    A group is every component used by the same set of two or more tasks (or
    the root); an edge joins a group to each task of its set.
    """

    nodes: tuple[GraphNode, ...]
    edges: tuple[tuple[str, str], ...]  # (task or root key, group key)


def sharing_graph(tasks: Sequence[TaskRow]) -> SharingGraph:
    users: dict[str, set[str]] = {}
    first: dict[str, ComponentUse] = {}
    for task in tasks:
        for component in task.components:
            users.setdefault(component.id, set()).update({task.name, *component.locked_by})
            first.setdefault(component.id, component)
    groups: dict[tuple[str, ...], list[ComponentUse]] = {}
    for component_id, sharers in users.items():
        if len(sharers) > 1:
            groups.setdefault(tuple(sorted(sharers)), []).append(first[component_id])
    nodes, edges = [], []
    if any(ROOT_TASK in sharers for sharers in groups):
        nodes.append(GraphNode(f"t:{ROOT_TASK}", "root", ("root model",), "graph-root"))
    for task in tasks:
        own = [c for c in task.components if users[c.id] == {task.name}]
        nodes.append(GraphNode(f"t:{task.name}", "task", (
            task.name, f"own: {_count(len(own), 'component')}, {human(sum(c.params for c in own))} params"),
            f"graph-task-{task.name}"))
    known = {node.key for node in nodes}
    for index, (sharers, components) in enumerate(sorted(groups.items())):
        lines = _name_lines([c.name for c in components])
        key = f"g:{index}"
        heading = f"{_count(len(components), 'shared component')}, {human(sum(c.params for c in components))} params"
        nodes.append(GraphNode(key, "group", (heading, *lines), f"graph-group-{index}"))
        for sharer in sharers:
            if f"t:{sharer}" not in known:  # a locker the report does not list (a task being deleted)
                nodes.append(GraphNode(f"t:{sharer}", "task", (sharer,), f"graph-task-{sharer}"))
                known.add(f"t:{sharer}")
            edges.append((f"t:{sharer}", key))
    return SharingGraph(tuple(nodes), tuple(edges))


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _name_lines(names: Sequence[str], width: int = 30, max_lines: int = 3) -> list[str]:
    """Component names in a few lines, the rest counted."""
    lines = wrap(names, width)
    if len(lines) <= max_lines:
        return lines
    shown = sum(len(line.rstrip(",").split(", ")) for line in lines[:max_lines])
    return lines[:max_lines] + [f"(+{len(names) - shown} more)"]


def _dot_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def graph_dot(graph: SharingGraph) -> str:
    """The graph in Graphviz DOT, with the SVG ids and classes of the builtin layout."""
    lines = ['graph sharing {', '  graph [rankdir=TB, nodesep=0.3, ranksep=0.6, bgcolor="transparent"];',
             '  node [fontname="Helvetica", fontsize=11, style=filled, penwidth=1.2];',
             '  edge [color="#888888", penwidth=1.2];']
    for node in graph.nodes:
        shape, fill = {"task": ("ellipse", "#dbe9f6"), "root": ("ellipse", "#eeeeee"),
                       "group": ("box", "#fff4d6")}[node.kind]
        label = "\\n".join(line.replace("\\", "\\\\").replace('"', '\\"') for line in node.lines)
        lines.append(f'  {_dot_string(node.key)} [id={_dot_string(node.element_id)}, class={_dot_string(node.kind)}, '
                     f'shape={shape}, fillcolor="{fill}", label="{label}"];')
    for index, (source, target) in enumerate(graph.edges):
        lines.append(f'  {_dot_string(source)} -- {_dot_string(target)} [id="graph-edge-{index}", class="share-edge"];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def graphviz_svg(dot_text: str) -> str | None:
    """`dot -Tsvg` of the text as an inline <svg> element; None when Graphviz is missing or fails."""
    binary = shutil.which("dot")
    if binary is None:
        return None
    try:
        result = subprocess.run([binary, "-Tsvg"], input=dot_text, capture_output=True, text=True,
                                timeout=DOT_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        logger.warning("graphviz failed (%s); the sharing graph uses the builtin layout", error)
        return None
    start = result.stdout.find("<svg")
    if result.returncode != 0 or start < 0:
        logger.warning("graphviz exited with %d (%s); the sharing graph uses the builtin layout",
                       result.returncode, result.stderr.strip()[:200])
        return None
    svg = re.sub(r"<!--.*?-->", "", result.stdout[start:], flags=re.DOTALL).strip()
    return svg.replace("<svg ", '<svg id="sharing-graph-svg" ', 1)


@dataclasses.dataclass(frozen=True)
class Placed:
    """A node's box centre and size."""

    x: float
    y: float
    width: float
    height: float
    layer: int


def layered_layout(sizes: Mapping[str, tuple[float, float]], edges: Sequence[tuple[str, str]], *,
                   gap_x: float = 28.0, gap_y: float = 72.0, sweeps: int = 4) -> dict[str, Placed]:
    """A small layered (Sugiyama-style) layout of a directed acyclic graph.

    Layers by longest path from the sources (an edge that would close a cycle
    is ignored), orders each layer by the barycentre of its neighbours in the
    layer above, then below (`sweeps` rounds), and centres the layers on the
    widest. `sizes` maps each node to its (width, height), in input order.
    """
    order = list(sizes)
    successors: dict[str, list[str]] = {node: [] for node in order}
    predecessors: dict[str, list[str]] = {node: [] for node in order}
    for source, target in edges:
        if source in sizes and target in sizes and source != target:
            successors[source].append(target)
            predecessors[target].append(source)
    layer = _longest_path_layers(order, successors, predecessors)
    rows: list[list[str]] = [[] for _ in range(max(layer.values(), default=0) + 1)]
    for node in order:
        rows[layer[node]].append(node)
    for _ in range(sweeps):
        for index in range(1, len(rows)):
            rows[index] = _by_barycentre(rows[index], rows[index - 1], predecessors)
        for index in range(len(rows) - 2, -1, -1):
            rows[index] = _by_barycentre(rows[index], rows[index + 1], successors)
    widths = [sum(sizes[n][0] for n in row) + gap_x * (len(row) - 1) for row in rows]
    widest = max(widths, default=0.0)
    placed: dict[str, Placed] = {}
    y = 0.0
    for index, row in enumerate(rows):
        height = max((sizes[n][1] for n in row), default=0.0)
        x = (widest - widths[index]) / 2
        for node in row:
            width = sizes[node][0]
            placed[node] = Placed(x + width / 2, y + height / 2, width, sizes[node][1], index)
            x += width + gap_x
        y += height + gap_y
    return placed


def _longest_path_layers(order: Sequence[str], successors: Mapping[str, list[str]],
                         predecessors: Mapping[str, list[str]]) -> dict[str, int]:
    remaining = {node: len(predecessors[node]) for node in order}
    ready = [node for node in order if remaining[node] == 0]
    layer = {node: 0 for node in order}
    done: set[str] = set()
    while len(done) < len(order):
        if not ready:  # a cycle: break it at the first node not yet placed
            ready = [next(node for node in order if node not in done)]
        node = ready.pop(0)
        if node in done:
            continue
        done.add(node)
        for target in successors[node]:
            if target in done:
                continue  # the edge closes a cycle
            layer[target] = max(layer[target], layer[node] + 1)
            remaining[target] -= 1
            if remaining[target] == 0:
                ready.append(target)
    return layer


def _by_barycentre(row: list[str], fixed: list[str], neighbours: Mapping[str, list[str]]) -> list[str]:
    position = {node: i for i, node in enumerate(fixed)}

    def key(item: tuple[int, str]) -> float:
        index, node = item
        linked = [position[n] for n in neighbours[node] if n in position]
        return sum(linked) / len(linked) if linked else float(index)  # unlinked nodes keep their place

    return [node for _, node in sorted(enumerate(row), key=key)]


def builtin_graph_svg(graph: SharingGraph) -> str:
    """The sharing graph drawn with `layered_layout`: tasks on top, the groups they share below."""
    font, line_h = 11.0, 15.0
    sizes = {node.key: (max(text_width(line, font) for line in node.lines) + (36 if node.kind != "group" else 20),
                        line_h * len(node.lines) + 16) for node in graph.nodes}
    placed = layered_layout(sizes, graph.edges)
    margin = 10.0
    width = max((p.x + p.width / 2 for p in placed.values()), default=100.0) + 2 * margin
    height = max((p.y + p.height / 2 for p in placed.values()), default=30.0) + 2 * margin
    body = []
    for index, (source, target) in enumerate(graph.edges):
        a, b = placed[source], placed[target]
        x1, y1, x2, y2 = a.x + margin, a.y + a.height / 2 + margin, b.x + margin, b.y - b.height / 2 + margin
        middle = (y1 + y2) / 2
        body.append(f'<g id="graph-edge-{index}" class="edge share-edge"><path d="M{_fmt(x1)} {_fmt(y1)}C{_fmt(x1)} '
                    f'{_fmt(middle)} {_fmt(x2)} {_fmt(middle)} {_fmt(x2)} {_fmt(y2)}"/></g>')
    for node in graph.nodes:
        p = placed[node.key]
        x, y = p.x + margin, p.y + margin
        if node.kind == "group":
            shape = (f'<rect x="{_fmt(x - p.width / 2)}" y="{_fmt(y - p.height / 2)}" width="{_fmt(p.width)}" '
                     f'height="{_fmt(p.height)}" rx="3"/>')
        else:
            shape = f'<ellipse cx="{_fmt(x)}" cy="{_fmt(y)}" rx="{_fmt(p.width / 2)}" ry="{_fmt(p.height / 2)}"/>'
        first = y - line_h * (len(node.lines) - 1) / 2
        texts = "".join(f'<text x="{_fmt(x)}" y="{_fmt(first + line_h * i)}" text-anchor="middle" '
                        f'dominant-baseline="middle">{esc(line)}</text>' for i, line in enumerate(node.lines))
        body.append(f'<g id="{esc(node.element_id)}" class="node {node.kind}"><title>{esc(node.key)}</title>'
                    f'{shape}{texts}</g>')
    return _svg("sharing-graph-svg", "graph", width, height, body, title="sharing graph")


def sharing_graph_html(graph: SharingGraph, layout: GraphLayout = "auto") -> str:
    """The graph as an inline SVG in a div whose data-renderer says who laid it out."""
    svg = graphviz_svg(graph_dot(graph)) if layout in ("auto", "graphviz") else None
    if svg is None and layout == "graphviz":
        logger.warning("graphviz (dot) is not available; the sharing graph uses the builtin layout")
    renderer = "graphviz" if svg is not None else "builtin"
    svg = svg if svg is not None else builtin_graph_svg(graph)
    groups = sum(node.kind == "group" for node in graph.nodes)
    return (f'<div id="sharing-graph" data-renderer="{renderer}" data-groups="{groups}" '
            f'data-edges="{len(graph.edges)}">{svg}</div>')


# ---- the page --------------------------------------------------------------------------------------------------

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px} p.note{color:#555;font-size:13px;margin:4px 0 10px;max-width:900px}
.meta{color:#555;font-size:13px} table{border-collapse:collapse;font-size:13px}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:right} th{background:#f4f4f4} td:first-child,th:first-child{text-align:left}
.plots{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
svg{font-size:11px;background:#fff} svg .grid{stroke:#eee} svg .tick{fill:#666;font-size:10px}
svg .axis-label{fill:#444;font-size:11px} svg .search-label{font-size:11px;font-weight:600}
svg .search-separator{stroke:#bbb;stroke-dasharray:4 3} svg .generation-best,svg .rate-line{fill:none;stroke-width:1.5;opacity:.6}
svg circle.candidate{opacity:.75} svg circle.candidate.best{stroke:#000;stroke-width:1.2;opacity:1}
svg circle.candidate.rejected{fill-opacity:.25} svg .test-accuracy{fill:#000}
svg .lineage-node rect{fill:#fafafa;stroke-width:1.2} svg .lineage-node.served rect{fill:#eef7ee}
svg .lineage-title{font-weight:600} svg .lineage-heading{font-weight:600;font-size:12px}
svg .lineage-edge{fill:none;stroke-width:1.5} svg .empty{fill:#888}
#sharing-graph-svg .share-edge path{fill:none;stroke:#888;stroke-width:1.2}
#sharing-graph-svg g.task ellipse{fill:#dbe9f6;stroke:#333} #sharing-graph-svg g.root ellipse{fill:#eee;stroke:#333}
#sharing-graph-svg g.group rect{fill:#fff4d6;stroke:#333}
#sharing-graph{overflow-x:auto} #sharing-graph svg{max-width:100%;height:auto}
"""
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"


def _summary_html(report: Report) -> str:
    system = report.system
    damaged = f", <strong>damaged: {esc(', '.join(system.damaged_tasks))}</strong>" if system.damaged_tasks else ""
    return (f'<p class="meta" id="summary" data-tasks="{system.num_tasks}" data-components="{system.num_components}">'
            f"{system.num_tasks} tasks, {system.num_components} components, {system.total_params:,} parameters; "
            f"root model {esc(system.root_model or '-')}, configuration {esc(system.config_name or '-')}, "
            f"checkpoint step {system.checkpoint_step}{damaged}.<br>Server {esc(report.server)}, "
            f"{report.events_read} retained events read, {esc(report.generated_at)}.</p>")


def params_table(tasks: Sequence[TaskRow]) -> str:
    header = ("task", "status", "version", "score", "validation", "test", "own params", "charged params",
              "path params", "FLOPs / image", "classes", "shares with")
    rows = []
    for t in tasks:
        cells = (t.status, t.path_version, f"{t.best_score:.4f}", percent(t.validation_accuracy),
                 percent(t.test_accuracy) if t.test_accuracy else "-", f"{t.own_params:,}",
                 f"{t.accounted_params:,.0f}", f"{t.path_params:,}", human(t.flops), t.num_classes,
                 ", ".join(t.shares_with) or "-")
        rows.append(f'<tr class="task-row" data-task="{esc(t.name)}" data-path-params="{t.path_params}" '
                    f'data-flops="{t.flops:.6g}"><td>{esc(t.name)}</td>'
                    + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>")
    return ('<table id="params-table"><thead><tr>' + "".join(f"<th>{esc(h)}</th>" for h in header)
            + "</tr></thead><tbody>" + "".join(rows) + "</tbody></table>")


def _task_section(report: Report, task: TaskRow) -> str:
    searches = report.searches_of(task.name)
    if not searches:
        return (f'<section class="task" id="task-{esc(task.name)}" data-task="{esc(task.name)}"><h3>{esc(task.name)}'
                f'</h3><p class="note">No retained events of this task (status {esc(task.status)}).</p></section>')
    return (f'<section class="task" id="task-{esc(task.name)}" data-task="{esc(task.name)}"><h3>{esc(task.name)} '
            f'<span class="meta">{esc(task.status)}, version {task.path_version}, score {task.best_score:.4f}, '
            f'validation {percent(task.validation_accuracy)}</span></h3><div class="plots">'
            + generation_plot(task.name, searches, "score")
            + generation_plot(task.name, searches, "quality", task.test_accuracy)
            + mutation_rate_plot(task.name, searches)
            + learned_mu_plot(task.name, searches)
            + "</div><h3>accepted lineage</h3>" + lineage_svg(task.name, searches) + "</section>")
SEARCHES_NOTE = (
    '<p class="note">One dot per scored candidate (faint: not kept in the population; ringed: became the '
    "search's best), a line through each generation's best; searches of a task (its extension, later "
    "improvements) follow each other on one axis. The diamond is the served model's test accuracy. The "
    "third plot shows the share of each generation's candidates that drew each kind of mutation, the fourth "
    "the learned mutation probabilities themselves (the mean over a generation's candidates and over an "
    "action's instances, e.g. every block's clone). Under each task, the chain of accepted candidates with their "
    "mutations.</p>"
)
MU_NOTE = (
    "<p class=\"note\">The <code>_mu_</code> hyperparameters of each task's served model: the global rate "
    "and one probability per mutation action (children inherit them, so each column carries what the searches "
    "learned up to that task). Tasks are in the order their searches started.</p>"
)
COSTS_NOTE = (
    "<p class=\"note\">own: components only this task uses (what deleting it frees); charged: each component "
    "divided among the tasks that share it (what the search's score counts); whole path: every component "
    "of the served model.</p>"
)
GRAPH_NOTE = (
    '<p class="note">Tasks (and the root model) joined to the groups of components they share; a task\'s own '
    "components are counted in its node.</p>"
)


def render_html(report: Report, *, graph_layout: GraphLayout = "auto") -> str:
    """The whole page: a standalone HTML document, no script, nothing loaded from anywhere."""
    tasks = report.tasks
    params_rows = [(t.name, [("own", float(t.own_params)), ("charged", t.accounted_params),
                             ("whole path", float(t.path_params))]) for t in tasks]
    flops_rows = [(t.name, [("FLOPs per image", t.flops)]) for t in tasks]
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>evolve report: {esc(report.server)}</title><style>{STYLE}</style></head><body>",
        "<h1>evolve report</h1>", _summary_html(report),
        '<h2 id="searches">Score and accuracy per generation</h2>',
        SEARCHES_NOTE,
        *(_task_section(report, task) for task in tasks),
        '<h2 id="mu">Learned mutation probabilities</h2>',
        MU_NOTE,
        mu_heatmap(tasks),
        '<h2 id="costs">Parameters and FLOPs per task</h2>',
        COSTS_NOTE,
        params_table(tasks),
        '<div class="plots">', bar_chart("params-chart", "parameters per task", params_rows),
        bar_chart("flops-chart", "FLOPs per image per task", flops_rows), "</div>",
        '<h2 id="sharing">Sharing graph</h2>',
        GRAPH_NOTE,
        sharing_graph_html(sharing_graph(tasks), graph_layout),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"
