"""Parent selection (DESIGN.md §3.1)."""

from __future__ import annotations

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
