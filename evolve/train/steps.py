"""Jitted train / eval / predict steps.

The model structure is static; trainable and frozen parameters are separate
arguments, so jax.jit's own cache holds one executable per (structure,
trainable set) and a second candidate of the same structure never recompiles.
`TRACE_COUNTS` counts traces per step kind, for tests and for telling compile
time from step time.
"""

from __future__ import annotations

import collections
import functools
from typing import Mapping

import jax
import jax.numpy as jnp
import optax

from evolve.models import vit
from evolve.train import optimizer
from evolve.types import Params, PathStructure

TRACE_COUNTS: collections.Counter[str] = collections.Counter()


def _merge(trainable: Mapping[str, Params], frozen: Mapping[str, Params]) -> dict[str, Params]:
    return {**frozen, **trainable}


@functools.partial(jax.jit, static_argnames=("structure", "nesterov"), donate_argnums=(0, 2))
def train_step(
    trainable: dict[str, Params],
    frozen: dict[str, Params],
    opt_state,
    images: jax.Array,
    labels: jax.Array,
    learning_rate: jax.Array,
    momentum: jax.Array,
    *,
    structure: PathStructure,
    nesterov: bool,
):
    """One SGD step on the trainable components; returns (trainable, opt_state, loss)."""
    TRACE_COUNTS["train_step"] += 1

    def loss_fn(params: dict[str, Params]) -> jax.Array:
        logits = vit.forward(_merge(params, frozen), images, structure)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    loss, grads = jax.value_and_grad(loss_fn)(trainable)
    opt = optimizer.make_optimizer(nesterov)
    opt_state = optimizer.with_hyperparams(opt_state, learning_rate, momentum)
    updates, opt_state = opt.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss


@functools.partial(jax.jit, static_argnames=("structure",))
def count_correct(
    trainable: dict[str, Params],
    frozen: dict[str, Params],
    images: jax.Array,
    labels: jax.Array,
    mask: jax.Array,
    *,
    structure: PathStructure,
) -> jax.Array:
    """Number of correctly classified examples where mask is true."""
    TRACE_COUNTS["count_correct"] += 1
    logits = vit.forward(_merge(trainable, frozen), images, structure)
    correct = (jnp.argmax(logits, axis=-1) == labels) & mask
    return jnp.sum(correct)


@functools.partial(jax.jit, static_argnames=("structure",))
def predict_probabilities(params: dict[str, Params], images: jax.Array, *, structure: PathStructure) -> jax.Array:
    """Class probabilities of a served path."""
    TRACE_COUNTS["predict"] += 1
    return jax.nn.softmax(vit.forward(params, images, structure), axis=-1)


def trim_compiled_steps(max_structures: int) -> bool:
    """Drops the compiled train and eval steps once more than `max_structures`
    are cached.

    Every structure a search tries keeps its executables (tens of MB each on
    CPU) for as long as the process lives; a long-running server would grow
    without bound. Serving executables (predict) are kept. The persistent
    compilation cache makes a later recompile cheap. Returns whether it trimmed.
    """
    if train_step._cache_size() + count_correct._cache_size() <= max_structures:
        return False
    train_step.clear_cache()
    count_correct.clear_cache()
    return True
