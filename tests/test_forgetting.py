"""No forgetting: task 1's predictions stay bit-identical after five more
tasks (bundled and local .npz) and a generalization search of another task."""

from __future__ import annotations

import numpy as np

from evolve.data import load_task_data, write_npz_task
from evolve.engine import Engine, EngineOptions
from evolve.types import BundledSource, NpzSource, TaskSpec, params_hash
from tests.conftest import tiny_config


def _npz_tasks(tmp_path):
    """Three extra tasks from digits images with other label semantics."""
    digits = load_task_data(TaskSpec("digits", BundledSource("digits")))
    relabel = {
        "digits_mod3": lambda y: y % 3,
        "digits_small": lambda y: (y < 5).astype(np.int32),
        "digits_mod4_flipud": lambda y: y % 4,
    }
    specs = []
    for name, fn in relabel.items():
        flip = name.endswith("flipud")
        images = lambda s: s.images[:, ::-1] if flip else s.images  # noqa: E731
        path = tmp_path / f"{name}.npz"
        write_npz_task(
            str(path), images(digits.train), fn(digits.train.labels),
            validation_images=images(digits.validation), validation_labels=fn(digits.validation.labels),
            test_images=images(digits.test), test_labels=fn(digits.test.labels),
        )
        specs.append(TaskSpec(name, NpzSource(str(path))))
    return specs


def test_first_task_is_never_forgotten(tmp_path):
    engine = Engine.create(tiny_config(generations=1), options=EngineOptions(seed=11))
    probe = np.random.default_rng(0).integers(0, 256, size=(32, 8, 8, 3), dtype=np.uint8)
    specs = [TaskSpec(n, BundledSource(n)) for n in ("digits", "digits_parity", "digits_loops")]
    specs += _npz_tasks(tmp_path)
    engine.add_task(specs[0])
    engine.run_search(specs[0].name)
    first = engine.predict("digits", probe).probabilities
    first_components = {
        cid: params_hash(engine.system.components[cid].params)
        for cid in engine.system.best_path("digits").components.values()
    }
    for spec in specs[1:]:
        engine.add_task(spec)
        engine.run_search(spec.name)
        np.testing.assert_array_equal(engine.predict("digits", probe).probabilities, first)
    engine.run_search("digits_parity", "generalization")
    np.testing.assert_array_equal(engine.predict("digits", probe).probabilities, first)
    assert len(engine.system.best) == 6
    for cid, digest in first_components.items():
        assert params_hash(engine.system.components[cid].params) == digest
