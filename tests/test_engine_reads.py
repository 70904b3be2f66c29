"""Whole-system reads (issue 12): GetTask, ListTasks and GetSystem read a
published view, never the engine's lock, and a ListTasks page costs the page.

The view is republished by every change a record shows; these tests compare
it with the records computed afresh from the System (the code the reads ran
before the view) after real operations and in the middle of real searches.
"""

from __future__ import annotations

import dataclasses
import threading

import pytest

from evolve import engine as engine_module
from evolve.data import bundled_task_specs
from evolve.engine import Engine, EngineOptions, SystemSummary, TaskInfo
from evolve.errors import CancelledError, NotFoundError, StorageError
from evolve.events import CandidateAccepted, CandidateScored, CheckpointWritten, GenerationStarted, SearchStarted
from evolve.search import scoring
from evolve.types import BundledSource, Path, SearchBudget, TaskSpec
from tests.conftest import tiny_config

READ_TIMEOUT = 30  # seconds; a read that waited on the lock would wait until the holder lets go


def _fresh_infos(engine: Engine) -> list[TaskInfo]:
    with engine._lock:
        return [engine._task_info(name) for name in sorted(engine.system.tasks)]


def _fresh_summary(engine: Engine) -> SystemSummary:
    """GetSystem's answer as it was computed before the view: from the whole System."""
    with engine._lock:
        system = engine.system
        return SystemSummary(
            num_tasks=len(system.tasks),
            num_components=len(system.components),
            total_params=sum(c.num_params for c in system.components.values()),
            params_per_task={
                t: scoring.accounted_params(system.path_components(system.best_path(t)), t) for t in system.best
            },
            sharing=engine_module._sharing(system),  # computed now; the view holds what it computed last
            checkpoint_step=engine.checkpoint_step,
            root_description=system.root_description,
            config_name=system.config.name,
            damaged_tasks=tuple(sorted(system.damaged_best)),
        )


def _assert_published_is_fresh(engine: Engine) -> None:
    with engine._lock:  # nothing changes while the two are compared
        expected = _fresh_infos(engine)
        assert engine.tasks() == expected
        for info in expected:
            assert engine.task(info.name) == info
        page, total = engine.task_page(1, 2)
        assert (list(page), total) == (expected[1:3], len(expected))
        summary = engine.summary()
        assert summary == _fresh_summary(engine)
        assert dict(summary.params_per_task) == {i.name: i.accounted_params for i in expected if i.path_version}


def _reads_finish_elsewhere(engine: Engine, name: str) -> bool:
    """Runs every read in another thread; False if any waited READ_TIMEOUT."""
    done = threading.Event()

    def read() -> None:
        engine.task(name)
        engine.tasks()
        engine.task_page(0, 1)
        engine.summary()
        done.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(READ_TIMEOUT)
    return done.is_set()


def _serve_shared_body(engine: Engine, task: str, body_of: str) -> None:
    """Ends a search of `task` (Engine._finish, the real end of a search) with
    the path `body_of` serves, its head replaced by the one `task` serves."""
    body, own = engine.system.best_path(body_of), engine.system.best_path(task)
    components = {**body.components, "head": own.components["head"]}
    path = Path(id=engine.system.new_id("p"), task=task, components=components, hparams=dict(body.hparams),
                parent_id=own.id, score=own.score, quality=own.quality, flops=own.flops)
    with engine._lock:
        engine.system.paths[path.id] = path  # adopted into the population, as a search's candidates are
    data = engine._task_data(task)
    try:
        engine._finish(task, [path], data, engine._emitter(None), ranked_on=len(data.validation))
    finally:
        engine._data.pop(task, None)


def test_published_views_equal_fresh_ones_through_real_operations(tmp_path, monkeypatch):
    state_dir = str(tmp_path / "state")
    engine = Engine.create(tiny_config(generations=1, candidates_per_generation=1), state_dir=state_dir,
                           options=EngineOptions(seed=3))
    first, second, third = bundled_task_specs()[:3]
    first = dataclasses.replace(first, budget=SearchBudget(generations=2))  # a view mid-search after an adopt
    _assert_published_is_fresh(engine)

    checked, reads_during_lock = [], []

    def on_event(event) -> None:
        """In the search's thread: outside the lock, the view must already show
        what the search changed; inside it (CandidateScored), reads still return."""
        if isinstance(event, (SearchStarted, GenerationStarted, CandidateAccepted, CheckpointWritten)):
            _assert_published_is_fresh(engine)
            checked.append(type(event).__name__)
        elif isinstance(event, CandidateScored) and not reads_during_lock:
            assert engine._lock._is_owned()  # emitted by the iteration under the engine's lock
            reads_during_lock.append(_reads_finish_elsewhere(engine, event.task))

    for spec in (first, second):
        engine.add_task(spec)
        _assert_published_is_fresh(engine)
    engine.run_search(first.name, on_event=on_event)
    _assert_published_is_fresh(engine)
    engine.run_search(second.name, on_event=on_event)  # probes the first: may share (and re-charge) it
    _assert_published_is_fresh(engine)
    assert {"SearchStarted", "GenerationStarted", "CandidateAccepted", "CheckpointWritten"} <= set(checked)
    assert reads_during_lock == [True]

    engine.run_search(first.name, "generalization", on_event=on_event)  # re-scores the served path first
    _assert_published_is_fresh(engine)

    # The second task comes to serve the first's body with its own head, as a
    # search that freezes the first's components would: the first's charged
    # parameters, sharing and components' lockers change with it.
    _serve_shared_body(engine, second.name, first.name)
    assert first.name in engine.task(second.name).shares_with
    assert second.name in engine.task(first.name).shares_with
    _assert_published_is_fresh(engine)

    engine.add_task(third)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(CancelledError):
        engine.run_search(third.name, cancel=cancel)
    assert engine.task(third.name).status == "FAILED"
    _assert_published_is_fresh(engine)
    engine.requeued(third.name)
    assert engine.task(third.name).status == "PENDING"
    _assert_published_is_fresh(engine)
    engine.forget_task(third.name)
    with pytest.raises(NotFoundError):
        engine.task(third.name)
    _assert_published_is_fresh(engine)

    # A delete whose checkpoint fails is undone, and so is what readers see.
    before = engine.tasks()

    def failing_save(*args, **kwargs):
        raise StorageError(state_dir, "disk full", disk_full=True)

    monkeypatch.setattr(engine_module.checkpoint, "save", failing_save)
    with pytest.raises(StorageError):
        engine.delete_task(second.name)
    assert engine.tasks() == before
    _assert_published_is_fresh(engine)
    monkeypatch.undo()

    engine.delete_task(second.name)
    _assert_published_is_fresh(engine)
    assert [i.name for i in engine.tasks()] == [first.name]
    step = engine.checkpoint_step
    assert engine.save() == step + 1 == engine.summary().checkpoint_step
    _assert_published_is_fresh(engine)

    restored = Engine.restore(state_dir)
    _assert_published_is_fresh(restored)
    assert restored.tasks() == engine.tasks()


def test_reads_do_not_wait_on_the_engine_lock():
    engine = Engine.create(tiny_config())
    for name in ("a", "b"):
        engine.add_task(TaskSpec(name, BundledSource("digits")))
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with engine._lock:  # as a search's adopt step or an end-of-search save holds it
            held.set()
            release.wait(READ_TIMEOUT * 2)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert held.wait(READ_TIMEOUT)
    try:
        assert _reads_finish_elsewhere(engine, "a"), "a read waited on the engine lock"
    finally:
        release.set()
        holder.join()


def test_a_list_tasks_page_builds_only_its_records(monkeypatch):
    from service import converters
    from service.gen.evolve.v1 import evolve_pb2
    from service.servicers import Backend, EvolutionServicer

    engine = Engine.create(tiny_config())
    records = {"built": 0, "converted": 0, "sharing": 0}

    def counting(key, function):
        def counted(*args, **kwargs):
            records[key] += 1
            return function(*args, **kwargs)

        return counted

    monkeypatch.setattr(Engine, "_task_info", counting("built", Engine._task_info))
    monkeypatch.setattr(converters, "task_to_proto", counting("converted", converters.task_to_proto))
    monkeypatch.setattr(engine_module, "_sharing", counting("sharing", engine_module._sharing))
    tasks = 120
    for i in range(tasks):
        engine.add_task(TaskSpec(f"t{i:03d}", BundledSource("digits")))
    assert records["built"] == tasks  # one record per added task, none of the others rebuilt
    backend = Backend()
    backend.attach(engine, None, None)
    servicer = EvolutionServicer(backend)

    records.update(built=0, converted=0)
    response = servicer.ListTasks(evolve_pb2.ListTasksRequest(page_size=10, page_token="o50"), None)
    assert [t.name for t in response.tasks] == [f"t{i:03d}" for i in range(50, 60)]
    assert response.next_page_token == "o60"
    assert records == {"built": 0, "converted": 10, "sharing": 0}  # O(page), not O(tasks)

    names, token, pages = [], "", 0
    while True:
        response = servicer.ListTasks(evolve_pb2.ListTasksRequest(page_size=50, page_token=token), None)
        names += [t.name for t in response.tasks]
        pages += 1
        token = response.next_page_token
        if not token:
            break
    assert names == [f"t{i:03d}" for i in range(tasks)] and pages == 3
    assert records["built"] == 0 and records["converted"] == 10 + tasks

    records.update(converted=0)
    servicer.GetTask(evolve_pb2.GetTaskRequest(name="t007"), None)
    summary = servicer.GetSystem(evolve_pb2.GetSystemRequest(), None)
    assert summary.num_tasks == tasks
    assert records == {"built": 0, "converted": 1, "sharing": 0}
