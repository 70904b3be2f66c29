"""Served paths share their common components on the device (issue 12:
memory per task): a component many tasks serve (the root's, a frozen body) is
uploaded once, and its copy is dropped when no served path uses it."""

from __future__ import annotations

import numpy as np

from evolve.engine import Engine
from evolve.system import TaskRecord, TaskStatus
from evolve.types import BundledSource, Component, Path, TaskSpec
from tests.conftest import tiny_config


def _add_task_with_own_head(engine: Engine, name: str, seed: int) -> None:
    """A READY task serving the root's body with a head of its own."""
    system = engine.system
    rng = np.random.default_rng(seed)
    width = system.config.size.hidden_size
    head = {"kernel": rng.normal(0, 0.5, (width, 10)).astype(np.float32), "bias": np.zeros((10,), np.float32)}
    component = Component(system.new_id("c"), "head", head, origin=name, trained=True)
    system.components[component.id] = component
    names = {**system.root_path.components, "head": component.id}
    path = Path(system.new_id("p"), name, names, dict(system.root_path.hparams))
    system.paths[path.id] = path
    system.tasks[name] = TaskRecord(TaskSpec(name, BundledSource("digits")), TaskStatus.READY, 10)
    system.best[name] = path.id
    system.populations[name] = [path.id]
    system.lock(name, path)


def test_tasks_sharing_the_root_hold_one_device_copy_of_it(tmp_path):
    state_dir = str(tmp_path / "state")
    built = Engine.create(tiny_config(), state_dir=state_dir)
    for i in range(3):
        _add_task_with_own_head(built, f"t{i}", seed=i)
    built.refresh_views()
    built.save()

    engine = Engine.restore(state_dir)
    served = {t: engine._served[t] for t in ("t0", "t1", "t2")}
    body = [n for n in served["t0"].params if n != "head"]
    for name in body:  # the very same device arrays, not three uploads
        assert served["t0"].params[name] is served["t1"].params[name] is served["t2"].params[name]
    assert served["t0"].params["head"] is not served["t1"].params["head"]
    assert len(engine._on_device) == len(body) + 3
    engine._served_model("t0", engine.system.best_path("t0"))  # as a warm-up does, never served
    assert len(engine._on_device) == len(body) + 3

    # What it serves is what the stored parameters compute.
    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3)).astype(np.uint8)
    for task in served:
        fresh = Engine.restore(state_dir)
        fresh._on_device.clear()  # no sharing: each component uploaded for this task alone
        fresh._served[task] = fresh._served_model(task, fresh.system.best_path(task))
        np.testing.assert_array_equal(engine.predict(task, images).probabilities,
                                      fresh.predict(task, images).probabilities)

    engine.delete_task("t1")  # its head's copy goes; the body stays for the others
    assert len(engine._on_device) == len(body) + 2
    assert engine._served["t0"].params[body[0]] is engine._served["t2"].params[body[0]]
    for task in ("t0", "t2"):
        engine.delete_task(task)
    assert engine._on_device == {} and not engine._device_users
