"""The rules of one task iteration (DESIGN §3, §3b), each on a hand-built system."""

from __future__ import annotations

import dataclasses
import math
import threading

import numpy as np
import pytest

from evolve.data import ImageSet, TaskData
from evolve.data.arrays import ValidationSplit
from evolve.engine import Engine
from evolve.events import CandidateScored, GenerationStarted
from evolve.search import iteration, probe
from evolve.search.budget import EXTENSION, GENERALIZATION, search_plan
from evolve.system import TaskRecord
from evolve.types import ROOT_TASK, BundledSource, Component, ParentProbe, Path, SearchBudget, TaskSpec
from tests.conftest import tiny_config


def _engine(**overrides) -> Engine:
    engine = Engine.create(tiny_config(**overrides))
    engine.system.tasks["t"] = TaskRecord(spec=TaskSpec("t", BundledSource("digits")), num_classes=3)
    return engine


def _data(n=64, classes=3, seed=0) -> TaskData:
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % classes).astype(np.int32)
    images = rng.integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8)
    split = ImageSet(images, labels)
    return TaskData(split, split, split, classes)


def _iteration(engine: Engine, data: TaskData | None = None, **budget) -> iteration.TaskIteration:
    data = data or _data()
    plan = search_plan(engine.system.config, SearchBudget(**budget), kind=EXTENSION,
                       train_examples=len(data.train), validation_examples=len(data.validation))
    return iteration.TaskIteration(engine.system, threading.RLock(), "t", data, plan, seed=0,
                                   devices=engine.devices, emit=lambda event: None)


def _own_path(engine: Engine, pid: str, score: float, **hparams) -> Path:
    root = engine.system.root_path
    path = Path(id=pid, task="t", components=dict(root.components), hparams=dict(root.hparams, **hparams),
                parent_id=root.id, score=score, quality=score)
    engine.system.paths[pid] = path
    return path


# ---- §3.1 parent selection --------------------------------------------------


def test_a_child_must_reach_its_same_task_parents_score_and_no_other():
    own = Path("p", "t", {}, {}, score=0.7)
    other = Path("q", "u", {}, {}, score=0.9)
    assert iteration.parent_start_score(own, "t") == 0.7
    assert iteration.parent_start_score(other, "t") == -math.inf
    assert iteration.parent_start_score(Path("r", "t", {}, {}), "t") == -math.inf


def test_children_are_counted_on_the_tasks_own_paths_only():
    engine = _engine()
    run = _iteration(engine)
    root = engine.system.root_path
    own = _own_path(engine, "own", 0.5)
    data_hparams = iteration.generation_data_hparams([], engine.system.config, np.random.default_rng(0))
    rng = np.random.default_rng(0)
    run._draft([], data_hparams, rng, parent_id=root.id)
    run._draft([own], data_hparams, rng, parent_id=own.id)
    assert root.children == 0
    assert own.children == 1


def test_uniform_fallback_includes_the_tasks_own_population():
    engine = _engine()
    own = _own_path(engine, "own", 0.5)
    engine.system.populations["t"] = [own.id]
    fallback = {p.id for p in engine.system.selectable_paths("t")}
    assert fallback == {engine.system.root_path_id, own.id}
    assert own.id not in {p.id for p in engine.system.selectable_paths()}


# ---- §3.2 ancestry ---------------------------------------------------------------


def test_a_dropped_block_survives_its_ancestors_garbage_collection():
    engine = _engine()
    system = engine.system
    root = system.root_path
    block = Component("c-mine", "encoderblock_1", system.components[root.components["encoderblock_1"]].params,
                      origin="t")
    system.components[block.id] = block
    deep = _own_path(engine, "deep", 0.5)
    deep.components["encoderblock_1"] = block.id
    shallow_components = {n: c for n, c in deep.components.items() if n != "encoderblock_1"}
    shallow = Path("shallow", "t", shallow_components, dict(deep.hparams), parent_id=deep.id, score=0.6,
                   inherited={"encoderblock_1": block.id})
    system.paths[shallow.id] = shallow
    system.populations["t"] = [shallow.id]  # `deep` is now only an ancestor
    system.collect_garbage()
    assert deep.id not in system.paths and block.id in system.components
    from evolve.search import mutation

    assert mutation.resolve("encoderblock_1", system.lineage(shallow)) == block.id


def test_mutation_records_the_blocks_a_shallower_child_inherits():
    engine = _engine()
    root = engine.system.root_path
    parent = Path("x", "t", dict(root.components), dict(root.hparams, _mu_=0.3, **{"_mu_|hp:num_layers": 0.3}),
                  parent_id=root.id)
    from evolve.search import mutation

    for seed in range(300):
        draft = mutation.mutate(parent, "t", lineage=[parent, root], component=engine.system.components.__getitem__,
                                config=engine.system.config, rng=np.random.default_rng(seed))
        if "hp:num_layers=1" in draft.mutations:
            assert draft.inherited == {"encoderblock_1": root.components["encoderblock_1"]}
            return
    raise AssertionError("never dropped a block")


# ---- §3b augmentation that runs ------------------------------------------------------


def test_data_hparams_start_from_the_live_populations_best_path():
    engine = _engine()
    config = engine.system.config
    quiet = {f"_mu_|hp:{n}": 0.0 for n in ("crop_area", "flip", "brightness")}
    best = _own_path(engine, "best", 0.9, crop_area=0.5, flip=True, _mu_=0.0, **quiet)
    worse = _own_path(engine, "worse", 0.3, crop_area=0.95, _mu_=0.0, **quiet)
    sampled = iteration.generation_data_hparams([worse, best], config, np.random.default_rng(0))
    assert (sampled["crop_area"], sampled["flip"]) == (0.5, True)
    defaults = iteration.generation_data_hparams([], config, np.random.default_rng(0))
    assert defaults["crop_area"] == config.default_hparams()["crop_area"] or defaults["_mu_|hp:crop_area"] > 0


# ---- §3.4 planning -------------------------------------------------------------------


def test_a_component_that_does_not_fit_the_structure_is_an_error():
    engine = _engine()
    root = engine.system.root_path
    block = engine.system.components[root.components["encoderblock_0"]]
    with pytest.raises(ValueError, match="encoderblock_0"):
        iteration.check_shapes(block, block.params, {"kernel": np.zeros((1, 1))})


def test_planning_freezes_shared_components_and_counts_their_share():
    engine, run, root, data_hparams = _pretrained_root_iteration()
    draft = run._draft([], data_hparams, np.random.default_rng(0), parent_id=root.id)
    planned = run._plan(draft, np.random.default_rng(0))
    assert set(planned.plan.trainable) == {"encoder_norm", "head"}
    frozen = sum(engine.system.components[i].num_params for i in planned.plan.frozen_ids.values())
    trainable = sum(np.size(x) for p in planned.plan.trainable.values() for x in _leaves(p))
    assert planned.params == pytest.approx(frozen / 2 + trainable)  # the root locks them too
    assert planned.flops > 0


def _leaves(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _leaves(value)
    else:
        yield tree


def _pretrained_root_iteration():
    """An iteration over a system whose root is pretrained (frozen unless
    cloned) and never mutates (mu 0)."""
    engine = _engine()
    for component in engine.system.components.values():
        component.trained = True
    run = _iteration(engine)
    root = dataclasses.replace(engine.system.root_path, hparams=dict(engine.system.root_path.hparams, _mu_=0.0))
    engine.system.paths[root.id] = root
    data_hparams = iteration.generation_data_hparams([], engine.system.config, np.random.default_rng(0))
    return engine, run, root, data_hparams


# ---- §3b budget and validation ----------------------------------------------------------


def test_a_round_is_examples_per_round_examples_not_one_epoch():
    config = tiny_config(examples_per_round=512, batch_size=32, train_rounds=3)
    plan = search_plan(config, SearchBudget(), kind=EXTENSION, train_examples=100, validation_examples=50)
    assert plan.steps_per_round == 16 and plan.steps_per_candidate == 48
    assert plan.epochs_per_candidate == pytest.approx(15.36)
    assert "48 steps of 32" in plan.describe()


def test_candidates_per_generation_scale_with_devices_unless_overridden():
    config = tiny_config(candidates_per_generation=2)

    def candidates(devices, **budget):
        plan = search_plan(config, SearchBudget(**budget), kind=EXTENSION, train_examples=10,
                           validation_examples=10, num_devices=devices)
        return plan.candidates_per_generation

    assert [candidates(1), candidates(2), candidates(3), candidates(8)] == [2, 2, 3, 8]
    assert candidates(8, candidates_per_generation=1) == 1


def test_one_candidate_per_generation_still_shares_and_fine_tunes_in_the_first():
    """With one candidate per generation, an extension search's first generation
    trains two (a sharing and a fine-tuning child); later ones and a
    generalization search train one; the budget counts and says so."""
    config = tiny_config(candidates_per_generation=1)
    plan = search_plan(config, SearchBudget(generations=4), kind=EXTENSION, train_examples=10, validation_examples=10)
    assert [plan.candidates_in(g) for g in range(4)] == [2, 1, 1, 1]
    assert plan.candidates == 5
    assert "2 candidates in the first and 1 in each later one" in plan.describe()
    general = search_plan(config, SearchBudget(generations=4), kind=GENERALIZATION, train_examples=10,
                          validation_examples=10)
    assert [general.candidates_in(g) for g in range(4)] == [1, 1, 1, 1] and general.candidates == 4
    plain = search_plan(dataclasses.replace(config, finetune_first_candidate=False), SearchBudget(generations=4),
                        kind=EXTENSION, train_examples=10, validation_examples=10)
    assert plain.candidates == 4
    two = search_plan(tiny_config(candidates_per_generation=2), SearchBudget(generations=4), kind=EXTENSION,
                      train_examples=10, validation_examples=10)
    assert two.candidates == 8 and two.first_generation_candidates == 0


def test_the_plan_says_how_successive_halving_spends_the_rounds():
    config = tiny_config(candidates_per_generation=2, train_rounds=6, examples_per_round=512, batch_size=32,
                         halving_round=3)
    plan = search_plan(config, SearchBudget(generations=4), kind=EXTENSION, train_examples=10, validation_examples=10)
    assert plan.halving_round == 3 and plan.halving_in(1) == (3, 9)
    assert "after 3 validations only the better half trains on" in plan.describe()
    assert "(9 validations, 144 steps in all)" in plan.describe()
    one = search_plan(dataclasses.replace(config, candidates_per_generation=1), SearchBudget(generations=4),
                      kind=GENERALIZATION, train_examples=10, validation_examples=10)
    assert one.halving_in(1) == (0, 6) and "better half" not in one.describe()
    off = search_plan(tiny_config(), SearchBudget(), kind=EXTENSION, train_examples=10, validation_examples=10)
    assert off.halving_round == 0 and "better half" not in off.describe()


def test_validation_is_sized_by_fraction_with_a_floor_and_capped_for_ranking():
    split = ValidationSplit(fraction=0.2, min_examples=200)
    assert [split.size(n) for n in (100, 700, 4000)] == [30, 200, 800]
    big = ImageSet(np.zeros((50, 2, 2, 3), np.uint8), np.zeros(50, np.int32))
    assert len(iteration.ranking_validation(big, 20)) == 20
    assert iteration.ranking_validation(big, 100) is big
    config = tiny_config(validation_examples=300)
    plan = search_plan(config, SearchBudget(), kind=EXTENSION, train_examples=10, validation_examples=1000)
    assert plan.validation_examples == 300


# ---- §3b transfer-aware first parents --------------------------------------------------------


def test_ridge_readout_separates_informative_features_and_not_noise():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 300)
    informative = np.eye(3)[labels] * 3 + rng.normal(size=(300, 3))
    noise = rng.normal(size=(300, 3))
    fit = lambda x: probe.ridge_readout_accuracy(x[:200], labels[:200], x[200:], labels[200:], 3)  # noqa: E731
    assert fit(informative) > 0.9
    assert fit(noise) < 0.55


def test_first_parents_go_round_robin_over_the_paths_close_to_the_best():
    probes = [ParentProbe("a", "x", 0.80, 0.1), ParentProbe("b", "y", 0.79, 0.1), ParentProbe("r", ROOT_TASK, 0.5, 0.1)]
    chosen = probe.choose_first_parents(probes, candidates=3, tolerance=0.02)
    assert probe.first_parent_ids(chosen) == ["a", "a", "b"]
    assert [p.chosen for p in chosen] == [2, 1, 0]
    assert "below the best" in chosen[2].reason
    alone = probe.choose_first_parents(probes, candidates=2, tolerance=0.0)
    assert probe.first_parent_ids(alone) == ["a", "a"]


def test_probes_rank_a_trained_body_above_the_random_root(tmp_path):
    """Features that already separate a task's classes probe higher than random ones.

    The first search trains long enough for its body to separate digits (at
    the test config's 256 examples a round its features probed below the
    random root's, and on digits parity trained and random bodies probed
    within 0.005 of each other); the new task asks for the same classes."""
    engine = Engine.create(tiny_config(examples_per_round=2048))
    engine.add_task(TaskSpec("digits", BundledSource("digits")))
    engine.run_search("digits")
    engine.add_task(TaskSpec("digits_again", BundledSource("digits")))
    run = _iteration_for(engine, "digits_again")
    probes = run._probe()
    assert [p.task for p in probes][0] == "digits"
    assert probes[0].accuracy > probes[1].accuracy
    assert sum(p.chosen for p in probes) == run.plan.candidates_per_generation


def _iteration_for(engine: Engine, task: str) -> iteration.TaskIteration:
    data = engine._task_data(task)
    return iteration.TaskIteration(engine.system, threading.RLock(), task, data, engine.search_plan(task),
                                   seed=0, devices=engine.devices, emit=lambda event: None)


def test_the_first_generations_last_candidate_fine_tunes_its_parent_in_full():
    engine, run, root, data_hparams = _pretrained_root_iteration()
    shared = run._draft([], data_hparams, np.random.default_rng(0), parent_id=root.id)
    full = run._draft([], data_hparams, np.random.default_rng(0), parent_id=root.id, clone_all=True)
    assert any(s.mode == "frozen" for s in shared.child.sources.values())
    assert all(s.mode != "frozen" for s in full.child.sources.values())
    assert full.child.mutations[-1] == "clone:all"


def test_with_one_candidate_per_generation_the_first_trains_a_sharing_and_a_fine_tuning_child():
    engine = _engine(candidates_per_generation=1, generations=2, train_rounds=1, examples_per_round=64)
    for component in engine.system.components.values():
        component.trained = True
    events = []
    data = _data()
    plan = search_plan(engine.system.config, SearchBudget(), kind=EXTENSION, train_examples=len(data.train),
                       validation_examples=len(data.validation))
    run = iteration.TaskIteration(engine.system, threading.RLock(), "t", data, plan, seed=0,
                                  devices=engine.devices, emit=events.append)
    run.run()
    started = [e for e in events if isinstance(e, GenerationStarted)]
    scored = [e for e in events if isinstance(e, CandidateScored)]
    assert [e.candidates for e in started] == [2, 1]
    assert [e.generation for e in scored] == [0, 0, 1]
    first = [e for e in scored if e.generation == 0]
    assert "clone:all" not in first[0].mutations and first[1].mutations[-1] == "clone:all"


def test_with_parsimony_a_search_serves_its_smallest_path_within_the_margin():
    """parsimony_z so large that every kept candidate is within the margin: the
    served path is the kept candidate charged the fewest parameters, not the best."""
    engine = Engine.create(tiny_config(parsimony_z=1e6, generations=2, train_rounds=1, examples_per_round=64))
    for component in engine.system.components.values():
        component.trained = True  # a root worth sharing frozen
    events = []
    engine.add_task(TaskSpec("digits", BundledSource("digits")))
    engine.run_search("digits", on_event=events.append)
    kept = [e for e in events if isinstance(e, CandidateScored) and e.accepted_into_population]
    assert len({e.params for e in kept}) > 1, "the test needs candidates of different sizes"
    smallest = min(kept, key=lambda e: e.params)
    assert engine.system.best["digits"] == smallest.path_id
