"""A read-only engine (issue 13, serving replicas): it serves what another
process commits under a state directory, bit-identically, catches up with
newer steps (`follow`), refuses every change, and never writes a file there."""

from __future__ import annotations

import os

import numpy as np
import pytest

from evolve.data import bundled_task_specs
from evolve.data.bundled import _digits
from evolve.engine import Engine, EngineOptions
from evolve.errors import FailedPreconditionError
from tests.conftest import tiny_config


def _files(state_dir: str) -> dict[str, tuple[int, int]]:
    """Every file and directory under the state directory: (size, mtime in ns)."""
    found = {}
    for root, dirs, files in os.walk(state_dir):
        for name in dirs + files:
            path = os.path.join(root, name)
            status = os.stat(path)
            found[os.path.relpath(path, state_dir)] = (status.st_size if name in files else 0, status.st_mtime_ns)
    return found


@pytest.fixture
def images():
    return _digits()[0][:5]


def test_a_read_only_engine_serves_follows_and_never_writes(tmp_path, images):
    state_dir = str(tmp_path / "state")
    writer = Engine.create(tiny_config(generations=1, candidates_per_generation=1), state_dir=state_dir,
                           options=EngineOptions(seed=1))
    first, second = bundled_task_specs()[:2]
    writer.add_task(first)
    writer.run_search(first.name)

    before = _files(state_dir)
    replica = Engine.restore(state_dir, read_only=True)
    assert replica.read_only and replica.checkpoint_step == writer.checkpoint_step
    np.testing.assert_array_equal(replica.predict(first.name, images).probabilities,
                                  writer.predict(first.name, images).probabilities)
    assert replica.task(first.name) == writer.task(first.name)
    assert replica.follow() is False  # nothing newer yet

    for change in (lambda: replica.add_task(second), lambda: replica.run_search(first.name),
                   lambda: replica.delete_task(first.name), lambda: replica.save()):
        with pytest.raises(FailedPreconditionError, match="read-only replica"):
            change()
    assert _files(state_dir) == before, "the read-only engine changed the state directory"

    served_first = replica._served[first.name]
    components_before = dict(replica.system.components)
    writer.add_task(second)
    writer.run_search(second.name)
    after_writer = _files(state_dir)
    assert replica.follow() is True
    assert replica.checkpoint_step == writer.checkpoint_step
    assert _files(state_dir) == after_writer, "following changed the state directory"
    for task in (first.name, second.name):
        np.testing.assert_array_equal(replica.predict(task, images).probabilities,
                                      writer.predict(task, images).probabilities)
        assert replica.task(task) == writer.task(task)
    assert replica.summary() == writer.summary()
    assert replica._served[first.name] is served_first  # its path did not change: served as it was
    for component_id, component in replica.system.components.items():
        if component_id in components_before:  # held already: not read again
            assert component.params is components_before[component_id].params

    writer.delete_task(first.name)
    assert replica.follow() is True
    assert [info.name for info in replica.tasks()] == [second.name]
    with pytest.raises(Exception, match=first.name):
        replica.predict(first.name, images)


def test_follow_is_for_read_only_engines(tmp_path):
    engine = Engine.create(tiny_config(), state_dir=str(tmp_path / "state"))
    with pytest.raises(FailedPreconditionError, match="read-only"):
        engine.follow()
