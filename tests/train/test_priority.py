"""Predict before training (evolve.train.priority): the rule, the loop's use
of it, and Engine.predict marking its calls."""

from __future__ import annotations

import dataclasses
import threading
import time

import jax
import numpy as np
import pytest

from evolve.data.bundled import bundled_task_specs
from evolve.engine import Engine, EngineOptions
from evolve.train import loop
from evolve.train.priority import ServingPriority
from evolve.types import PathStructure, SearchBudget
from tests.conftest import TEST_SIZE, tiny_config
from tests.train.test_train import SETTINGS, _data, _plan


def _hold_serving(priority: ServingPriority, seconds: float) -> threading.Thread:
    """A thread that keeps one Predict 'in flight' for `seconds`; returns once it holds it."""
    holding = threading.Event()

    def hold() -> None:
        with priority.serving():
            holding.set()
            time.sleep(seconds)

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    assert holding.wait(10)
    return thread


def test_idle_serving_costs_training_no_wait():
    priority = ServingPriority(quiet_seconds=0.0)
    assert priority.yield_to_serving() == 0.0
    assert priority.yields == 0


def test_training_waits_for_a_predict_in_flight_then_goes_on():
    priority = ServingPriority(quiet_seconds=0.0, max_wait_seconds=10.0)
    thread = _hold_serving(priority, 0.3)
    waited = priority.yield_to_serving()
    thread.join()
    assert 0.2 <= waited < 5.0
    assert priority.in_flight() == 0 and priority.yields == 1


def test_a_wait_is_bounded_so_constant_traffic_never_stops_training():
    priority = ServingPriority(quiet_seconds=0.0, max_wait_seconds=0.05)
    thread = _hold_serving(priority, 2.0)
    started = time.monotonic()
    waits = [priority.yield_to_serving() for _ in range(3)]
    assert time.monotonic() - started < 1.5  # three bounded waits, not the 2 s hold
    assert all(0.04 <= w < 0.5 for w in waits)
    thread.join()


def test_training_waits_the_quiet_period_after_a_call_for_the_next_one():
    priority = ServingPriority(quiet_seconds=0.2, max_wait_seconds=10.0)
    with priority.serving():
        pass
    waited = priority.yield_to_serving()
    assert 0.1 <= waited < 5.0
    time.sleep(0.25)
    assert priority.yield_to_serving() == 0.0


def test_disabled_priority_never_waits():
    priority = ServingPriority(max_wait_seconds=0.0)
    thread = _hold_serving(priority, 0.5)
    assert priority.yield_to_serving() == 0.0
    thread.join()


def test_negative_bounds_are_refused():
    with pytest.raises(ValueError, match="max_wait_seconds"):
        ServingPriority(max_wait_seconds=-1)


def test_yielding_every_step_trains_exactly_the_same_parameters():
    structure = PathStructure(TEST_SIZE, 2, 16, 3)
    names = {"head", "encoder_norm", "encoderblock_1"}
    alone = loop.train_candidates([_plan(structure, names, 3)], _data(), SETTINGS, {}, seed=7)[0]
    priority = ServingPriority(quiet_seconds=0.0, max_wait_seconds=0.002)
    thread = _hold_serving(priority, 30.0)
    yielding = loop.train_candidates([_plan(structure, names, 3)], _data(), SETTINGS, {}, seed=7,
                                     priority=priority)[0]
    steps_taken = SETTINGS.steps_per_round * SETTINGS.rounds
    assert priority.yields == steps_taken  # every step waited for the Predict in flight
    assert yielding.steps == alone.steps == steps_taken
    assert yielding.quality == alone.quality
    for name in names:
        for a, b in zip(jax.tree.leaves(alone.trainable[name]), jax.tree.leaves(yielding.trainable[name])):
            np.testing.assert_array_equal(a, b)
    del thread  # a daemon; it ends with the test process at the latest


def test_engine_predict_is_marked_in_flight_while_it_computes(monkeypatch):
    engine = Engine.create(tiny_config(generations=1, candidates_per_generation=1))
    spec = dataclasses.replace(bundled_task_specs()[0],
                               budget=SearchBudget(train_rounds=1, examples_per_round=64))
    engine.add_task(spec)
    engine.run_search(spec.name)
    seen = []
    real = engine._run_predict

    def spy(served, padded):
        seen.append(engine.priority.in_flight())
        return real(served, padded)

    monkeypatch.setattr(engine, "_run_predict", spy)
    engine.predict(spec.name, np.zeros((2, 8, 8, 3), np.uint8))
    assert seen == [1] and engine.priority.in_flight() == 0


def test_engine_options_turn_the_priority_off():
    engine = Engine.create(tiny_config(), options=EngineOptions(serving_max_yield_seconds=0.0))
    assert not engine.priority.enabled
    assert Engine.create(tiny_config()).priority.max_wait_seconds == EngineOptions().serving_max_yield_seconds


def test_the_server_flag_and_variable_reach_the_options(monkeypatch):
    import argparse  # pylint: disable=import-outside-toplevel

    from service import server  # pylint: disable=import-outside-toplevel

    parser = server.add_serve_arguments(argparse.ArgumentParser())
    assert server.options_from_args(parser.parse_args([])).serving_max_yield_ms == 50.0
    assert server.options_from_args(parser.parse_args(["--serving-max-yield-ms", "0"])).serving_max_yield_ms == 0
    monkeypatch.setenv("EVOLVE_SERVING_MAX_YIELD_MS", "7.5")
    parser = server.add_serve_arguments(argparse.ArgumentParser())
    assert server.options_from_args(parser.parse_args([])).serving_max_yield_ms == 7.5
    with pytest.raises(ValueError, match="--serving-max-yield-ms"):
        server.options_from_args(parser.parse_args(["--serving-max-yield-ms", "-1"]))
