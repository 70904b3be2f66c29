"""Transfer-aware first parents (DESIGN §3b).

Before an extension search trains anything, every served path (and the
root) is probed on the new task: its frozen body runs once over a sample of
the training split, a closed-form ridge readout is fitted on those features
and scored on the validation split. The first generation's parents are the
best-probing paths; from then on the 0.5^k walk of §3.1 applies.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from evolve.data import preprocess_eval
from evolve.models import vit
from evolve.train import steps
from evolve.types import ParentProbe, Params, PathStructure

# Ridge strengths tried per path, relative to the mean feature energy; the
# best on validation is the path's probe score (cheap: one eigendecomposition).
RIDGE_STRENGTHS = (1e-3, 1e-1, 10.0)


@dataclasses.dataclass(frozen=True)
class ProbeTarget:
    """A path to probe, captured under the engine's lock."""

    path_id: str
    task: str
    structure: PathStructure
    params: Mapping[str, Params]  # the body's components (no head needed)


# Bounded like the train steps (each served structure compiles its own).
@steps.bounded_jit(steps.TRAINING, static_argnames=("structure",), tree_argnums=(0,), images_argnum=1)
def _features(params: Mapping[str, Params], images: jax.Array, *, structure: PathStructure) -> jax.Array:
    return vit.encode(params, images, structure)


def body_features(
    params: Mapping[str, Params], images: np.ndarray, structure: PathStructure, batch_size: int,
    device: jax.Device | None = None,
) -> np.ndarray:
    """Features of uint8 images under a path's frozen body (params already on `device`)."""
    chunks = []
    for start in range(0, len(images), batch_size):
        batch = preprocess_eval(images[start : start + batch_size], structure.image_size)
        size = len(batch)
        if size < batch_size:  # one shape, one compile
            batch = np.concatenate([batch, np.zeros((batch_size - size,) + batch.shape[1:], batch.dtype)])
        out = _features(params, jax.device_put(batch, device), structure=structure)
        chunks.append(np.asarray(out)[:size])
    return np.concatenate(chunks).astype(np.float64)


def ridge_readout_accuracy(
    train_features: np.ndarray, train_labels: np.ndarray,
    validation_features: np.ndarray, validation_labels: np.ndarray, num_classes: int,
) -> float:
    """Validation accuracy of the best closed-form ridge readout (one-hot targets)."""
    mean = train_features.mean(axis=0)
    scale = train_features.std(axis=0) + 1e-6
    x = (train_features - mean) / scale
    v = (validation_features - mean) / scale
    targets = np.eye(num_classes)[train_labels] - 1.0 / num_classes
    eigenvalues, eigenvectors = np.linalg.eigh(x.T @ x)
    projected = eigenvectors.T @ (x.T @ targets)
    energy = max(float(eigenvalues.mean()), 1e-12)
    best = 0.0
    for strength in RIDGE_STRENGTHS:
        weights = eigenvectors @ (projected / (eigenvalues + strength * energy)[:, None])
        bias = targets.mean(axis=0)  # x is centred, so the intercept is the targets' mean
        predictions = np.argmax(v @ weights + bias, axis=1)
        best = max(best, float(np.mean(predictions == validation_labels)))
    return best


def probe_paths(
    targets: Sequence[ProbeTarget],
    train: tuple[np.ndarray, np.ndarray],
    validation: tuple[np.ndarray, np.ndarray],
    num_classes: int,
    *,
    batch_size: int,
    device: Any = None,
) -> list[ParentProbe]:
    """Probes every target; returns them best first (ties: the listed order)."""
    probes = []
    for target in targets:
        started = time.perf_counter()
        target = dataclasses.replace(target, params=jax.device_put(target.params, device))  # one upload
        train_x = body_features(target.params, train[0], target.structure, batch_size, device)
        validation_x = body_features(target.params, validation[0], target.structure, batch_size, device)
        accuracy = ridge_readout_accuracy(train_x, train[1], validation_x, validation[1], num_classes)
        probes.append(ParentProbe(target.path_id, target.task, accuracy, time.perf_counter() - started))
    order = sorted(range(len(probes)), key=lambda i: (-probes[i].accuracy, i))
    return [probes[i] for i in order]


def choose_first_parents(probes: Sequence[ParentProbe], candidates: int, tolerance: float) -> list[ParentProbe]:
    """Seeds the first generation: candidates go round-robin over the paths
    whose probe is within `tolerance` of the best, best first.

    Returns every probe with `chosen` and `reason` filled in, best first.
    """
    if not probes:
        return []
    best = probes[0].accuracy
    close = [p for p in probes if p.accuracy >= best - tolerance]
    counts = [0] * len(close)
    for i in range(candidates):
        counts[i % len(close)] += 1
    chosen = []
    for rank, probe in enumerate(probes):
        if rank < len(close) and counts[rank]:
            reason = "best probe" if rank == 0 else f"probe within {tolerance:g} of the best ({best:.3f})"
            chosen.append(dataclasses.replace(probe, chosen=counts[rank], reason=reason))
        elif rank < len(close):
            chosen.append(dataclasses.replace(probe, reason="close to the best probe, no candidate left"))
        else:
            chosen.append(dataclasses.replace(probe, reason=f"probe more than {tolerance:g} below the best"))
    return chosen


def first_parent_ids(probes: Sequence[ParentProbe]) -> list[str]:
    """The first generation's parents, one per candidate, best probe first."""
    return [p.path_id for p in probes for _ in range(p.chosen)]
