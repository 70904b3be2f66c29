"""The engine: runs extension and generalization searches, serves predictions.

Transport-free: the service calls these methods from its job queue and its
request threads. System mutations happen under one lock; training runs
outside it on immutable snapshots, so predictions keep flowing during a
search and a finished search swaps a task's served path atomically.
Reads (task, tasks, task_page, summary) take no lock: they return records of
an immutable view that each mutation republishes (see `_ReadView`).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import os
import threading
import time
import types
from typing import Any, Callable, Collection, Mapping, Sequence

import jax
import numpy as np

from evolve import checkpoint, statedir
from evolve.batching import MicroBatcher
from evolve.config import SERVING_EXECUTABLES, SERVING_MAX_YIELD_SECONDS, TRAINING_EXECUTABLES, SearchConfig
from evolve.data import DataLimits, TaskData, check_task_source, load_task_data, preprocess_eval
from evolve.data.arrays import ValidationSplit
from evolve.errors import (
    READ_ONLY_MESSAGE,
    AlreadyExistsError,
    CancelledError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
)
from evolve.events import (
    CheckpointWritten,
    Event,
    EventCallback,
    SearchFinished,
)
from evolve.models import root as root_models
from evolve.search import scoring, selection
from evolve.search.budget import EXTENSION, GENERALIZATION, SearchPlan, search_plan
from evolve.search.iteration import TaskIteration, structure_of
from evolve.system import System, TaskRecord, TaskStatus
from evolve.train import loop, steps
from evolve.train.priority import ServingPriority
from evolve.types import ROOT_TASK, Component, ParentProbe, Path, PathStructure, TaskSpec, validate_task_name

logger = logging.getLogger(__name__)



@dataclasses.dataclass(frozen=True)
class EngineOptions:
    data_roots: tuple[str, ...] = ()
    max_predict_batch: int = 1024
    max_train_examples: int | None = None
    seed: int = 0
    # Compiled executables kept, least recently used evicted first (steps.set_compiled_bounds):
    # train + eval steps (at least twice the candidates a generation trains at once, or its
    # steps evict each other), and predict (one per served structure and batch bucket).
    max_compiled_structures: int = TRAINING_EXECUTABLES
    max_compiled_predicts: int = SERVING_EXECUTABLES
    min_free_bytes: int = 256 << 20  # new work is refused while the state disk has less free
    data_limits: DataLimits = DataLimits()  # what loading a task's data may cost
    # Warm-up (see Engine.warm_up): every predict bucket up to this batch size
    # (0: none), and every bucket a client has used, is compiled before a path serves.
    warm_up_batch: int = 1
    serving_max_yield_seconds: float = SERVING_MAX_YIELD_SECONDS  # Predict before training (train.priority)
    # Concurrent Predict calls of one task run as one device call (evolve.batching):
    # those that arrive while the task's previous call runs, plus, with a window > 0,
    # those that arrive within it. None: every call runs alone.
    predict_batch_window_seconds: float | None = 0.0
    predict_instances: int = 1  # device calls of one task that may run at once before calls queue


@dataclasses.dataclass(frozen=True)
class ServedModel:
    """An immutable snapshot of a task's served path, on device."""

    path_id: str
    version: int
    structure: PathStructure
    params: Mapping[str, Any]
    class_names: tuple[str, ...]
    components: tuple[tuple[str, str], ...] = ()  # (id, content hash) of each component, forward order


@dataclasses.dataclass(frozen=True)
class WarmUp:
    """What one warm-up did."""

    tasks: int
    executables: int  # (structure, bucket) pairs run for the first time
    buckets: tuple[int, ...]
    seconds: float


@dataclasses.dataclass(frozen=True)
class Prediction:
    task: str
    path_version: int
    probabilities: np.ndarray  # [batch, classes] float32
    class_names: tuple[str, ...]

    @property
    def classes(self) -> np.ndarray:
        return np.argmax(self.probabilities, axis=-1)


@dataclasses.dataclass(frozen=True)
class ComponentInfo:
    name: str
    id: str
    locked_by: tuple[str, ...]
    params: int


@dataclasses.dataclass(frozen=True)
class TaskInfo:
    name: str
    status: str
    spec: TaskSpec
    num_classes: int
    class_names: tuple[str, ...]
    message: str
    best_score: float | None = None
    validation_accuracy: float | None = None
    test_accuracy: float | None = None
    params: int = 0  # the whole served path (= path_params; the wire field's old name)
    accounted_params: float = 0.0  # charged: each component divided among the tasks locking it
    own_params: int = 0  # components only this task locks
    path_params: int = 0  # every component of the served path
    flops: float = 0.0
    path_version: int = 0
    components: tuple[ComponentInfo, ...] = ()
    shares_with: tuple[str, ...] = ()
    hparams: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    probes: tuple[ParentProbe, ...] = ()  # why the extension search chose its first parents


@dataclasses.dataclass(frozen=True)
class SystemSummary:
    num_tasks: int
    num_components: int
    total_params: int
    params_per_task: Mapping[str, float]
    sharing: Mapping[tuple[str, str], int]  # (task a, task b) -> shared components
    checkpoint_step: int
    root_description: str
    config_name: str
    damaged_tasks: tuple[str, ...] = ()

    def dot(self) -> str:
        """The sharing graph in Graphviz DOT."""
        lines = ["graph sharing {"]
        for task in sorted(self.params_per_task):
            lines.append(f'  "{task}" [label="{task}\\n{self.params_per_task[task]:.3g} params"];')
        for (a, b), shared in sorted(self.sharing.items()):
            lines.append(f'  "{a}" -- "{b}" [label="{shared}"];')
        lines.append("}")
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class _ReadView:
    """What readers see, built under the engine's lock and published with one
    assignment (atomic in CPython), so that no read waits on a search, a plan
    or a save. Never mutated once published: a change builds the records of
    the tasks it touched and a new view around them (copy-on-write)."""

    infos: Mapping[str, TaskInfo]
    names: tuple[str, ...]  # sorted
    ordered: tuple[TaskInfo, ...]  # the records in `names` order: ListTasks pages slice it
    summary: SystemSummary


PREDICT_BUCKETS_KEY = "predict_buckets"  # the engine's own entry in a checkpoint's `extra`


def enable_compilation_cache(directory: str, max_bytes: int = 0, min_compile_seconds: float = 0.5) -> None:
    """JAX's persistent compilation cache under the state directory.

    With `max_bytes` > 0 JAX itself evicts the least recently used programs
    once the directory grows past it (`jax_compilation_cache_max_size`), so
    the cache of a server that has tried many structures stays bounded.
    """
    if max_bytes < 0:
        raise ValueError(f"compilation cache bound must be >= 0 bytes, got {max_bytes}")
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)
    jax.config.update("jax_compilation_cache_max_size", int(max_bytes) if max_bytes else -1)


class Engine:
    """Holds the System; runs searches; predicts."""

    def __init__(
        self,
        system: System,
        *,
        state_dir: str | None = None,
        devices: Sequence[jax.Device] | None = None,
        options: EngineOptions = EngineOptions(),
        on_event: EventCallback | None = None,
        checkpoint_step: int = 0,
        checkpoint_store: checkpoint.Store | None = None,
        read_only: bool = False,
    ):
        self.system = system
        self.state_dir = state_dir
        # A serving replica (DESIGN §4, many agents): it serves what another
        # process commits under state_dir (`follow`) and never writes there.
        self.read_only = read_only
        # What this process knows is on disk, so a save writes what changed.
        self._store = checkpoint_store or (checkpoint.Store(state_dir) if state_dir and not read_only else None)
        self.devices = list(devices or jax.local_devices())
        self.options = options
        self.priority = ServingPriority(max_wait_seconds=options.serving_max_yield_seconds)
        window = options.predict_batch_window_seconds
        self.batcher = None if window is None else MicroBatcher(options.max_predict_batch, window,
                                                                options.predict_instances)
        steps.set_compiled_bounds(training=options.max_compiled_structures, serving=options.max_compiled_predicts)
        self._on_event = on_event
        self._lock = threading.RLock()
        self._data: dict[str, TaskData] = {}
        self._served: dict[str, ServedModel] = {}
        # Served components on the device, by (id, content hash): a component
        # that many served paths share (the root's, a frozen body) is there once.
        self._on_device: dict[tuple[str, str], Any] = {}
        self._device_users: collections.Counter[tuple[str, str]] = collections.Counter()  # served paths using each
        self._searches_run = 0
        self.checkpoint_step = checkpoint_step
        # Caller state saved with every checkpoint (the service's operations).
        self.restored_extra: dict[str, Any] = {}
        self.extra_state: Callable[[], Mapping[str, Any]] | None = None
        # Told of every checkpoint write: what it wrote (None when it failed)
        # and its seconds; called under the lock, so it must not block.
        self.on_checkpoint: Callable[[checkpoint.Written | None, float], None] | None = None
        # Predict buckets clients have used (saved with each checkpoint).
        self._used_buckets: set[int] = set()
        # The read view and what keeps its summary incremental: each component's
        # parameter count (components never change their parameters) and sharing.
        self._param_counts: dict[str, int] = {}
        self._total_params = 0
        self._sharing: Mapping[tuple[str, str], int] = types.MappingProxyType({})
        self._view: _ReadView | None = None
        with self._lock:
            self._publish(None, sharing=True)
        for task in system.best:
            self._serve(task)

    # ---- construction ------------------------------------------------------

    @classmethod
    def create(cls, config: SearchConfig, *, root_npz: str | None = None, **kwargs) -> "Engine":
        """A new system on a random root of the configuration's size, or a ViT .npz."""
        seed = kwargs.get("options", EngineOptions()).seed
        if root_npz:
            size, params = root_models.load_vit_npz(root_npz, image_size=config.default_image_size)
            config = dataclasses.replace(config, size=size)
            trained, description = True, f"vit_npz:{os.path.basename(root_npz)} ({size.name})"
        else:
            params = root_models.random_root(
                config.size, image_size=config.default_image_size, rng=jax.random.key(seed)
            )
            trained, description = False, f"random:{config.size.name}"
        system = System(config=config, components={}, paths={}, root_path_id="", root_description=description)
        names = {}
        for name, component_params in params.items():
            component = Component(
                id=system.new_id("c"), name=name, params=component_params, origin=ROOT_TASK,
                trained=trained, locked_by=frozenset({ROOT_TASK}),
            )
            system.components[component.id] = component
            names[name] = component.id
        root_path = Path(id=system.new_id("p"), task=ROOT_TASK, components=names, hparams=config.default_hparams())
        system.paths[root_path.id] = root_path
        system.root_path_id = root_path.id
        return cls(system, **kwargs)

    @classmethod
    def restore(cls, state_dir: str, *, read_only: bool = False, **kwargs) -> "Engine | None":
        """The engine of the last complete checkpoint under state_dir, or None.

        `read_only`: a serving replica of that directory, which another process
        writes; it serves and reads, `follow` loads newer steps, and every
        change (tasks, searches, saves) is refused."""
        restored = checkpoint.restore(state_dir, read_only=read_only)
        if restored is None:
            return None
        engine = cls(restored.system, state_dir=state_dir, checkpoint_step=restored.step,
                     checkpoint_store=restored.store, read_only=read_only, **kwargs)
        engine._take_extra(restored.extra)
        return engine

    def _take_extra(self, extra: Mapping[str, Any]) -> None:
        """A restored checkpoint's caller state, and the Predict buckets it remembers."""
        self.restored_extra = {k: v for k, v in extra.items() if k != PREDICT_BUCKETS_KEY}
        self._used_buckets.update(int(b) for b in extra.get(PREDICT_BUCKETS_KEY, ()))

    # ---- tasks ---------------------------------------------------------------

    def add_task(self, spec: TaskSpec) -> TaskInfo:
        """Registers a new task (PENDING) after cheap checks of its spec.

        No data is loaded here (DESIGN §7): the task's search loads it, so a
        request never waits on a dataset, and bad contents fail the search."""
        self._writable()
        validate_task_name(spec.name, "spec.name")
        with self._lock:
            if spec.name in self.system.tasks:
                raise AlreadyExistsError("task", spec.name)
        check_task_source(spec, data_roots=self.options.data_roots, limits=self.options.data_limits)
        with self._lock:
            if spec.name in self.system.tasks:
                raise AlreadyExistsError("task", spec.name)
            self.system.tasks[spec.name] = TaskRecord(spec=spec)
            self._publish((spec.name,))
            return self._view.infos[spec.name]

    def task(self, name: str) -> TaskInfo:
        info = self._view.infos.get(name)  # no lock: the published view
        if info is None:
            raise NotFoundError("task", name)
        return info

    def tasks(self) -> list[TaskInfo]:
        """Every task's record, by name."""
        return list(self._view.ordered)

    def task_page(self, start: int, size: int) -> tuple[Sequence[TaskInfo], int]:
        """The records of tasks start .. start + size - 1 by name, and how many
        tasks there are; costs the page, not the system."""
        ordered = self._view.ordered
        return ordered[start : start + size], len(ordered)

    def forget_task(self, name: str) -> None:
        """Undoes add_task of a task that never ran (its submit was not acknowledged)."""
        with self._lock:
            if name in self.system.tasks and name not in self.system.best:
                del self.system.tasks[name]
                self.system.populations.pop(name, None)
                self._data.pop(name, None)
                self._publish((name,))

    def delete_task(self, name: str) -> None:
        """Removes a task and what only it used; durable before it returns.

        Components other tasks lock stay (frozen tasks never change). A failed
        checkpoint undoes the removal and raises StorageError."""
        self._writable()
        with self._lock:
            if name not in self.system.tasks:
                raise NotFoundError("task", name)
            if self.system.tasks[name].status == TaskStatus.SEARCHING:
                raise FailedPreconditionError("TASK_BUSY", f"task {name!r} is being searched; cancel it first")
            before = self.system.snapshot()
            affected = self._sharing_with(name)
            for mapping in (self.system.tasks, self.system.best, self.system.damaged_best, self.system.populations):
                mapping.pop(name, None)
            self.system.unlock(name, keep=None)
            _, dropped = self.system.collect_garbage()
            try:
                self._write_checkpoint(self._extra())
            except Exception:
                self.system.revert(before)
                raise
            finally:
                self._publish(affected, sharing=True)  # after the commit (or the undo)
            self._stop_serving(self._served.pop(name, None))
            self._data.pop(name, None)
        logger.info("task %s deleted (%d components collected)", name, len(dropped))

    def requeued(self, task: str) -> None:
        """A search interrupted by shutdown runs again after the restart: a task
        without a model is PENDING, not FAILED."""
        with self._lock:
            record = self.system.tasks.get(task)
            if record is not None and record.status == TaskStatus.FAILED and task not in self.system.best:
                record.status, record.message = TaskStatus.PENDING, ""
                self._publish((task,))

    def check_storage(self) -> None:
        """Raises StorageError while the state disk is below its free-space reserve."""
        if self.state_dir:
            statedir.check_free_space(self.state_dir, self.options.min_free_bytes)

    def _task_data(self, task: str) -> TaskData:
        """The task's data, loaded on first use (in its search, never in a request)."""
        data = self._data.get(task)
        if data is None:
            with self._lock:
                spec = self.system.tasks[task].spec
            data = self._load(spec)  # outside the lock: loading may take minutes
            with self._lock:
                record = self.system.tasks.get(task)
                if record is None:
                    raise NotFoundError("task", task)
                record.num_classes, record.class_names = data.num_classes, tuple(data.class_names)
                record.examples = (len(data.train), len(data.validation))
                self._data[task] = data
                self._publish((task,))
        return data

    def _load(self, spec: TaskSpec) -> TaskData:
        config = self.system.config
        return load_task_data(
            spec, data_roots=self.options.data_roots, max_train_examples=self.options.max_train_examples,
            validation_split=ValidationSplit(config.validation_fraction, config.min_validation_examples),
            limits=self.options.data_limits,
        )

    # ---- searches ----------------------------------------------------------

    def run_search(
        self,
        task: str,
        kind: str = EXTENSION,
        *,
        cancel: threading.Event | None = None,
        on_event: EventCallback | None = None,
        seed: int | None = None,
    ) -> TaskInfo:
        """Runs one task iteration (extension or generalization search).

        Raises CancelledError when `cancel` is set between steps; the task's
        served path is then unchanged.
        """
        self._writable()
        emit = self._emitter(on_event)
        with self._lock:
            if task not in self.system.tasks:
                raise NotFoundError("task", task)
            record = self.system.tasks[task]
            if kind == GENERALIZATION and task not in self.system.best:
                raise FailedPreconditionError("TASK_NOT_READY", f"task {task!r} has no path to generalize yet")
            if kind == EXTENSION and task in self.system.best:
                kind = GENERALIZATION
            damaged_root = self.system.uses_damaged(self.system.root_path)
            if damaged_root:
                raise FailedPreconditionError(
                    "ROOT_DAMAGED", f"root component(s) {', '.join(damaged_root)} are damaged; restore their "
                    "files under the state directory and restart",
                )
            if kind == EXTENSION:
                record.status = TaskStatus.SEARCHING
                self._publish((task,))
            self._searches_run += 1
            seed = self.options.seed * 1_000_003 + self._searches_run if seed is None else seed
        try:
            data = self._task_data(task)
            if cancel is not None and cancel.is_set():
                raise CancelledError("cancelled while its data loaded")
            best = self._search(task, kind, data, seed=seed, cancel=cancel, emit=emit)
        except CancelledError:
            self._abandon_search(task, failed="cancelled before it had a model")
            emit(SearchFinished(task, "", 0.0, 0.0, 0.0, "CANCELLED", "cancelled"))
            raise
        except Exception as error:
            self._abandon_search(task, failed=f"{type(error).__name__}: {error}")
            emit(SearchFinished(task, "", 0.0, 0.0, 0.0, "FAILED", str(error)))
            raise
        finally:
            self._data.pop(task, None)  # a search's data lives as long as the search
        emit(SearchFinished(task, best.id, best.score or 0.0, best.quality or 0.0, best.test_accuracy or 0.0,
                            "SUCCEEDED"))
        return self.task(task)

    def _emitter(self, on_event: EventCallback | None) -> EventCallback:
        def emit(event: Event) -> None:
            for callback in (self._on_event, on_event):
                if callback is not None:
                    try:
                        callback(event)
                    except Exception:  # a broken listener must not break a search
                        logger.exception("event callback failed")

        return emit

    def _abandon_search(self, task: str, failed: str | None = None) -> None:
        with self._lock:
            record = self.system.tasks[task]
            if task in self.system.damaged_best:
                record.status = TaskStatus.DAMAGED
            elif task not in self.system.best:
                record.status = TaskStatus.FAILED if failed else TaskStatus.PENDING
                record.message = failed or ""
            keep = self.system.best_path(task)
            self.system.populations[task] = [keep.id] if keep else []
            self.system.collect_garbage()
            self._publish((task,))

    def search_plan(self, task: str, kind: str = EXTENSION) -> SearchPlan | None:
        """The budget a search of `task` will get; None while its data has
        never been loaded (the plan is then known when its search starts)."""
        with self._lock:
            if task not in self.system.tasks:
                raise NotFoundError("task", task)
            record = self.system.tasks[task]
            data = self._data.get(task)
            examples = (len(data.train), len(data.validation)) if data is not None else record.examples
        if not examples:
            return None
        return search_plan(
            self.system.config, record.spec.budget, kind=kind, train_examples=examples[0],
            validation_examples=examples[1], num_devices=len(self.devices),
        )

    def _search(
        self, task: str, kind: str, data: TaskData, *, seed: int, cancel: threading.Event | None,
        emit: EventCallback,
    ) -> Path:
        iteration = TaskIteration(
            self.system, _PublishingLock(self, task), task, data, self.search_plan(task, kind),
            seed=seed, devices=self.devices, emit=emit, cancel=cancel, priority=self.priority,
        )
        population = iteration.run()
        if iteration.probes:
            with self._lock:
                self.system.tasks[task].probes = tuple(iteration.probes)
                self._publish((task,))
        return self._finish(task, population, data, emit, ranked_on=iteration.plan.validation_examples)

    def _finish(
        self, task: str, population: list[Path], data: TaskData, emit: EventCallback, *, ranked_on: int,
    ) -> Path:
        """Keeps the single best path, locks it, checkpoints (DESIGN §3.6).

        Durable before visible: readers (GetTask, ListTasks) see the task
        READY, and Predict the new path, only once the checkpoint has
        committed; until then they read the view published before. A failed
        save (StorageError) undoes every change, so the task stays as it
        was, and republishes that. The path to serve is compiled
        first, outside the lock: once READY, its first Predict is fast.
        `ranked_on` is how many validation images the search ranked its
        candidates on (the plan's), which the final choice's margin needs."""
        if not population:
            raise RuntimeError("the search produced no path")
        best = self._final_choice(task, population, ranked_on)
        warmed = self._warm_up_path(task, best)
        with self._lock:
            before = self.system.snapshot()
            affected = self._sharing_with(task)
            previous = self.system.best_path(task)
            if previous is None or best.id != previous.id:
                replaced = previous or self.system.paths.get(self.system.damaged_best.get(task, ""))
                best.version = (replaced.version if replaced else 0) + 1
                best.test_accuracy = self._test_accuracy(task, best, data)
                self.system.best[task] = best.id
                self.system.damaged_best.pop(task, None)
                self.system.unlock(task, keep=best)
                self.system.lock(task, best)
            self.system.populations[task] = [best.id]
            record = self.system.tasks[task]
            record.status, record.message = TaskStatus.READY, ""
            self.system.collect_garbage()
            affected |= self._sharing_with(task)
            try:
                written = self._write_checkpoint(self._extra())
            except Exception:
                self.system.revert(before)
                raise
            finally:
                self._publish(affected, sharing=True)  # after the commit (or the undo)
            self._serve(task, warmed)
        if written is not None:
            emit(CheckpointWritten(task, written.step, self.state_dir, written.new_components))
        return best

    def _final_choice(self, task: str, population: list[Path], examples: int) -> Path:
        config = self.system.config
        chosen = selection.final_choice(population, examples, config.parsimony_z)
        top = selection.prune(population, 1)[0]
        if chosen is not top:
            logger.info("task %s: serving %s (validation %.4f, %.0f parameters) over the best %s (%.4f, %.0f): "
                        "within %.1f standard errors of %d validation images", task, chosen.id, chosen.quality,
                        chosen.accounted_params, top.id, top.quality, top.accounted_params, config.parsimony_z,
                        examples)
        return chosen

    def _structure(self, task: str, path: Path, system: System | None = None) -> PathStructure:
        system = system or self.system
        return structure_of(system.config, system.tasks[task].num_classes, path.hparams, list(path.components))

    def _test_accuracy(self, task: str, path: Path, data: TaskData) -> float:
        structure = self._structure(task, path)
        params = {name: self.system.components[cid].params for name, cid in path.components.items()}
        return loop.evaluate_accuracy({}, params, data.test, structure, self.system.config.eval_batch_size)

    # ---- serving -----------------------------------------------------------

    def _serve(self, task: str, warmed: ServedModel | None = None) -> None:
        """Serves the task's best path; `warmed` is that path already on the
        device (from the warm-up), taken with the version it got since."""
        path = self.system.best_path(task)
        if warmed is not None and warmed.path_id == path.id:
            served = dataclasses.replace(warmed, version=path.version)
        else:
            served = self._served_model(task, path)
        for key, params in zip(served.components, served.params.values()):
            self._on_device.setdefault(key, params)  # shared from now on
        self._device_users.update(served.components)
        self._stop_serving(self._served.get(task))
        self._served[task] = served

    def _stop_serving(self, served: ServedModel | None) -> None:
        """Forgets the device copies only `served` used (the model keeps its own
        references while a call runs it, so nothing in use is freed)."""
        if served is None:
            return
        self._device_users.subtract(served.components)
        for key in served.components:
            if self._device_users[key] <= 0:
                del self._device_users[key]
                self._on_device.pop(key, None)

    def _served_model(self, task: str, path: Path, system: System | None = None) -> ServedModel:
        """A path (of `system`, the engine's by default) on the serving device;
        its components already there (served by another path) are not
        uploaded again. New copies are shared once `_serve` serves the model
        (a warmed model never served leaves none)."""
        system = system or self.system
        structure = self._structure(task, path, system)
        keys = tuple((cid, system.components[cid].content_hash) for cid in path.components.values())
        params = {name: self._component_on_device(key, system) for name, key in zip(path.components, keys)}
        return ServedModel(path.id, path.version, structure, params, system.tasks[task].class_names, keys)

    def _component_on_device(self, key: tuple[str, str], system: System) -> Any:
        params = self._on_device.get(key)
        if params is None:
            params = jax.device_put(system.components[key[0]].params, self.devices[0])
        return params

    def warm_buckets(self) -> tuple[int, ...]:
        """The predict batch buckets a warm-up compiles: every one up to
        `warm_up_batch`, and those clients have used (since the system was
        created), within max_predict_batch."""
        limit = _bucket(self.options.max_predict_batch)
        up_to = self.options.warm_up_batch
        floor = {1 << i for i in range(_bucket(up_to).bit_length())} if up_to >= 1 else set()
        return tuple(sorted(b for b in floor | self._used_buckets if b <= limit))

    def warm_up(self, tasks: Sequence[str] | None = None, *, cancel: threading.Event | None = None) -> WarmUp:
        """Compiles (and runs once) every served path's predict step for the
        warm buckets, so that a restored system's first Predicts are as fast as
        later ones. Tasks of one structure share their programs; the persistent
        compilation cache makes a restart's warm-up a cache read. Stops early
        when `cancel` is set."""
        started = time.perf_counter()
        names = list(self._served) if tasks is None else [t for t in tasks if t in self._served]
        buckets, compiled = self.warm_buckets(), 0
        for task in names:
            served = self._served.get(task)
            if served is None:
                continue
            for bucket in buckets:
                if cancel is not None and cancel.is_set():
                    break
                compiled += self._warm_program(served, bucket)
        result = WarmUp(len(names), compiled, buckets, time.perf_counter() - started)
        logger.info("warm-up: %d task(s), %d new program(s) for batch buckets %s in %.1f s",
                    result.tasks, result.executables, list(buckets), result.seconds)
        return result

    # ---- a read-only replica ------------------------------------------------

    def _writable(self) -> None:
        if self.read_only:
            raise FailedPreconditionError("READ_ONLY", READ_ONLY_MESSAGE)

    def follow(self) -> bool:
        """A read-only engine's catch-up: when the state directory has a newer
        committed step than the one served, loads it (components already held
        are not read again), compiles the newly served paths, then swaps the
        system, the served paths and the read view at once. Returns whether
        it moved to a newer step. Writes nothing."""
        if not self.read_only:
            raise FailedPreconditionError("NOT_READ_ONLY", "follow() is for read-only engines")
        latest = checkpoint.latest_step(self.state_dir)
        if latest is None or latest <= self.checkpoint_step:
            return False
        restored = checkpoint.restore(self.state_dir, read_only=True, known=self.system.components)
        if restored is None or restored.step <= self.checkpoint_step:
            return False
        system = restored.system
        self._take_extra(restored.extra)  # first: newly served paths warm the buckets the writer saw used
        warmed = {}
        for task, path_id in system.best.items():  # outside the lock: compiling may take seconds
            served = self._warm_up_path(task, system.paths[path_id], system)
            if served is not None:
                warmed[task] = served
        with self._lock:
            self.system = system
            self.checkpoint_step = restored.step
            for task in [t for t in self._served if t not in system.best]:
                self._stop_serving(self._served.pop(task))
            for task, served in warmed.items():
                self._serve(task, served)
            self._publish(None, sharing=True)
        logger.info("following %s: step %d (%d task(s), %d newly served)", self.state_dir, restored.step,
                    len(system.tasks), len(warmed))
        return True

    def _warm_up_path(self, task: str, path: Path, system: System | None = None) -> ServedModel | None:
        """Compiles a path (of `system`, the engine's by default) for Predict
        before it serves (outside the lock); returns it on the device, or None
        when it is served already."""
        current = self._served.get(task)
        if current is not None and current.path_id == path.id:
            return None  # the served path stays: warm already
        with self._lock:
            served = self._served_model(task, path, system)
        started = time.perf_counter()
        compiled = sum(self._warm_program(served, bucket) for bucket in self.warm_buckets())
        logger.info("%s: path %s warmed for Predict (%d new program(s), %.1f s)", task, path.id, compiled,
                    time.perf_counter() - started)
        return served

    def _warm_program(self, served: ServedModel, bucket: int) -> int:
        """Compiles and runs the predict step once at this bucket unless its
        executable is in memory (an evicted one compiles again); returns 1 if it ran."""
        size = served.structure.image_size
        batch = jax.ShapeDtypeStruct((bucket, size, size, 3), np.float32,
                                     sharding=jax.sharding.SingleDeviceSharding(self.devices[0]))
        if steps.predict_probabilities.is_compiled(served.params, batch, structure=served.structure):
            return 0  # nothing allocated or uploaded for a warm program
        self._run_predict(served, np.zeros(batch.shape, batch.dtype)).block_until_ready()
        return 1

    def _run_predict(self, served: ServedModel, padded: np.ndarray) -> jax.Array:
        """The served path's probabilities of a padded batch: THE predict call,
        shared by Predict and the warm-up so both hit the same compiled program."""
        return steps.predict_probabilities(
            served.params, jax.device_put(padded, self.devices[0]), structure=served.structure
        )

    def predict(self, task: str, images: np.ndarray) -> Prediction:
        """Class probabilities of a task's served path.

        images: N x H x W x C (C = 1 or 3), uint8 in 0..255 or float in [0, 1].
        """
        served = self._served.get(task)  # one dict read: a consistent snapshot
        if served is None:
            with self._lock:
                record = self.system.tasks.get(task)
                if record is None:
                    raise NotFoundError("task", task)
                if record.status == TaskStatus.DAMAGED:
                    raise FailedPreconditionError("TASK_DAMAGED", f"task {task!r} is damaged: {record.message}")
            raise FailedPreconditionError("TASK_NOT_READY", f"task {task!r} has no trained path yet")
        batch = _as_uint8_images(images, self.options.max_predict_batch, self.options.data_limits.max_image_side)
        with self.priority.serving():  # a running search waits between its steps
            inputs = preprocess_eval(batch, served.structure.image_size)
            compute = functools.partial(self._predict_rows, served)
            if self.batcher is None:
                probabilities = compute(inputs)
            else:  # id(served): the batch's compute holds it, so no other model can share the id meanwhile
                probabilities = self.batcher.run((task, id(served)), inputs, compute)
        return Prediction(task, served.version, probabilities, served.class_names)

    def _predict_rows(self, served: ServedModel, inputs: np.ndarray) -> np.ndarray:
        """Probabilities of preprocessed inputs, padded to their batch bucket."""
        bucket = _bucket(len(inputs))
        self._used_buckets.add(bucket)  # warmed at the next restart or new path
        padded = np.zeros((bucket,) + inputs.shape[1:], np.float32)
        padded[: len(inputs)] = inputs
        return np.asarray(self._run_predict(served, padded))[: len(inputs)]

    # ---- checkpoints and inspection -----------------------------------------

    def save(self, *, extra: Mapping[str, Any] | None = None, emit: EventCallback | None = None,
             task: str = "") -> int:
        """Writes a checkpoint step under state_dir; returns the step (0 when no state_dir)."""
        if not self.state_dir:
            return 0
        extra = self._extra(extra)
        with self._lock:
            written = self._write_checkpoint(extra)
            self._publish(())  # the summary's checkpoint step
        if emit is not None:
            emit(CheckpointWritten(task, written.step, self.state_dir, written.new_components))
        return written.step

    def _extra(self, extra: Mapping[str, Any] | None = None) -> Mapping[str, Any] | None:
        if extra is None and self.state_dir and self.extra_state is not None:
            return self.extra_state()
        return extra

    def _write_checkpoint(self, extra: Mapping[str, Any] | None) -> checkpoint.Written | None:
        """Writes a checkpoint step (under the lock); None without a state_dir."""
        if not self.state_dir:
            return None
        self._writable()
        with self._lock:
            if extra is not None:
                self.restored_extra = dict(extra)
            saved_extra = {**self.restored_extra, PREDICT_BUCKETS_KEY: sorted(self._used_buckets.copy())}
            started = time.perf_counter()
            written = None
            try:
                written = checkpoint.save(self.system, self.state_dir, extra=saved_extra, store=self._store)
            finally:
                self._tell_checkpoint(written, time.perf_counter() - started)
            self.checkpoint_step = written.step
        return written

    def _tell_checkpoint(self, written: checkpoint.Written | None, seconds: float) -> None:
        """Calls `on_checkpoint`; a listener that fails is logged, never the
        save's failure (a committed step must not be undone for it)."""
        if self.on_checkpoint is None:
            return
        try:
            self.on_checkpoint(written, seconds)
        except Exception:
            logger.exception("the checkpoint listener failed (the checkpoint itself %s)",
                             "failed" if written is None else f"committed step {written.step}")

    def summary(self) -> SystemSummary:
        return self._view.summary  # no lock: the published view

    def refresh_views(self) -> None:
        """Rebuilds every published record; for callers (tests, tools) that
        changed `engine.system` directly rather than through the engine."""
        with self._lock:
            self._publish(None, sharing=True)

    # ---- the published read view (built under the lock) ---------------------

    def _publish(self, tasks: Collection[str] | None, *, sharing: bool = False) -> None:
        """Publishes a new read view with the records of `tasks` rebuilt (every
        task's when None) and the summary brought up to date; `sharing` when
        component locks changed. The caller holds the lock."""
        system, old = self.system, self._view
        if tasks is None or old is None:
            infos = {name: self._task_info(name) for name in system.tasks}
        else:
            infos = dict(old.infos)
            for name in tasks:
                if name in system.tasks:
                    infos[name] = self._task_info(name)
                else:
                    infos.pop(name, None)
        names = old.names if old is not None and infos.keys() == old.infos.keys() else tuple(sorted(infos))
        if sharing:
            self._sharing = types.MappingProxyType(_sharing(system))
        self._count_params()
        summary = SystemSummary(
            num_tasks=len(system.tasks),
            num_components=len(system.components),
            total_params=self._total_params,
            params_per_task=types.MappingProxyType({t: infos[t].accounted_params for t in system.best}),
            sharing=self._sharing,
            checkpoint_step=self.checkpoint_step,
            root_description=system.root_description,
            config_name=system.config.name,
            damaged_tasks=tuple(sorted(system.damaged_best)),
        )
        self._view = _ReadView(types.MappingProxyType(infos), names, tuple(map(infos.__getitem__, names)), summary)

    def _count_params(self) -> None:
        """Brings the total parameter count up to date with the components
        added and dropped since the last view (key-set differences, no walk
        of every component's parameters)."""
        counts, components = self._param_counts, self.system.components
        if counts.keys() == components.keys():
            return
        for component_id in counts.keys() - components.keys():
            self._total_params -= counts.pop(component_id)
        for component_id in components.keys() - counts.keys():
            counts[component_id] = components[component_id].num_params
            self._total_params += counts[component_id]

    def _sharing_with(self, task: str) -> set[str]:
        """The task and every task locking a component it locks: the records
        whose accounted parameters and sharing change when its locks do."""
        lockers = {task}
        for component in self.system.components.values():
            if task in component.locked_by:
                lockers |= component.locked_by
        return lockers & self.system.tasks.keys() | {task}

    def _accounted_params(self, task: str) -> float:
        """The served path's parameters with sharing as it stands now."""
        return scoring.accounted_params(self.system.path_components(self.system.best_path(task)), task)

    def _task_info(self, name: str) -> TaskInfo:
        record = self.system.tasks[name]
        info = TaskInfo(
            name=name, status=record.status.value, spec=record.spec, num_classes=record.num_classes,
            class_names=record.class_names, message=record.message, probes=record.probes,
        )
        path = self.system.best_path(name)
        if path is None:
            return info
        components = tuple(
            ComponentInfo(c.name, c.id, tuple(sorted(c.locked_by)), c.num_params)
            for c in self.system.path_components(path)
        )
        path_params = sum(c.params for c in components)
        return dataclasses.replace(
            info, best_score=path.score, validation_accuracy=path.quality, test_accuracy=path.test_accuracy,
            params=path_params, path_params=path_params, accounted_params=self._accounted_params(name),
            own_params=sum(c.params for c in components if c.locked_by == (name,)),
            flops=path.flops or 0.0, path_version=path.version, components=components,
            shares_with=tuple(self.system.tasks_sharing(name)),
            hparams=types.MappingProxyType(dict(path.hparams)),  # shared by every reader: read-only
        )


class _PublishingLock:
    """The engine's lock as a search's iteration takes it: what the iteration
    changed under it (its task's served path re-scored, candidates adopted,
    components collected) is published before the lock is released."""

    def __init__(self, engine: Engine, task: str):
        self._engine, self._task = engine, task

    def __enter__(self) -> None:
        self._engine._lock.acquire()

    def __exit__(self, *exc_info: object) -> None:
        try:
            self._engine._publish((self._task,))
        finally:
            self._engine._lock.release()


def _sharing(system: System) -> dict[tuple[str, str], int]:
    """(task a, task b) -> the components both lock, a < b."""
    sharing: dict[tuple[str, str], int] = {}
    for component in system.components.values():
        lockers = sorted(component.locked_by)
        for i, a in enumerate(lockers):
            for b in lockers[i + 1 :]:
                sharing[(a, b)] = sharing.get((a, b), 0) + 1
    return sharing


def _bucket(n: int) -> int:
    """Pads predict batches to powers of two so a few executables serve all sizes."""
    return 1 << max(n - 1, 0).bit_length()


def _as_uint8_images(images: np.ndarray, max_batch: int, max_side: int) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4:
        raise InvalidArgumentError("inputs.shape", f"expected N x H x W x C images, got shape {images.shape}")
    if images.shape[0] == 0:
        raise InvalidArgumentError("inputs.shape", "the batch is empty")
    if images.shape[0] > max_batch:
        raise ResourceExhaustedError(f"batch of {images.shape[0]} images exceeds the limit of {max_batch}")
    if images.shape[-1] not in (1, 3):
        raise InvalidArgumentError("inputs.shape", f"expected 1 or 3 channels, got {images.shape[-1]}")
    if min(images.shape[1:3]) < 1 or max(images.shape[1:3]) > max_side:
        raise InvalidArgumentError("inputs.shape", f"image sides must be 1..{max_side}, got {images.shape[1:3]}")
    if images.dtype == np.uint8:
        pass
    elif np.issubdtype(images.dtype, np.floating):
        if not np.all(np.isfinite(images)) or images.min() < 0.0 or images.max() > 1.0:
            raise InvalidArgumentError("inputs.contents", "float images must be finite and within [0, 1]")
        images = np.round(images.astype(np.float32) * 255.0).astype(np.uint8)
    else:
        raise InvalidArgumentError("inputs.datatype", f"expected uint8 or float images, got {images.dtype}")
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    return images
