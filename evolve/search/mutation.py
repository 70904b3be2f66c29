"""Mutation of a parent path into a child draft (DESIGN.md §3.2).

Every action instance has a learned probability `_mu_|<action>` stored in
the path's hyperparameters; children inherit them, so the search learns
which actions pay off.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Literal, Mapping, Sequence

import numpy as np

from evolve.config import DATA_HPARAMS, GLOBAL_MU, MU_VALUES, SearchConfig, is_learned_mu, mu_key
from evolve.types import Component, HyperValue, Path

# How a child obtains a component's initial parameters:
#   frozen: shares the component as it is (never trained);
#   train:  a trainable copy of the component (posembed resized if needed);
#   new:    random initialisation, trainable.
Mode = Literal["frozen", "train", "new"]


@dataclasses.dataclass(frozen=True)
class ComponentSource:
    mode: Mode
    component_id: str | None = None


@dataclasses.dataclass
class ChildDraft:
    parent_id: str
    hparams: dict[str, HyperValue]
    sources: dict[str, ComponentSource]  # forward order
    mutations: list[str]
    # Blocks the child does not run, resolved along its lineage now, so that a
    # later re-added block still finds its closest ancestor's component after
    # the ancestors themselves are garbage-collected (DESIGN §3.2).
    inherited: dict[str, str] = dataclasses.field(default_factory=dict)


def _nearest_index(grid: Sequence, value) -> int:
    if value in grid:
        return list(grid).index(value)
    return int(np.argmin([abs(float(g) - float(value)) for g in grid]))


def grid_step(grid: Sequence, value, rng: np.random.Generator):
    """One step up or down the grid from value (clamped at the ends)."""
    index = _nearest_index(grid, value) + (1 if rng.random() < 0.5 else -1)
    return grid[min(max(index, 0), len(grid) - 1)]


def action_fires(hparams: dict[str, HyperValue], action: str, rng: np.random.Generator) -> bool:
    """Learned-mu rule: the action's own mu first moves with probability _mu_,
    then the action fires with probability mu. Updates hparams in place."""
    key = mu_key(action)
    global_mu = float(hparams[GLOBAL_MU])
    mu = float(hparams.get(key, global_mu))
    if rng.random() < global_mu:
        mu = float(grid_step(MU_VALUES, mu, rng))
    hparams[key] = mu
    return bool(rng.random() < mu)


def resolve(name: str, lineage: Sequence[Path]) -> str | None:
    """Component id of `name` in the closest path of the lineage that has it
    (its own components first, then the blocks it inherited unused)."""
    for path in lineage:
        if name in path.components:
            return path.components[name]
        if name in path.inherited:
            return path.inherited[name]
    return None


def _mutate_hparams(
    hparams: dict[str, HyperValue], config: SearchConfig, has_adapters: bool, rng: np.random.Generator
) -> list[str]:
    mutations = []
    for name, grid in config.hparam_grids().items():
        if name in DATA_HPARAMS or (name == "adapter_dim" and has_adapters):
            continue  # data hparams are sampled per generation; one adapter dim per path
        if action_fires(hparams, f"hp:{name}", rng):
            new_value = grid_step(grid, hparams[name], rng)
            if new_value != hparams[name]:
                hparams[name] = new_value
                mutations.append(f"hp:{name}={new_value}")
    return mutations


def _child_names(
    parent: Path, hparams: dict[str, HyperValue], config: SearchConfig, rng: np.random.Generator
) -> tuple[list[str], set[str], list[str]]:
    """Component names of the child, the adapters it adds, and the mutations."""
    mutations = []
    num_layers = parent.num_layers()
    if action_fires(hparams, "hp:num_layers", rng):
        proposed = min(max(num_layers + (1 if rng.random() < 0.5 else -1), 0), config.layer_limit)
        if proposed != num_layers:
            mutations.append(f"hp:num_layers={proposed}")
            num_layers = proposed
    adapters = {i for i in parent.adapter_layers() if i < num_layers}
    added = set()
    if config.adapters:
        for i in range(num_layers):
            if i not in adapters and action_fires(hparams, f"add:residual_adapter_{i}", rng):
                adapters.add(i)
                added.add(f"residual_adapter_{i}")
                mutations.append(f"add:residual_adapter_{i}")
    names = ["embedding", "cls", "posembed_input"]
    for i in range(num_layers):
        if i in adapters:
            names.append(f"residual_adapter_{i}")
        names.append(f"encoderblock_{i}")
    names += ["encoder_norm", "head"]
    return names, added, mutations


def mutate(
    parent: Path,
    task: str,
    *,
    lineage: Sequence[Path],
    component: Callable[[str], Component],
    config: SearchConfig,
    rng: np.random.Generator,
) -> ChildDraft:
    """Draws a child of `parent` for `task`.

    `lineage` is the parent followed by its live ancestors and finally the
    root path; names are resolved along it.
    """
    hparams = dict(parent.hparams)
    mutations = _mutate_hparams(hparams, config, bool(parent.adapter_layers()), rng)
    names, added_adapters, structural = _child_names(parent, hparams, config, rng)
    mutations += structural
    image_size_changed = hparams["image_size"] != parent.hparams.get("image_size")
    same_task = parent.task == task
    sources: dict[str, ComponentSource] = {}
    for name in names:
        component_id = None if name in added_adapters else resolve(name, lineage)
        if component_id is None or (name == "head" and not same_task):
            sources[name] = ComponentSource("new")
            continue
        found = component(component_id)
        owned_by_others = bool(found.locked_by - {task})
        must_train = (
            not found.trained
            or not owned_by_others
            or name == "encoder_norm"
            or (name == "posembed_input" and image_size_changed)
        )
        if must_train:
            sources[name] = ComponentSource("train", component_id)
        elif action_fires(hparams, f"clone:{name}", rng):
            sources[name] = ComponentSource("train", component_id)
            mutations.append(f"clone:{name}")
        else:
            sources[name] = ComponentSource("frozen", component_id)
    inherited = {}
    for i in range(sum(1 for n in names if n.startswith("encoderblock_")), config.layer_limit):
        component_id = resolve(f"encoderblock_{i}", lineage)
        if component_id is not None:
            inherited[f"encoderblock_{i}"] = component_id
    return ChildDraft(parent_id=parent.id, hparams=hparams, sources=sources, mutations=mutations, inherited=inherited)


def sample_data_hparams(
    base: Mapping[str, HyperValue], config: SearchConfig, rng: np.random.Generator
) -> dict[str, HyperValue]:
    """The generation's data hyperparameters, one mutation step from `base`.

    Returns the data hyperparameters and their learned mu values, to be
    copied into every candidate of the generation so they share batches.
    """
    hparams = dict(base)
    grids = config.hparam_grids()
    for name in DATA_HPARAMS:
        if name in grids and action_fires(hparams, f"hp:{name}", rng):
            hparams[name] = grid_step(grids[name], hparams[name], rng)
    keys = set(DATA_HPARAMS) | {mu_key(f"hp:{name}") for name in DATA_HPARAMS}
    return {k: v for k, v in hparams.items() if k in keys}


def learned_mu(hparams: Mapping[str, HyperValue]) -> tuple[tuple[str, float], ...]:
    """A path's learned mutation probabilities, sorted by key."""
    return tuple(sorted((k, float(v)) for k, v in hparams.items() if is_learned_mu(k)))
