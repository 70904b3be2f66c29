"""The training input pipeline on the device: no implicit host transfers in
the step loop, no silent recompiles, inputs shared by the candidates of a
generation, and validation streamed with one sync a round."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from evolve.data import preprocess_device
from evolve.engine import Engine, EngineOptions
from evolve.train import loop, steps
from evolve.types import BundledSource, PathStructure, TaskSpec
from tests.conftest import TEST_SIZE, tiny_config
from tests.train.test_train import SETTINGS, _data, _plan

AUGMENTED = dict(crop_area=0.6, crop_aspect=0.75, flip=True, brightness=0.1, contrast=0.1, saturation=0.1, hue=0.05)
OUR_PROGRAMS = ("train_step", "count_correct", "train_inputs", "eval_inputs")


class _Compiles:
    """Counts XLA backend compiles while active (jax.monitoring)."""

    def __init__(self):
        self.count = 0

    def _listener(self, event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            self.count += 1

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self._listener)
        return self

    def __exit__(self, *exc_info):
        jax.monitoring.unregister_event_duration_listener(self._listener)


def _traces() -> int:
    return sum(steps.TRACE_COUNTS[name] for name in OUR_PROGRAMS)


@pytest.fixture
def guarded(monkeypatch):
    monkeypatch.setattr(loop, "STEP_LOOP_TRANSFER_GUARD", "disallow")


def test_a_two_generation_search_runs_its_step_loops_without_implicit_transfers(guarded, tmp_path):
    """The whole search, augmentation on, under jax.transfer_guard("disallow")
    in every step loop: images, labels, keys, learning rates and parameters
    reach the device only through explicit uploads."""
    config = tiny_config(generations=2, default_crop_area=0.7)
    engine = Engine.create(config, state_dir=str(tmp_path), options=EngineOptions(seed=1))
    engine.add_task(TaskSpec("digits", BundledSource("digits")))
    engine.run_search("digits")
    assert engine.system.best["digits"]


def test_the_guard_is_live_in_the_step_loop(guarded, monkeypatch):
    """Control: a host array handed to a step inside the loop is refused."""
    make = loop._TrainInputs.make
    monkeypatch.setattr(loop._TrainInputs, "make",
                        lambda self, batch, device, size: np.asarray(make(self, batch, device, size)))
    structure = PathStructure(TEST_SIZE, 1, 8, 3, (), 8)
    with pytest.raises(Exception, match="[Dd]isallowed host-to-device transfer"):  # augmented: no latent cache
        loop.train_candidates([_plan(structure, {"head"})], _data(), SETTINGS, AUGMENTED, seed=0)


def test_new_hyperparameters_and_magnitudes_of_seen_structures_compile_nothing(guarded):
    """Learning rate, momentum, seeds and augmentation magnitudes are traced
    values: a second run with other values traces and compiles nothing."""
    structure = PathStructure(TEST_SIZE, 2, 8, 3, (), 8)
    names = {"head", "encoder_norm", "encoderblock_1"}
    first = [_plan(structure, names, 0), _plan(structure, {"head"}, 1)]
    loop.train_candidates(first, _data(), SETTINGS, AUGMENTED, seed=0)
    traces = _traces()
    other_hparams = dict(first[0].hparams, learning_rate=0.01, momentum=0.8)
    second = [_plan(structure, names, 2, other_hparams), _plan(structure, {"head"}, 3, other_hparams)]
    smaller = {name: value / 2 if isinstance(value, float) else value for name, value in AUGMENTED.items()}
    with _Compiles() as compiles:
        results = loop.train_candidates(second, _data(seed=1), SETTINGS, smaller, seed=9)
    assert _traces() == traces
    assert compiles.count == 0
    assert all(r.steps == SETTINGS.rounds * SETTINGS.steps_per_round for r in results)


def test_candidates_of_one_size_share_each_steps_inputs(monkeypatch):
    """The device preprocessing runs once per step and image size, not per candidate."""
    calls = []
    make = loop._TrainInputs.make
    monkeypatch.setattr(loop._TrainInputs, "make",
                        lambda self, batch, device, size: calls.append(size) or make(self, batch, device, size))
    small, large = PathStructure(TEST_SIZE, 1, 8, 3, (), 8), PathStructure(TEST_SIZE, 1, 16, 3, (), 8)
    plans = [_plan(small, {"head"}, 0), _plan(small, {"head", "encoder_norm"}, 1), _plan(large, {"head"}, 2)]
    loop.train_candidates(plans, _data(), SETTINGS, AUGMENTED, seed=0)
    total = SETTINGS.rounds * SETTINGS.steps_per_round
    assert sorted(calls) == [8] * total + [16] * total


def test_validation_reads_every_candidate_once_a_round(monkeypatch):
    """One host read per round for all candidates (jax.device_get of their sums)."""
    reads = []
    device_get = jax.device_get
    monkeypatch.setattr(loop.jax, "device_get", lambda tree: reads.append(1) or device_get(tree))
    structure = PathStructure(TEST_SIZE, 1, 8, 3, (), 8)
    plans = [_plan(structure, {"head"}, 0), _plan(structure, {"head", "encoder_norm"}, 1)]
    # No candidate can beat an infinite start score: no best snapshots are read.
    for plan in plans:
        plan.start_score = float("inf")
    loop.train_candidates(plans, _data(), SETTINGS, {}, seed=0)
    assert len(reads) == SETTINGS.rounds


def test_a_streamed_accuracy_equals_the_host_preprocessed_one():
    """evaluate_accuracy (uint8 batches preprocessed on the device) against the
    same model on host-preprocessed images."""
    from evolve.data import preprocess_eval
    from evolve.models import vit

    structure = PathStructure(TEST_SIZE, 1, 16, 3, (), 8)
    params = vit.init_path_params(structure, jax.random.key(4))
    params["head"]["kernel"] = np.random.default_rng(0).normal(size=params["head"]["kernel"].shape).astype(np.float32)
    data = _data(n=50)
    streamed = loop.evaluate_accuracy({}, params, data.test, structure, eval_batch_size=16)
    logits = vit.forward(params, preprocess_eval(data.test.images, 16), structure)
    host = float(np.mean(np.argmax(np.asarray(logits), -1) == data.test.labels))
    assert streamed == pytest.approx(host, abs=1 / 50)  # at most one near-tie may flip
    assert preprocess_device.Augmentation.of({}).off
