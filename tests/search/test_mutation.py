"""Mutation rules of DESIGN §3.2 on hand-built systems."""

from __future__ import annotations

import numpy as np

from evolve.config import MU_VALUES
from evolve.engine import Engine
from evolve.search import mutation
from evolve.types import ROOT_TASK, Path
from tests.conftest import tiny_config


def _engine(**overrides):
    return Engine.create(tiny_config(**overrides))


def _with_mu(path: Path, mu: float) -> Path:
    hparams = dict(path.hparams, _mu_=mu)
    return Path(id=path.id, task=path.task, components=dict(path.components), hparams=hparams,
                parent_id=path.parent_id)


def _mutate(engine, parent, task, seed):
    return mutation.mutate(
        parent, task, lineage=engine.system.lineage(parent),
        component=engine.system.components.__getitem__, config=engine.system.config,
        rng=np.random.default_rng(seed),
    )


def test_random_root_components_are_always_cloned_and_head_is_new():
    engine = _engine()
    root = _with_mu(engine.system.root_path, 0.0)
    draft = _mutate(engine, root, "t", 0)
    assert draft.sources["head"].mode == "new"
    for name, source in draft.sources.items():
        if name != "head":
            assert source.mode == "train", name


def test_trained_components_locked_by_others_are_frozen_without_clone():
    engine = _engine()
    for component in engine.system.components.values():
        component.trained = True  # as a pretrained root would be
    root = _with_mu(engine.system.root_path, 0.0)
    draft = _mutate(engine, root, "t", 0)
    modes = {name: s.mode for name, s in draft.sources.items()}
    assert modes["encoder_norm"] == "train"  # always cloned
    assert modes["encoderblock_0"] == "frozen" and modes["embedding"] == "frozen"
    assert draft.mutations == []


def test_clone_fires_with_high_mu():
    engine = _engine()
    for component in engine.system.components.values():
        component.trained = True
    root = engine.system.root_path
    root.hparams.update({f"_mu_|clone:encoderblock_{i}": 0.3 for i in range(2)})
    root = _with_mu(root, 0.3)
    root.hparams.update({f"_mu_|clone:encoderblock_{i}": 0.3 for i in range(2)})
    clones = 0
    for seed in range(60):
        draft = _mutate(engine, root, "t", seed)
        clones += sum(m.startswith("clone:") for m in draft.mutations)
    assert 10 < clones < 120


def test_learned_mu_moves_one_grid_step():
    rng = np.random.default_rng(0)
    for _ in range(200):
        hparams = {"_mu_": 0.3, "_mu_|x": 0.1}
        mutation.action_fires(hparams, "x", rng)
        assert hparams["_mu_|x"] in MU_VALUES
        assert abs(MU_VALUES.index(hparams["_mu_|x"]) - MU_VALUES.index(0.1)) <= 1


def test_layer_growth_beyond_root_gets_new_block():
    engine = _engine(max_layers=3)
    root = engine.system.root_path
    grown = None
    for seed in range(200):
        parent = _with_mu(root, 0.3)
        parent.hparams["_mu_|hp:num_layers"] = 0.3
        draft = _mutate(engine, parent, "t", seed)
        if "encoderblock_2" in draft.sources:
            grown = draft
            break
    assert grown is not None
    assert grown.sources["encoderblock_2"].mode == "new"
    assert "hp:num_layers=3" in grown.mutations


def test_dropping_a_block_drops_its_adapter():
    engine = _engine()
    root = engine.system.root_path
    path = Path(id="x", task="t", components=dict(root.components), hparams=dict(root.hparams, _mu_=0.3),
                parent_id=root.id)
    path.components["residual_adapter_1"] = root.components["encoderblock_1"]  # any id; only names matter
    path.hparams["_mu_|hp:num_layers"] = 0.3
    for seed in range(300):
        draft = _mutate(engine, path, "t", seed)
        if "hp:num_layers=1" in draft.mutations:
            assert "residual_adapter_1" not in draft.sources and "encoderblock_1" not in draft.sources
            return
    raise AssertionError("never dropped a block")


def test_hparam_mutation_stays_on_grid():
    engine = _engine()
    grids = engine.system.config.hparam_grids()
    parent = _with_mu(engine.system.root_path, 0.3)
    for seed in range(50):
        draft = _mutate(engine, parent, "t", seed)
        for name, grid in grids.items():
            assert draft.hparams[name] in grid, name


def test_data_hparams_are_sampled_from_base():
    config = tiny_config()
    base = dict(config.default_hparams(), _mu_=0.3)
    sampled = mutation.sample_data_hparams(base, config, np.random.default_rng(0))
    assert set(k for k in sampled if not k.startswith("_mu_")) == set(
        ["crop_area", "crop_aspect", "flip", "brightness", "contrast", "saturation", "hue", "jpeg_quality"]
    )


def test_resolve_walks_ancestor_chain():
    root = Path(id="r", task=ROOT_TASK, components={"a": "c1", "b": "c2"}, hparams={})
    middle = Path(id="m", task="t", components={"a": "c3"}, hparams={}, parent_id="r")
    child = Path(id="c", task="t", components={}, hparams={}, parent_id="m")
    assert mutation.resolve("a", [child, middle, root]) == "c3"
    assert mutation.resolve("b", [child, middle, root]) == "c2"
    assert mutation.resolve("z", [child, middle, root]) is None
