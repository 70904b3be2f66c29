"""Training memory options (DESIGN §4, mixed precision): per-layer
rematerialisation (`remat`) computes the same step as keeping activations,
and a bfloat16 momentum trace (`momentum_dtype`) trains like the float32 one
while components keep, save and hand down float32 traces."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from evolve.config import get_config
from evolve.models import vit
from evolve.search.iteration import structure_of
from evolve.train import loop, optimizer, steps
from evolve.types import PathStructure
from tests.conftest import TEST_SIZE
from tests.train.test_train import SETTINGS, _data, _plan

BASE = PathStructure(TEST_SIZE, 2, 16, 3, (1,), 8)
REMAT = dataclasses.replace(BASE, remat=True)
BF16_MOMENTUM = dataclasses.replace(BASE, momentum_dtype="bfloat16")
TRAINABLE = {"head", "encoder_norm", "encoderblock_1", "residual_adapter_1"}


def _loss_and_grads(structure: PathStructure):
    params = vit.init_path_params(structure, jax.random.key(0))
    images = np.random.default_rng(1).uniform(-1, 1, (8, 16, 16, 3)).astype(np.float32)
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1], np.int32)

    def loss(params):
        logits = vit.forward(params, images, structure)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    grad_fn = jax.value_and_grad(loss)
    return jax.jit(grad_fn)(params), str(jax.make_jaxpr(grad_fn)(params))


def test_remat_recomputes_layers_and_gives_the_same_loss_and_gradients():
    (loss, grads), program = _loss_and_grads(BASE)
    (remat_loss, remat_grads), remat_program = _loss_and_grads(REMAT)
    # the backward pass recomputes each layer's matmuls from its input
    assert remat_program.count("dot_general") > program.count("dot_general")
    np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(grads)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_a_candidate_trained_with_remat_matches_one_without():
    results = [loop.train_candidates([_plan(s, TRAINABLE)], _data(), SETTINGS, {}, seed=0)[0] for s in (BASE, REMAT)]
    plain, remat = results
    assert remat.steps == plain.steps > 0
    assert remat.quality == pytest.approx(plain.quality, abs=1e-6)
    for got, want in zip(jax.tree.leaves(remat.trainable), jax.tree.leaves(plain.trainable)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def _steps(structure: PathStructure, count: int = 5):
    """`count` engine train steps on one batch; returns (trainable, opt_state, losses)."""
    params = vit.init_path_params(structure, jax.random.key(0))
    trainable = {n: p for n, p in params.items() if n in TRAINABLE}
    frozen = {n: p for n, p in params.items() if n not in TRAINABLE}
    opt_state = optimizer.make_optimizer(False, structure.momentum_dtype).init(trainable)
    images = np.random.default_rng(2).uniform(-1, 1, (16, 16, 16, 3)).astype(np.float32)
    labels = np.arange(16, dtype=np.int32) % 3
    losses = []
    for _ in range(count):
        trainable, opt_state, loss = steps.train_step(
            trainable, frozen, opt_state, images, labels, np.float32(0.05), np.float32(0.9),
            structure=structure, nesterov=False)
        losses.append(float(loss))
    return trainable, opt_state, losses


def test_bfloat16_momentum_holds_the_trace_in_bfloat16_and_follows_float32():
    trainable, state, losses = _steps(BASE)
    low_trainable, low_state, low_losses = _steps(BF16_MOMENTUM)
    assert {leaf.dtype for leaf in jax.tree.leaves(optimizer.momentum_trace(state))} == {jnp.dtype(jnp.float32)}
    assert {leaf.dtype for leaf in jax.tree.leaves(optimizer.momentum_trace(low_state))} == {jnp.dtype(jnp.bfloat16)}
    assert {leaf.dtype for leaf in jax.tree.leaves(low_trainable)} == {jnp.dtype(jnp.float32)}
    assert low_losses[-1] < low_losses[0]  # it trains
    np.testing.assert_allclose(low_losses, losses, rtol=1e-2)
    for got, want in zip(jax.tree.leaves(low_trainable), jax.tree.leaves(trainable)):
        np.testing.assert_allclose(got, want, atol=2e-3 + 1e-2 * float(np.abs(want).max()))
    assert not all(np.array_equal(g, w) for g, w in zip(jax.tree.leaves(low_trainable), jax.tree.leaves(trainable)))


def test_bfloat16_momentum_is_kept_and_inherited_as_float32():
    plan = _plan(BF16_MOMENTUM, TRAINABLE)
    first = loop.train_candidates([plan], _data(), SETTINGS, {}, seed=0)[0]
    assert first.momentum and {leaf.dtype for leaf in jax.tree.leaves(first.momentum)} == {np.dtype(np.float32)}
    assert any(np.abs(leaf).max() > 0 for leaf in jax.tree.leaves(first.momentum))
    child = _plan(BF16_MOMENTUM, TRAINABLE)
    child.trainable, child.momentum = first.trainable, first.momentum  # a child inherits the trace
    second = loop.train_candidates([child], _data(), SETTINGS, {}, seed=1)[0]
    assert second.steps > 0 and np.isfinite(second.quality)
    assert {leaf.dtype for leaf in jax.tree.leaves(second.momentum)} == {np.dtype(np.float32)}


def test_the_configuration_carries_both_options_into_every_structure():
    hparams = get_config("tiny").default_hparams()
    names = BASE.component_names()
    default = structure_of(get_config("tiny"), 3, hparams, names)
    assert (default.remat, default.momentum_dtype) == (False, "float32")
    chosen = structure_of(get_config("tiny", remat=True, momentum_dtype="bfloat16"), 3, hparams, names)
    assert (chosen.remat, chosen.momentum_dtype) == (True, "bfloat16")
    with pytest.raises(ValueError, match="momentum_dtype must be one of float32, bfloat16"):
        get_config("tiny", momentum_dtype="float16")
    with pytest.raises(ValueError, match="remat must be true or false"):
        get_config("tiny", remat="False")
    with pytest.raises(ValueError, match="adapters must be true or false"):
        get_config("tiny", adapters=0)
