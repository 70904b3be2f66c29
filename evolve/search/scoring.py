"""Score = quality x s^(P / P_ref) x s^(F / F_ref) (DESIGN.md §3.5)."""

from __future__ import annotations

from typing import Iterable

from evolve.config import SearchConfig
from evolve.types import Component


def accounted_params(components: Iterable[Component], task: str) -> float:
    """Parameters of a path, each shared component divided among its lockers.

    A component counts params / (number of OTHER tasks that lock it + 1): the
    path itself is the +1, so re-scoring a task's own locked path does not
    count that task twice. Recomputed at every scoring since sharing changes.
    """
    total = 0.0
    for component in components:
        sharers = len(component.locked_by - {task}) + 1
        total += component.num_params / sharers
    return total


def score(quality: float, params: float, flops: float, config: SearchConfig) -> float:
    s = config.scale_factor
    return quality * s ** (params / config.params_ref) * s ** (flops / config.flops_ref)
