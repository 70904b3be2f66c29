"""Typed events the engine reports while it searches (DESIGN.md §6)."""

from __future__ import annotations

import dataclasses
from typing import Callable, Union

from evolve.search.budget import SearchPlan
from evolve.types import ParentProbe


@dataclasses.dataclass(frozen=True)
class SearchStarted:
    """A search fixed its budget and, for a new task, probed its first parents."""

    task: str
    plan: SearchPlan
    probes: tuple[ParentProbe, ...] = ()


@dataclasses.dataclass(frozen=True)
class GenerationStarted:
    task: str
    generation: int
    generations: int
    candidates: int


@dataclasses.dataclass(frozen=True)
class CandidateScored:
    task: str
    path_id: str
    parent_id: str
    parent_task: str
    generation: int
    score: float
    quality: float
    params: float
    flops: float
    mutations: tuple[str, ...]
    accepted_into_population: bool
    train_seconds: float
    compile_seconds: float
    # The candidate's learned mutation probabilities (its "_mu_" and
    # "_mu_|<action>" hyperparameters), sorted by key.
    learned_mu: tuple[tuple[str, float], ...] = ()


@dataclasses.dataclass(frozen=True)
class CandidateAccepted:
    task: str
    path_id: str
    score: float
    quality: float


@dataclasses.dataclass(frozen=True)
class SearchFinished:
    task: str
    path_id: str
    score: float
    quality: float
    test_accuracy: float
    state: str  # SUCCEEDED, FAILED or CANCELLED
    message: str = ""


@dataclasses.dataclass(frozen=True)
class CheckpointWritten:
    task: str
    step: int
    directory: str
    new_components: int


@dataclasses.dataclass(frozen=True)
class TrainingProgress:
    """Training inside a generation moved on (throttled: at most one every few
    seconds per search). The generation's candidates train in lockstep, so
    `step` counts for every one of them. Transient: shown live, never saved
    with a checkpoint (see TRANSIENT_EVENTS)."""

    task: str
    generation: int  # 0-based, as GenerationStarted
    generations: int
    candidates: int
    step: int  # training steps done by each candidate of the generation
    steps: int  # training steps per candidate
    examples_per_second: float  # training examples of all candidates per second, this generation so far


Event = Union[
    SearchStarted, GenerationStarted, CandidateScored, CandidateAccepted, SearchFinished, CheckpointWritten,
    TrainingProgress,
]

# Kinds that are high-volume and only of interest while they happen: kept for
# live streams, left out of the event history saved with checkpoints.
TRANSIENT_EVENTS: tuple[type, ...] = (TrainingProgress,)
EventCallback = Callable[[Event], None]
