"""Training: one compile per structure, schedules, momentum inheritance,
multi-device generations equal to sequential ones."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from evolve.data import ImageSet, TaskData
from evolve.models import vit
from evolve.train import loop, optimizer, steps
from evolve.types import PathStructure
from tests.conftest import TEST_SIZE, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _data(n=96, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n).astype(np.int32)
    # a learnable signal: overall brightness per class, plus noise
    images = (labels[:, None, None, None] * 90 + rng.integers(0, 60, (n, 8, 8, 3))).astype(np.uint8)
    split = ImageSet(images, labels)
    return TaskData(train=split, validation=split, test=split, num_classes=classes)


def _plan(structure, trainable_names, seed=0, hparams=None):
    params = vit.init_path_params(structure, jax.random.key(seed))
    hparams = hparams or dict(tiny_config().default_hparams(), learning_rate=0.05)
    return loop.CandidatePlan(
        structure=structure,
        trainable={n: p for n, p in params.items() if n in trainable_names},
        frozen={n: p for n, p in params.items() if n not in trainable_names},
        momentum={}, hparams=hparams, start_score=-math.inf, score_of_quality=lambda q: q,
    )


SETTINGS = loop.TrainSettings(batch_size=16, rounds=2, examples_per_round=64, eval_batch_size=64)


def test_same_structure_does_not_recompile():
    structure = PathStructure(TEST_SIZE, 2, 16, 3, (), 8)
    names = {"head", "encoder_norm", "encoderblock_1"}
    loop.train_candidates([_plan(structure, names, 0)], _data(), SETTINGS, {}, seed=0)
    traces = steps.TRACE_COUNTS["train_step"]
    results = loop.train_candidates([_plan(structure, names, 1)], _data(), SETTINGS, {}, seed=1)
    assert steps.TRACE_COUNTS["train_step"] == traces, "a second candidate of the same structure recompiled"
    assert results[0].compile_seconds == 0.0
    other = PathStructure(TEST_SIZE, 1, 16, 3, (), 8)
    loop.train_candidates([_plan(other, {"head", "encoder_norm"}, 2)], _data(), SETTINGS, {}, seed=2)
    assert steps.TRACE_COUNTS["train_step"] == traces + 1


def test_training_learns_and_only_trainable_components_change():
    structure = PathStructure(TEST_SIZE, 2, 16, 3, (), 8)
    plan = _plan(structure, {"head", "encoder_norm", "encoderblock_1", "encoderblock_0", "embedding"})
    frozen_before = jax.tree.map(np.copy, plan.frozen)
    plan.hparams = dict(plan.hparams, learning_rate=0.1, warmup=0.0)
    settings = loop.TrainSettings(batch_size=16, rounds=6, examples_per_round=96, eval_batch_size=64)
    result = loop.train_candidates([plan], _data(), settings, {}, seed=0)[0]
    assert result.quality > 0.8
    assert set(result.trainable) == set(plan.trainable)
    jax.tree.map(np.testing.assert_array_equal, plan.frozen, frozen_before)
    assert set(result.momentum) == set(plan.trainable)


def test_no_snapshot_when_parent_score_is_not_beaten():
    structure = PathStructure(TEST_SIZE, 2, 16, 3, (), 8)
    plan = _plan(structure, {"head"})
    plan.start_score = 2.0  # unreachable
    result = loop.train_candidates([plan], _data(), SETTINGS, {}, seed=0)[0]
    assert result.trainable is None and result.score == 2.0


@pytest.mark.parametrize("schedule", ["cosine", "constant", "linear", "restarts"])
def test_schedules_warm_up_and_stay_positive(schedule):
    hparams = {"learning_rate": 0.1, "warmup": 0.1, "schedule": schedule}
    rates = optimizer.learning_rates(hparams, 100, 4)
    assert rates.shape == (100,)
    assert rates[0] == 0.0 and rates.max() == pytest.approx(0.1, rel=1e-5)
    assert np.all(rates >= 0)
    if schedule in ("cosine", "linear"):
        assert rates[-1] < 0.1 / 100
    if schedule == "restarts":
        assert np.sum(np.diff(rates) > 0.01) >= 3  # a restart per round


def test_inherited_momentum_is_used():
    structure = PathStructure(TEST_SIZE, 1, 16, 3, (), 8)
    base = _plan(structure, {"head"})
    inherited = _plan(structure, {"head"})
    inherited.momentum = {"head": jax.tree.map(lambda x: np.full_like(x, 5.0), inherited.trainable["head"])}
    a = loop.train_candidates([base], _data(), SETTINGS, {}, seed=0)[0]
    b = loop.train_candidates([inherited], _data(), SETTINGS, {}, seed=0)[0]
    assert not np.array_equal(a.trainable["head"]["kernel"], b.trainable["head"]["kernel"])


_MULTI_DEVICE = """
import json, math, sys
import jax, numpy as np
sys.path.insert(0, sys.argv[1])
from tests.train.test_train import _data, _plan
from evolve.train import loop
from evolve.types import PathStructure
from tests.conftest import TEST_SIZE
structures = [PathStructure(TEST_SIZE, n, 16, 3, a, 8) for n, a in [(2, ()), (1, ()), (2, (1,)), (2, ())]]
settings = loop.TrainSettings(batch_size=16, rounds=2, examples_per_round=64, eval_batch_size=64)
def run(devices):
    plans = [_plan(s, {"head", "encoder_norm", "encoderblock_0"} | ({"residual_adapter_1"} if s.adapter_layers else set()), i)
             for i, s in enumerate(structures)]
    results = loop.train_candidates(plans, _data(), settings, {}, seed=5, devices=devices)
    return [[float(np.sum(np.abs(x))) for x in jax.tree.leaves(r.trainable)] + [r.quality] for r in results]
parallel = run(jax.devices())
sequential = run(jax.devices()[:1])
print(json.dumps({"devices": len(jax.devices()), "parallel": parallel, "sequential": sequential}))
"""


def test_generation_on_four_devices_equals_sequential():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", _MULTI_DEVICE, REPO], capture_output=True, text=True,
                            env=env, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["devices"] == 4
    assert out["parallel"] == out["sequential"]


def test_a_candidate_that_ties_its_parent_is_kept():
    structure = PathStructure(TEST_SIZE, 2, 16, 3, (), 8)
    plan = _plan(structure, {"head"})
    plan.score_of_quality = lambda quality: 0.5  # every round scores exactly the parent's 0.5
    plan.start_score = 0.5
    (result,) = loop.train_candidates([plan], _data(), SETTINGS, {}, seed=0)
    assert result.trainable is not None and result.score == 0.5
    plan.start_score = 0.5000001
    (result,) = loop.train_candidates([plan], _data(), SETTINGS, {}, seed=0)
    assert result.trainable is None


def test_halving_arithmetic():
    settings = loop.TrainSettings(batch_size=16, rounds=6, examples_per_round=64, eval_batch_size=64, halving_round=3)
    assert settings.halving(2) == (3, 9)  # the survivor takes the other's 3 rounds
    assert settings.halving(4) == (3, 9)  # two survivors share the other two's 6
    assert settings.halving(3) == (3, 7)  # two survivors, 3 rounds given up: 1 more each (whole rounds)
    assert settings.halving(1) == (0, 6)  # nothing to compare
    off = loop.TrainSettings(batch_size=16, rounds=6, examples_per_round=64, eval_batch_size=64)
    assert off.halving(2) == (0, 6)
    late = loop.TrainSettings(batch_size=16, rounds=6, examples_per_round=64, eval_batch_size=64, halving_round=6)
    assert late.halving(2) == (0, 6)


def test_halving_trains_the_better_candidate_on_as_if_alone():
    """After the halving round the better candidate trains the rounds the
    other gives up: its result equals that plan trained alone for as many
    rounds (same batches, same schedule), and the other stops there."""
    structure = PathStructure(TEST_SIZE, 2, 16, 3, (), 8)
    names = {"head", "encoder_norm", "encoderblock_1", "encoderblock_0", "embedding"}
    hparams = dict(tiny_config().default_hparams(), learning_rate=0.1, warmup=0.0)
    learner = _plan(structure, names, 0, hparams)
    stuck = _plan(structure, {"head"}, 1, dict(hparams, learning_rate=1e-4))
    settings = loop.TrainSettings(batch_size=16, rounds=3, examples_per_round=64, eval_batch_size=64, halving_round=1)
    examples = []
    halved = loop.train_candidates([stuck, learner], _data(), settings, {}, seed=4,
                                   on_step=lambda step, steps, seen: examples.append(seen))
    alone = loop.train_candidates(
        [_plan(structure, names, 0, hparams)], _data(), dataclasses.replace(settings, rounds=5, halving_round=0), {},
        seed=4,
    )[0]
    steps_per_round = settings.steps_per_round
    assert [r.steps for r in halved] == [1 * steps_per_round, 5 * steps_per_round]
    # The progress callback counts what trained: both before the halving, one after.
    assert examples[steps_per_round - 1] == 2 * 16 * steps_per_round
    assert examples[-1] == sum(r.steps for r in halved) * 16
    assert halved[1].quality == alone.quality and halved[1].quality > halved[0].quality
    jax.tree.map(np.testing.assert_array_equal, halved[1].trainable, alone.trainable)


def test_prefetching_stops_early_and_hands_on_errors():
    """The background batch thread ends when training stops early (a cancel)
    and a failure in it is raised in the training thread."""
    import threading

    structure = PathStructure(TEST_SIZE, 2, 16, 3, (), 8)
    cancel = threading.Event()

    def stop_after_one(step, steps, examples):
        cancel.set()

    before = {t.name for t in threading.enumerate()}
    with pytest.raises(loop.CancelledError):
        loop.train_candidates([_plan(structure, {"head"})], _data(), SETTINGS, {}, seed=0, cancel=cancel,
                              on_step=stop_after_one)
    assert "batch-prefetch" not in {t.name for t in threading.enumerate()} - before
    broken = loop._Batches(_data().train, 16, {}, 0)
    broken.next = lambda: (_ for _ in ()).throw(RuntimeError("decoder broke"))
    with loop._Prefetched(broken, jax.local_devices()[:1], 5) as prefetched, pytest.raises(RuntimeError, match="decoder broke"):
        prefetched.next()


def test_the_validation_step_compile_counts_as_compile_time():
    """A candidate whose train step is compiled but whose eval step is not
    (evicted here) reports the eval compile in compile_seconds."""
    structure = PathStructure(TEST_SIZE, 1, 16, 5, (), 8)  # 5 classes: a structure no other test compiles
    loop.train_candidates([_plan(structure, {"head"})], _data(classes=5), SETTINGS, {}, seed=0)
    with steps.TRAINING._lock:
        for key in [k for k in steps.TRAINING._entries if k[0] == "count_correct"]:
            del steps.TRAINING._entries[key]
    traces = dict(steps.TRACE_COUNTS)
    (result,) = loop.train_candidates([_plan(structure, {"head"})], _data(classes=5), SETTINGS, {}, seed=0)
    assert steps.TRACE_COUNTS["train_step"] == traces["train_step"]
    assert steps.TRACE_COUNTS["count_correct"] == traces["count_correct"] + 1
    assert result.compile_seconds > 0.0
