"""Optimizer and learning-rate schedules (DESIGN.md §3.4).

Clip by global norm 1.0, then SGD with momentum. Learning rate and momentum
are injected hyperparameters fed every step as arrays, so one compiled step
serves every candidate of a structure whatever its grid values.
"""

from __future__ import annotations

import math
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from evolve.types import HyperValue, Params


def make_optimizer(nesterov: bool, momentum_dtype: str = "float32") -> optax.GradientTransformation:
    """`momentum_dtype` is the dtype of the momentum trace (optax's
    accumulator_dtype); updates are computed in float32 whatever it is."""
    return optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.inject_hyperparams(optax.sgd, static_args=("nesterov", "accumulator_dtype"))(
            learning_rate=0.0, momentum=0.9, nesterov=nesterov,
            accumulator_dtype=None if momentum_dtype == "float32" else jnp.dtype(momentum_dtype),
        ),
    )


def with_hyperparams(opt_state, learning_rate: jax.Array, momentum: jax.Array):
    """Returns opt_state with this step's learning rate and momentum set."""
    clip_state, inject_state = opt_state
    hyperparams = dict(inject_state.hyperparams, learning_rate=learning_rate, momentum=momentum)
    return clip_state, inject_state._replace(hyperparams=hyperparams)


def momentum_trace(opt_state) -> Params:
    """The SGD momentum trace (a params-shaped tree) inside the optimizer state."""
    return opt_state[1].inner_state[0].trace


def with_momentum_trace(opt_state, trace: Params):
    clip_state, inject_state = opt_state
    trace_state, rest = inject_state.inner_state
    inner = (trace_state._replace(trace=trace), rest)
    return clip_state, inject_state._replace(inner_state=inner)


def learning_rates(hparams: Mapping[str, HyperValue], total_steps: int, rounds: int) -> np.ndarray:
    """Per-step learning rates from the path's schedule hyperparameters.

    Schedules end at lr/1000 (cosine, linear) and warm up linearly over the
    `warmup` fraction of steps; `restarts` runs one cosine cycle per round.
    """
    peak = float(hparams["learning_rate"])
    end = peak / 1000.0
    total_steps = max(int(total_steps), 1)
    warmup_steps = int(round(float(hparams.get("warmup", 0.0)) * total_steps))
    schedule_name = str(hparams.get("schedule", "cosine"))
    if schedule_name == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps, total_steps, end)
    elif schedule_name == "constant":
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, peak, max(warmup_steps, 1)), optax.constant_schedule(peak)],
            [warmup_steps],
        )
    elif schedule_name == "linear":
        schedule = optax.join_schedules(
            [
                optax.linear_schedule(0.0, peak, max(warmup_steps, 1)),
                optax.linear_schedule(peak, end, max(total_steps - warmup_steps - 1, 1)),
            ],
            [warmup_steps],
        )
    elif schedule_name == "restarts":
        cycle = max(math.ceil(total_steps / max(rounds, 1)), 1)
        cycle_warmup = min(int(round(float(hparams.get("warmup", 0.0)) * cycle)), cycle - 1)
        schedule = optax.sgdr_schedule(
            [
                dict(init_value=0.0, peak_value=peak, warmup_steps=cycle_warmup, decay_steps=cycle, end_value=end)
                for _ in range(max(rounds, 1))
            ]
        )
    else:
        raise ValueError(f"unknown schedule {schedule_name!r}")
    steps = jnp.arange(total_steps)
    return np.asarray(jax.vmap(schedule)(steps), dtype=np.float32)
