"""Parent selection (DESIGN.md §3.1)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from evolve.types import Path


def select_parent(population: Sequence[Path], all_paths: Sequence[Path], rng: np.random.Generator) -> Path:
    """Best-first walk accepting each path with probability 0.5^children.

    When no population member is accepted, picks uniformly among all paths of
    the system (the root included).
    """
    ranked = sorted(population, key=lambda p: (p.score if p.score is not None else -np.inf), reverse=True)
    for path in ranked:
        if rng.random() < 0.5 ** path.children:
            return path
    return all_paths[int(rng.integers(len(all_paths)))]


def prune(population: Sequence[Path], size: int) -> list[Path]:
    """The best `size` paths by score; ties go to the newest (highest generation)."""
    ranked = sorted(
        population,
        key=lambda p: (p.score if p.score is not None else -np.inf, p.generation),
        reverse=True,
    )
    return list(ranked[:size])


def quality_margin(quality: float, examples: int, z: float) -> float:
    """z binomial standard errors of a validation accuracy measured on
    `examples` images (at least one image's worth when quality is 0 or 1)."""
    variance = max(quality * (1.0 - quality), 1.0 / examples)
    return z * math.sqrt(variance / examples)


def final_choice(population: Sequence[Path], validation_examples: int, z: float) -> Path:
    """The path a search ends with (DESIGN §3b).

    With z = 0, the best by score. With z > 0, the one-standard-error rule:
    of the paths whose validation quality is within z standard errors of the
    best's, the one charged the fewest parameters (then the better, then the
    newer). A difference the validation split cannot tell from noise does not
    buy a larger model.
    """
    best = prune(population, 1)[0]
    if z <= 0 or best.quality is None or validation_examples <= 0:
        return best
    bar = best.quality - quality_margin(best.quality, validation_examples, z)
    close = [p for p in population if p.quality is not None and p.accounted_params is not None and p.quality >= bar]
    if not close:
        return best
    return min(close, key=lambda p: (p.accounted_params, -(p.quality or 0.0), -p.generation))
