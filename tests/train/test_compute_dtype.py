"""bfloat16 compute (DESIGN §4): the forward and backward passes in bfloat16,
parameters, gradients and optimizer state in float32; float32 stays the
default and computes exactly as before."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evolve.config import get_config
from evolve.models import vit
from evolve.search.iteration import structure_of
from evolve.train import loop
from evolve.types import PathStructure
from tests.conftest import TEST_SIZE
from tests.train.test_train import SETTINGS, _data, _plan

F32 = PathStructure(TEST_SIZE, 2, 16, 3, (1,), 8)
BF16 = dataclasses.replace(F32, compute_dtype="bfloat16")


def _params():
    params = vit.init_path_params(F32, jax.random.key(0))
    params["head"]["kernel"] = np.random.default_rng(0).normal(size=params["head"]["kernel"].shape).astype(np.float32)
    return params


def test_bfloat16_logits_follow_float32_ones_and_come_back_as_float32():
    images = np.random.default_rng(1).uniform(-1, 1, (8, 16, 16, 3)).astype(np.float32)
    forward = jax.jit(vit.forward, static_argnums=2)
    low, high = forward(_params(), images, BF16), forward(_params(), images, F32)
    assert low.dtype == high.dtype == jnp.float32
    assert not np.array_equal(low, high)  # it did compute in another precision
    np.testing.assert_allclose(low, high, atol=0.1 * float(np.abs(high).max()))


def test_bfloat16_training_learns_with_float32_parameters():
    plan = _plan(BF16, {"head", "encoder_norm", "encoderblock_1", "residual_adapter_1"})
    plan.hparams = dict(plan.hparams, learning_rate=0.1, warmup=0.0)
    settings = dataclasses.replace(SETTINGS, rounds=4)
    result = loop.train_candidates([plan], _data(), settings, {}, seed=0)[0]
    assert result.quality > 0.6  # three classes: chance is 1/3
    assert {leaf.dtype for leaf in jax.tree.leaves(result.trainable)} == {np.dtype(np.float32)}
    assert {leaf.dtype for leaf in jax.tree.leaves(result.momentum)} == {np.dtype(np.float32)}


def test_the_configuration_carries_the_compute_dtype_into_every_structure():
    config = get_config("tiny", compute_dtype="bfloat16")
    hparams = config.default_hparams()
    assert structure_of(config, 3, hparams, F32.component_names()).compute_dtype == "bfloat16"
    assert structure_of(get_config("tiny"), 3, hparams, F32.component_names()).compute_dtype == "float32"
    with pytest.raises(ValueError, match="compute_dtype must be one of float32, bfloat16"):
        get_config("tiny", compute_dtype="float16")
