"""One task iteration (DESIGN §3, §3b): select -> mutate -> plan -> train -> adopt -> prune.

The engine owns the System and its lock. An iteration takes that lock only
to read or change the System (drafting children, adopting results, pruning);
planning (initial parameters, the FLOPs compile) and training run outside
it, on components captured under the lock. Components are immutable, so a
captured one stays valid even if the System drops it meanwhile.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from typing import Any, Callable, ContextManager, Mapping, Sequence

import jax
import numpy as np

from evolve.config import SearchConfig
from evolve.data import ImageSet, TaskData
from evolve.errors import CancelledError
from evolve.events import (
    CandidateAccepted, CandidateScored, EventCallback, GenerationStarted, SearchStarted, TrainingProgress,
)
from evolve.models import cost, vit
from evolve.search import mutation, probe, scoring, selection
from evolve.search.budget import EXTENSION, SearchPlan
from evolve.system import System
from evolve.train import loop
from evolve.train.priority import NO_PRIORITY, ServingPriority
from evolve.types import Component, Path, PathStructure, adapter_index, count_params

logger = logging.getLogger(__name__)


def structure_of(config: SearchConfig, num_classes: int, hparams: Mapping[str, Any], names: Sequence[str]) -> PathStructure:
    """The static structure of a path with these component names."""
    return PathStructure(
        size=config.size,
        num_layers=sum(1 for n in names if n.startswith("encoderblock_")),
        image_size=int(hparams["image_size"]),
        num_classes=num_classes,
        adapter_layers=tuple(sorted(adapter_index(n) for n in names if n.startswith("residual_adapter_"))),
        adapter_dim=int(hparams["adapter_dim"]),
        compute_dtype=config.compute_dtype,
        remat=config.remat,
        momentum_dtype=config.momentum_dtype,
    )


def ranking_validation(validation: ImageSet, max_examples: int, seed: int = 0) -> ImageSet:
    """The validation examples candidates are ranked on: all, or a fixed subset."""
    if len(validation) <= max_examples:
        return validation
    keep = np.random.default_rng(seed).choice(len(validation), size=max_examples, replace=False)
    return validation.take(np.sort(keep))


def parent_start_score(parent: Path, task: str) -> float:
    """A child must reach its same-task parent's score; another task's parent sets no bar."""
    return parent.score if (parent.task == task and parent.score is not None) else -math.inf


def generation_data_hparams(
    population: Sequence[Path], config: SearchConfig, rng: np.random.Generator
) -> dict[str, Any]:
    """The generation's data hyperparameters: one mutation step from the best
    path of T's live population, or from the defaults (DESIGN §3.3, §3b)."""
    ranked = selection.prune(population, 1)
    base = ranked[0].hparams if ranked else config.default_hparams()
    return mutation.sample_data_hparams(base, config, rng)


PROGRESS_SECONDS = 2.0  # at most one TrainingProgress event this often per search


class ProgressThrottle:
    """Says whether a progress report is due: at most one per `interval`
    seconds, the first one `interval` after `start`, and always the last step
    of a generation that has already reported (so a shown count reaches its total)."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic):
        self.interval = interval
        self.clock = clock
        self.started = clock()
        self._last = self.started
        self._reported = False

    def due(self, step: int, steps: int) -> bool:
        now = self.clock()
        if now - self._last >= self.interval or (self._reported and step >= steps):
            self._last, self._reported = now, True
            return True
        return False

    def elapsed(self) -> float:
        return self.clock() - self.started


@dataclasses.dataclass
class Draft:
    """A child draft with everything planning needs, captured under the lock."""

    child: mutation.ChildDraft
    parent_task: str
    start_score: float
    components: dict[str, Component]  # component id -> component, for every sourced name


@dataclasses.dataclass
class Planned:
    draft: Draft
    plan: loop.CandidatePlan
    params: float  # accounted parameters
    flops: float


class TaskIteration:
    """One extension or generalization search of one task."""

    def __init__(
        self,
        system: System,
        lock: ContextManager,
        task: str,
        data: TaskData,
        plan: SearchPlan,
        *,
        seed: int,
        devices: Sequence[jax.Device],
        emit: EventCallback,
        cancel: threading.Event | None = None,
        progress_seconds: float = PROGRESS_SECONDS,
        priority: ServingPriority = NO_PRIORITY,
    ):
        self.system = system
        self.lock = lock
        self.task = task
        self.config = system.config
        self.num_classes = system.tasks[task].num_classes
        self.data = dataclasses.replace(
            data, validation=ranking_validation(data.validation, plan.validation_examples)
        )
        self.plan = plan
        self.seed = seed
        self.devices = list(devices)
        self.emit = emit
        self.cancel = cancel
        self.progress_seconds = progress_seconds
        self.priority = priority
        self.probes: list[probe.ParentProbe] = []

    # ---- the loop ------------------------------------------------------

    def run(self) -> list[Path]:
        """Runs every generation; returns the final population, best first."""
        with self.lock:
            population = self._start_population()
        first_parents: list[str] = []
        if self.plan.kind == EXTENSION and not population:
            self.probes = self._probe()
            first_parents = probe.first_parent_ids(self.probes)
        self.emit(SearchStarted(self.task, self.plan, tuple(self.probes)))
        leader_id = population[0].id if population else None
        for generation in range(self.plan.generations):
            self._check_cancel()
            count = self.plan.candidates_in(generation)
            self.emit(GenerationStarted(self.task, generation, self.plan.generations, count))
            rng = np.random.default_rng([self.seed, generation])
            with self.lock:
                data_hparams = generation_data_hparams(population, self.config, rng)
                parents = first_parents if generation == 0 and first_parents else []
                drafts = [
                    self._draft(population, data_hparams, rng, parents[i] if i < len(parents) else None,
                                clone_all=bool(parents) and self.config.finetune_first_candidate and i == count - 1)
                    for i in range(count)
                ]
            planned = []
            for draft in drafts:  # each plan may compile (FLOPs): a drain must not wait for all of them
                self._check_cancel()
                planned.append(self._plan(draft, rng))
            results = loop.train_candidates(
                [p.plan for p in planned], self.data, self._train_settings(), data_hparams,
                seed=int(rng.integers(2**31)), devices=self.devices, cancel=self.cancel,
                on_step=self._progress_reporter(generation, len(planned)), priority=self.priority,
            )
            self._check_cancel()
            with self.lock:
                population = self._adopt_all(population, planned, results, generation)
            if population and population[0].id != leader_id:
                leader = population[0]
                leader_id = leader.id
                self.emit(CandidateAccepted(self.task, leader.id, leader.score or 0.0, leader.quality or 0.0))
        return population

    def _progress_reporter(self, generation: int, candidates: int) -> Callable[[int, int, int], None]:
        """A train_candidates step callback emitting throttled TrainingProgress events."""
        throttle = ProgressThrottle(self.progress_seconds)

        def report(step: int, steps: int, examples: int) -> None:
            if throttle.due(step, steps):
                rate = examples / max(throttle.elapsed(), 1e-9)
                self.emit(TrainingProgress(self.task, generation, self.plan.generations, candidates, step, steps,
                                           round(rate, 1)))

        return report

    def _check_cancel(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise CancelledError("search cancelled")

    def _train_settings(self) -> loop.TrainSettings:
        return loop.TrainSettings(
            batch_size=self.plan.batch_size, rounds=self.plan.rounds,
            examples_per_round=self.plan.examples_per_round, eval_batch_size=self.config.eval_batch_size,
            halving_round=self.plan.halving_round,
        )

    # ---- select and mutate (under the lock) -----------------------------

    def _start_population(self) -> list[Path]:
        """A generalization search starts from the served path, re-scored with
        today's sharing; an extension search from nothing."""
        best = self.system.best_path(self.task)
        if best is None:
            return []
        best.accounted_params = scoring.accounted_params(self.system.path_components(best), self.task)
        best.score = scoring.score(best.quality or 0.0, best.accounted_params, best.flops or 0.0, self.config)
        return [best]

    def _draft(
        self, population: list[Path], data_hparams: Mapping[str, Any], rng: np.random.Generator,
        parent_id: str | None, clone_all: bool = False,
    ) -> Draft:
        if parent_id is not None:
            parent = self.system.paths[parent_id]
        else:
            parent = selection.select_parent(population, self.system.selectable_paths(self.task), rng)
        if parent.task == self.task:
            parent.children += 1  # k of 0.5^k counts children of T's own paths only
        child = mutation.mutate(
            parent, self.task, lineage=self.system.lineage(parent),
            component=self.system.components.__getitem__, config=self.config, rng=rng,
        )
        child.hparams.update(data_hparams)
        if clone_all:
            frozen = [name for name, source in child.sources.items() if source.mode == "frozen"]
            for name in frozen:
                child.sources[name] = mutation.ComponentSource("train", child.sources[name].component_id)
            child.mutations.append("clone:all")
        used = {s.component_id for s in child.sources.values() if s.component_id is not None}
        # Copies keep sharing (locked_by) as it stands when drafted: accounted parameters use it.
        components = {cid: dataclasses.replace(self.system.components[cid]) for cid in used}
        return Draft(child, parent.task, parent_start_score(parent, self.task), components)

    # ---- plan (outside the lock) ---------------------------------------

    def _plan(self, draft: Draft, rng: np.random.Generator) -> Planned:
        """Initial parameters of a draft's components (frozen, copied or new),
        and its accounted parameters and FLOPs."""
        child = draft.child
        structure = structure_of(self.config, self.num_classes, child.hparams, list(child.sources))
        expected = cost.abstract_params(structure)
        trainable, frozen, momentum, frozen_ids = {}, {}, {}, {}
        keys = jax.random.split(jax.random.key(int(rng.integers(2**31))), len(child.sources))
        for key, (name, source) in zip(keys, child.sources.items()):
            component = draft.components[source.component_id] if source.component_id is not None else None
            if component is None:
                params = vit.init_component(
                    name, size=structure.size, image_size=structure.image_size,
                    num_classes=structure.num_classes, adapter_dim=structure.adapter_dim, rng=key,
                )
            else:
                params = component.params
                if name == "posembed_input":
                    tokens = vit.num_tokens(structure.size, structure.image_size)
                    if params["pos_embedding"].shape[1] != tokens:
                        params = {"pos_embedding": vit.resize_posembed(params["pos_embedding"], tokens)}
                        source = mutation.ComponentSource("train", source.component_id)
                        child.sources[name] = source
                check_shapes(component, params, expected[name])
            if source.mode == "frozen":
                frozen[name] = params
                frozen_ids[name] = source.component_id
            else:
                trainable[name] = params
                inherited = component.momentum if component is not None else None
                if inherited is not None and same_shapes(inherited, params):
                    momentum[name] = inherited
        accounted = scoring.accounted_params([draft.components[i] for i in frozen_ids.values()], self.task)
        accounted += sum(count_params(p) for p in trainable.values())
        flops = cost.forward_flops(structure)
        config = self.config
        plan = loop.CandidatePlan(
            structure=structure, trainable=trainable, frozen=frozen, momentum=momentum, hparams=child.hparams,
            start_score=draft.start_score,
            score_of_quality=lambda q: scoring.score(q, accounted, flops, config),
            frozen_ids=frozen_ids,
        )
        return Planned(draft, plan, accounted, flops)

    # ---- adopt and prune (under the lock) ---------------------------------

    def _adopt_all(
        self, population: list[Path], planned: Sequence[Planned], results: Sequence[loop.TrainResult],
        generation: int,
    ) -> list[Path]:
        for item, result in zip(planned, results):
            child = self._adopt(item, result, generation)
            if child is not None:
                population.append(child)
            quality = max(result.quality, 0.0)  # the candidate's own, not the bar it had to reach
            self.emit(CandidateScored(
                self.task, child.id if child else "", item.draft.child.parent_id, item.draft.parent_task,
                generation, item.plan.score_of_quality(quality), quality, item.params, item.flops,
                tuple(item.draft.child.mutations), child is not None,
                train_seconds=result.train_seconds, compile_seconds=result.compile_seconds,
                learned_mu=mutation.learned_mu(item.draft.child.hparams),
            ))
        population = selection.prune(population, self.config.population_size)
        self.system.populations[self.task] = [p.id for p in population]
        self.system.collect_garbage()
        loop.RESIDENT.retain(c.params for c in self.system.components.values())
        return population

    def _adopt(self, item: Planned, result: loop.TrainResult, generation: int) -> Path | None:
        """A trained candidate as a population path, or None when it never
        reached its parent's score (ties are accepted, DESIGN §3.5)."""
        if result.trainable is None:
            return None
        draft = item.draft.child
        components = {}
        for name, source in draft.sources.items():
            if source.mode == "frozen":
                components[name] = source.component_id
                continue
            component = Component(
                id=self.system.new_id("c"), name=name, params=result.trainable[name], origin=self.task,
                trained=True, momentum=result.momentum[name] if result.momentum else None,
            )
            self.system.components[component.id] = component
            components[name] = component.id
        inherited = {n: i for n, i in draft.inherited.items() if i in self.system.components}
        child = Path(
            id=self.system.new_id("p"), task=self.task, components=components, hparams=dict(draft.hparams),
            parent_id=draft.parent_id, score=result.score, quality=result.quality,
            accounted_params=item.params, flops=item.flops, mutations=tuple(draft.mutations),
            generation=generation, inherited=inherited,
        )
        self.system.paths[child.id] = child
        return child

    # ---- transfer-aware first parents ---------------------------------------

    def _probe(self) -> list[probe.ParentProbe]:
        """Probes the root and every served path on this task (DESIGN §3b)."""
        with self.lock:
            targets = []
            for path in self.system.selectable_paths():
                body = {n: self.system.components[i].params for n, i in path.components.items() if n != "head"}
                structure = structure_of(self.config, 1, path.hparams, list(path.components))
                targets.append(probe.ProbeTarget(path.id, path.task, structure, body))
        train = self.data.train
        sample = np.random.default_rng([self.seed, 7]).permutation(len(train))[: self.config.probe_examples]
        sample = np.sort(sample)
        probes = probe.probe_paths(
            targets, (train.images[sample], train.labels[sample]),
            (self.data.validation.images, self.data.validation.labels), self.num_classes,
            batch_size=min(self.config.eval_batch_size, 256), device=self.devices[0],
        )
        chosen = probe.choose_first_parents(probes, self.plan.candidates_in(0), self.config.probe_tolerance)
        for p in chosen:
            logger.info("task %s: probe of %s (%s) %.3f in %.2fs%s", self.task, p.path_id, p.task, p.accuracy,
                        p.seconds, f"; parent of {p.chosen}: {p.reason}" if p.chosen else "")
        return chosen


def check_shapes(component: Component, params: Any, expected: Any) -> None:
    """A component that does not fit the structure is a bug, never silently replaced."""
    if not same_shapes(params, expected):
        raise ValueError(
            f"component {component.id} ({component.name}) has shapes {jax.tree.map(np.shape, params)}, "
            f"the path needs {jax.tree.map(lambda s: tuple(s.shape), expected)}"
        )


def same_shapes(params: Any, expected: Any) -> bool:
    try:
        shapes = jax.tree.map(np.shape, params)
        wanted = jax.tree.map(lambda s: tuple(s.shape), expected)
    except Exception:
        return False
    return jax.tree.structure(shapes) == jax.tree.structure(wanted) and jax.tree.leaves(shapes) == jax.tree.leaves(wanted)
