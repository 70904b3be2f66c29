"""What one task iteration will spend, in words a user can check (DESIGN §3.4, §3.6)."""

from __future__ import annotations

import dataclasses
import math

from evolve.config import SearchConfig
from evolve.train.loop import halving_rounds
from evolve.types import SearchBudget

EXTENSION = "extension"
GENERALIZATION = "generalization"


@dataclasses.dataclass(frozen=True)
class SearchPlan:
    """The budget of one search, fixed before it runs."""

    kind: str  # EXTENSION or GENERALIZATION
    generations: int
    candidates_per_generation: int
    rounds: int  # validations per candidate
    examples_per_round: int  # training examples between two validations
    batch_size: int
    train_examples: int  # size of the task's training split
    validation_examples: int  # examples candidates are ranked on
    # The first generation of an extension search may train more candidates:
    # one per probe-chosen parent and the fine-tune of the best-probing one.
    first_generation_candidates: int = 0  # 0: candidates_per_generation
    halving_round: int = 0  # successive halving after this many rounds; 0: off

    def candidates_in(self, generation: int) -> int:
        if generation == 0 and self.first_generation_candidates:
            return self.first_generation_candidates
        return self.candidates_per_generation

    @property
    def steps_per_round(self) -> int:
        return math.ceil(self.examples_per_round / self.batch_size)

    @property
    def steps_per_candidate(self) -> int:
        return self.rounds * self.steps_per_round

    @property
    def examples_per_candidate(self) -> int:
        return self.steps_per_candidate * self.batch_size

    def halving_in(self, generation: int) -> tuple[int, int]:
        """(round after which the worse half of the generation's candidates
        stops, 0 for none; the rounds a survivor trains)."""
        return halving_rounds(self.rounds, self.halving_round, self.candidates_in(generation))

    @property
    def candidates(self) -> int:
        return sum(self.candidates_in(g) for g in range(self.generations))

    @property
    def epochs_per_candidate(self) -> float:
        return self.examples_per_candidate / max(self.train_examples, 1)

    def describe(self) -> str:
        first = self.candidates_in(0)
        if self.generations and first != self.candidates_per_generation:
            shape = (f"{self.generations} generations, {first} candidates in the first and "
                     f"{self.candidates_per_generation} in each later one")
        else:
            shape = f"{self.generations} generations x {self.candidates_per_generation} candidates"
        return (
            f"{shape}; each candidate "
            f"trains {self.steps_per_candidate} steps of {self.batch_size} "
            f"({self.examples_per_candidate} examples, {self.epochs_per_candidate:.1f} epochs of "
            f"{self.train_examples} training images) and is validated {self.rounds} times on "
            f"{self.validation_examples} images"
            + self._halving_clause()
        )

    def _halving_clause(self) -> str:
        halving, survivor = self.halving_in(1 if self.generations > 1 else 0)
        if not halving:
            return ""
        return (f"; after {halving} validations only the better half trains on, for the rounds the others "
                f"give up ({survivor} validations, {survivor * self.steps_per_round} steps in all)")


def search_plan(
    config: SearchConfig,
    budget: SearchBudget,
    *,
    kind: str,
    train_examples: int,
    validation_examples: int,
    num_devices: int = 1,
) -> SearchPlan:
    """The task's budget overrides, else the configuration's.

    Without an override a generation trains at least one candidate per
    device, rounded up to whole devices (DESIGN §3.6). The first generation
    of an extension search trains at least two when the configuration
    fine-tunes there (`finetune_first_candidate`): one that shares the
    best-probing parent's components and one that fine-tunes them all.
    """
    candidates = budget.candidates_per_generation
    if not candidates:
        devices = max(num_devices, 1)
        candidates = devices * math.ceil(max(config.candidates_per_generation, devices) / devices)
    first = 0
    if kind == EXTENSION and config.finetune_first_candidate and candidates < 2:
        first = 2
    return SearchPlan(
        kind=kind,
        generations=budget.generations or config.generations,
        candidates_per_generation=candidates,
        rounds=budget.train_rounds or config.train_rounds,
        examples_per_round=budget.examples_per_round or config.examples_per_round,
        batch_size=config.batch_size,
        train_examples=train_examples,
        validation_examples=min(validation_examples, config.validation_examples),
        first_generation_candidates=first,
        halving_round=config.halving_round,
    )
