"""Frozen-prefix economics (DESIGN §4): the frozen prefix of a candidate runs
forward only and apart, candidates that share it compute it once per batch,
and with augmentation off its features are cached for the whole generation
(latent replay). Every variant trains what the unshared computation trains."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from evolve.models import vit
from evolve.train import loop, steps
from evolve.types import PathStructure
from tests.conftest import TEST_SIZE
from tests.train.test_input_pipeline import AUGMENTED
from tests.train.test_train import SETTINGS, _data, _plan

# Split and shared prefixes run the same operations on the same batches: on
# the CPU they train bit-identical parameters (checked exactly below). Cached
# features were computed at another batch size (eval_batch_size), where XLA
# may round differently: those agree to float32 rounding (1.5e-8 measured).
RTOL, ATOL = 2e-4, 2e-5

STRUCTURE = PathStructure(TEST_SIZE, 3, 8, 3, (1,), 8)
TOP = {"head", "encoder_norm", "encoderblock_2"}


def _with_ids(plan: loop.CandidatePlan, tag: str = "") -> loop.CandidatePlan:
    plan.frozen_ids = {name: f"c-{name}{tag}" for name in plan.frozen}
    return plan


def _unsplit(monkeypatch):
    """The computation before this change: every step runs the whole model on images."""
    monkeypatch.setattr(loop._Prefix, "of", staticmethod(lambda plan: None))


def _assert_same_training(a: list[loop.TrainResult], b: list[loop.TrainResult], *, exact: bool) -> None:
    for x, y in zip(a, b):
        assert x.steps == y.steps
        if exact:
            assert x.quality == y.quality
            jax.tree.map(np.testing.assert_array_equal, x.trainable, y.trainable)
        else:
            assert x.quality == pytest.approx(y.quality, abs=1.5 / 96)  # one near-tie may flip
            jax.tree.map(lambda p, q: np.testing.assert_allclose(p, q, rtol=RTOL, atol=ATOL), x.trainable,
                         y.trainable)


def test_prefix_layers_follow_the_frozen_components():
    frozen_all = set(STRUCTURE.component_names()) - {"head"}
    assert vit.frozen_prefix_layers(STRUCTURE, frozen_all) == 3
    assert vit.frozen_prefix_layers(STRUCTURE, frozen_all - {"encoderblock_2"}) == 2
    assert vit.frozen_prefix_layers(STRUCTURE, frozen_all - {"residual_adapter_1"}) == 1  # its adapter trains
    assert vit.frozen_prefix_layers(STRUCTURE, frozen_all - {"encoderblock_0"}) == 0
    assert vit.frozen_prefix_layers(STRUCTURE, frozen_all - {"cls"}) is None  # the stem trains: no prefix


def test_prefix_structures_normalise_what_the_prefix_does_not_compute():
    a = vit.prefix_structure(STRUCTURE, 1)
    b = vit.prefix_structure(dataclasses.replace(STRUCTURE, num_classes=7, adapter_dim=16, num_layers=4), 1)
    assert a == b and a.adapter_layers == () and a.num_classes == 0
    assert vit.prefix_names(vit.prefix_structure(STRUCTURE, 2)) == (
        "embedding", "cls", "posembed_input", "encoderblock_0", "residual_adapter_1", "encoderblock_1")


@pytest.mark.parametrize("layers", [0, 2, 3])
def test_a_path_from_its_prefix_tokens_gives_its_logits(layers):
    params = vit.init_path_params(dataclasses.replace(STRUCTURE, image_size=16), jax.random.key(0))
    structure = dataclasses.replace(STRUCTURE, image_size=16)
    params["head"]["kernel"] = np.random.default_rng(0).normal(size=params["head"]["kernel"].shape).astype(np.float32)
    images = np.random.default_rng(1).uniform(-1, 1, (4, 16, 16, 3)).astype(np.float32)
    prefix = vit.prefix_structure(structure, layers)
    tokens = jax.jit(vit.prefix_tokens, static_argnums=2)(params, images, prefix)
    split = jax.jit(vit.forward_from, static_argnums=(2, 3))(params, tokens, structure, layers)
    whole = jax.jit(vit.forward, static_argnums=2)(params, images, structure)
    np.testing.assert_allclose(split, whole, rtol=1e-5, atol=1e-5)


def test_a_prefix_trains_what_the_whole_model_step_trains(monkeypatch):
    """Split (prefix forward apart, step from its tokens) against the old
    single program, augmentation on (no cache), one candidate."""
    split = loop.train_candidates([_plan(STRUCTURE, TOP, 0)], _data(), SETTINGS, AUGMENTED, seed=3)
    _unsplit(monkeypatch)
    whole = loop.train_candidates([_plan(STRUCTURE, TOP, 0)], _data(), SETTINGS, AUGMENTED, seed=3)
    _assert_same_training(split, whole, exact=True)


def test_candidates_sharing_a_prefix_compute_it_once_a_batch(monkeypatch):
    calls = []
    features = loop._CandidateState.features
    monkeypatch.setattr(loop._CandidateState, "features",
                        lambda self, inputs: calls.append(self.sharing_key) or features(self, inputs))
    # Two candidates with the same frozen components (ids) and a third whose
    # block 1 is another component: two prefixes per batch.
    plans = [_with_ids(_plan(STRUCTURE, TOP, 0)), _with_ids(_plan(STRUCTURE, TOP | {"encoder_norm"}, 0)),
             _with_ids(_plan(STRUCTURE, TOP, 0))]
    plans[2].frozen_ids["encoderblock_1"] = "another"
    shared = loop.train_candidates(plans, _data(), SETTINGS, AUGMENTED, seed=5)
    total = SETTINGS.rounds * SETTINGS.steps_per_round
    validation_batches = SETTINGS.rounds * 2  # 96 examples in batches of 64
    assert len(calls) == 2 * (total + validation_batches)
    assert len(set(calls)) == 2
    _unsplit(monkeypatch)
    alone = loop.train_candidates([_plan(STRUCTURE, TOP, 0), _plan(STRUCTURE, TOP | {"encoder_norm"}, 0),
                                   _plan(STRUCTURE, TOP, 0)], _data(), SETTINGS, AUGMENTED, seed=5)
    _assert_same_training(shared, alone, exact=True)


def test_latent_replay_caches_the_prefix_once_and_trains_the_same(monkeypatch):
    """Augmentation off: the features of the training and validation splits
    are computed once (batches of eval_batch_size) and read by index; no
    training image is uploaded; training equals the per-step computation."""
    prefixes = []
    prefix_features = steps.prefix_features
    monkeypatch.setattr(steps, "prefix_features", lambda *a, **k: prefixes.append(1) or prefix_features(*a, **k))
    monkeypatch.setattr(loop, "STEP_LOOP_TRANSFER_GUARD", "disallow")
    made = []
    monkeypatch.setattr(loop._TrainInputs, "make", lambda *a: made.append(1) or pytest.fail("inputs made"))
    image_uploads = []
    device_put = jax.device_put
    monkeypatch.setattr(loop.jax, "device_put", lambda tree, *a: image_uploads.extend(
        leaf.shape for leaf in jax.tree.leaves(tree) if getattr(leaf, "dtype", None) == np.uint8) or device_put(tree, *a))
    plans = [_with_ids(_plan(STRUCTURE, TOP, 0)), _with_ids(_plan(STRUCTURE, TOP | {"encoderblock_1"}, 0))]
    cached = loop.train_candidates(plans, _data(), SETTINGS, {}, seed=7)
    # Two prefixes (3 and 1 layers), each over train (2 batches of 64) and validation (2).
    assert len(prefixes) == 2 * 4 and not made
    # Images are uploaded only to build the cache: no training or validation batch carries them.
    assert len(image_uploads) == 2 * 4
    monkeypatch.undo()
    settings = dataclasses.replace(SETTINGS, latent_cache_bytes=0)
    per_step = loop.train_candidates([_with_ids(_plan(STRUCTURE, TOP, 0)),
                                      _with_ids(_plan(STRUCTURE, TOP | {"encoderblock_1"}, 0))],
                                     _data(), settings, {}, seed=7)
    _assert_same_training(cached, per_step, exact=False)


def test_the_latent_cache_keeps_to_its_byte_bound():
    plans = [_with_ids(_plan(STRUCTURE, TOP, 0)), _with_ids(_plan(STRUCTURE, TOP | {"encoderblock_1"}, 0))]
    states = [loop._CandidateState(plan, jax.devices()[0], 8, 2) for plan in plans]
    one = states[0].prefix.feature_bytes(96 + 96)
    data = _data()
    fits_one = loop.LatentCache.build(states, data, dataclasses.replace(SETTINGS, latent_cache_bytes=one), True)
    assert len(fits_one.train) == 1 and fits_one.bytes == one
    assert not fits_one.serves_training(states)
    both = loop.LatentCache.build(states, data, SETTINGS, True)
    assert len(both.train) == 2 and both.serves_training(states)
    assert not loop.LatentCache.build(states, data, SETTINGS, False).train  # augmentation on: nothing cached
    table = next(iter(both.train.values()))
    assert table.shape == (96, vit.num_tokens(TEST_SIZE, 8), TEST_SIZE.hidden_size)


def test_frozen_components_stay_on_the_device_across_generations(monkeypatch):
    """A system component (one with an id) frozen in two generations is
    uploaded once; the copy is dropped beyond the byte bound and when the
    system no longer has the component."""
    resident = loop.ResidentParams(1 << 30)
    monkeypatch.setattr(loop, "RESIDENT", resident)
    first = _with_ids(_plan(STRUCTURE, TOP, 0))
    loop.train_candidates([first], _data(), SETTINGS, AUGMENTED, seed=0)
    uploaded = len(resident)
    assert uploaded == len(first.frozen) and resident.misses == uploaded
    second = _with_ids(_plan(STRUCTURE, TOP | {"encoder_norm"}, 1))
    second.frozen = first.frozen  # the same components, as a later generation drafts them
    state = loop._CandidateState(second, jax.devices()[0], 8, 2)
    assert resident.misses == uploaded and resident.hits == uploaded
    assert state.prefix_params["embedding"] is resident.get(first.frozen["embedding"], jax.devices()[0])
    resident.retain([first.frozen["embedding"]])
    assert len(resident) == 1
    small = loop.ResidentParams(resident.bytes // 2)
    for params in first.frozen.values():
        small.get(params, jax.devices()[0])
    assert small.bytes <= small.max_bytes and 0 < len(small) < len(first.frozen)
