"""Throttled training progress inside a generation: the throttle's rule, and a
real iteration reporting TrainingProgress without changing what it trains."""

from __future__ import annotations

import dataclasses
import threading

from evolve import events as ev
from evolve.search import iteration
from evolve.search.budget import EXTENSION, search_plan
from evolve.types import SearchBudget
from tests.search.test_iteration import _data, _engine


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_throttle_reports_at_most_once_per_interval_and_the_last_step_once_it_reported():
    clock = Clock()
    throttle = iteration.ProgressThrottle(2.0, clock)
    due = []
    for step in range(1, 11):  # 0.5 s per step, 10 steps
        clock.now += 0.5
        due.append(throttle.due(step, 10))
    assert [s for s, d in zip(range(1, 11), due) if d] == [4, 8, 10]
    assert throttle.elapsed() == 5.0
    quick = iteration.ProgressThrottle(2.0, clock)
    assert not any(quick.due(step, 3) for step in (1, 2, 3)), "a generation shorter than the interval stays quiet"


def untimed(event: ev.Event) -> ev.Event:
    """An event without its measured durations (they differ from run to run)."""
    if isinstance(event, ev.CandidateScored):
        return dataclasses.replace(event, train_seconds=0.0, compile_seconds=0.0)
    if isinstance(event, ev.SearchStarted):
        return dataclasses.replace(event, probes=tuple(dataclasses.replace(p, seconds=0.0) for p in event.probes))
    return event


def _run(progress_seconds: float) -> list[ev.Event]:
    engine = _engine()
    data = _data()
    plan = search_plan(engine.system.config, SearchBudget(generations=2, candidates_per_generation=2, train_rounds=2,
                                                           examples_per_round=64),
                       kind=EXTENSION, train_examples=len(data.train), validation_examples=len(data.validation))
    seen: list[ev.Event] = []
    iteration.TaskIteration(engine.system, threading.RLock(), "t", data, plan, seed=3, devices=engine.devices,
                            emit=seen.append, progress_seconds=progress_seconds).run()
    return seen


def test_a_search_reports_progress_per_step_and_trains_exactly_as_without_it():
    reported = _run(0.0)  # every step due
    quiet = _run(3600.0)
    progress = [e for e in reported if isinstance(e, ev.TrainingProgress)]
    assert not any(isinstance(e, ev.TrainingProgress) for e in quiet)
    steps = progress[0].steps
    assert steps > 1 and {e.steps for e in progress} == {steps}
    assert [(e.generation, e.step) for e in progress] == [(g, s) for g in range(2) for s in range(1, steps + 1)]
    assert all(e.candidates == 2 and e.generations == 2 and e.examples_per_second > 0 for e in progress)
    # The rest of the stream, scores and ids included, is what a search without progress reports.
    others = [untimed(e) for e in reported if not isinstance(e, ev.TrainingProgress)]
    assert others == [untimed(e) for e in quiet]
    first_progress = reported.index(progress[0])
    assert isinstance(reported[first_progress - 1], ev.GenerationStarted), "progress comes inside the generation"
