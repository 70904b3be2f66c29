"""evolve.batching: concurrent calls of one key run as one compute call."""

from __future__ import annotations

import argparse
import dataclasses
import threading
import time

import numpy as np
import pytest

from evolve.batching import MicroBatcher
from evolve.data.bundled import bundled_task_specs
from evolve.engine import Engine, EngineOptions
from evolve.types import SearchBudget
from service import server
from tests.conftest import tiny_config


class Recorder:
    """A compute that records its inputs and can be held until released."""

    def __init__(self, hold_first: bool = False):
        self.inputs: list[np.ndarray] = []
        self.started = threading.Event()
        self.release = threading.Event()
        if not hold_first:
            self.release.set()

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        self.inputs.append(rows.copy())
        self.started.set()
        self.release.wait(10)
        return rows * 10


def _rows(value: int, n: int = 1) -> np.ndarray:
    return np.full((n, 2), value, np.int64)


def _call_in_threads(batcher, key, values, compute, results, errors=None):
    def call(value):
        try:
            results[value] = batcher.run(key, _rows(value, 1 + value % 3), compute)
        except Exception as error:  # noqa: BLE001
            if errors is None:
                raise
            errors[value] = error

    threads = [threading.Thread(target=call, args=(v,)) for v in values]
    for thread in threads:
        thread.start()
    return threads


def test_a_lone_call_runs_at_once_with_its_own_rows():
    batcher, compute = MicroBatcher(max_rows=8), Recorder()
    started = time.perf_counter()
    out = batcher.run("t", _rows(3, 2), compute)
    assert time.perf_counter() - started < 0.5
    np.testing.assert_array_equal(out, _rows(30, 2))
    assert len(compute.inputs) == 1 and batcher.stats().calls == 1


def test_calls_arriving_while_one_runs_join_one_batch_and_get_their_own_rows():
    batcher, compute = MicroBatcher(max_rows=64), Recorder(hold_first=True)
    results = {}
    first = _call_in_threads(batcher, "t", [0], compute, results)
    assert compute.started.wait(5)
    later = _call_in_threads(batcher, "t", [1, 2, 3, 4, 5], compute, results)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # all five queued behind the running call
        with batcher._lock:
            if batcher._open.get("t") is not None and len(batcher._open["t"].parts) == 5:
                break
        time.sleep(0.01)
    compute.release.set()
    for thread in first + later:
        thread.join(10)
    assert len(compute.inputs) == 2, "the five queued calls ran as one"
    assert sorted(set(compute.inputs[1][:, 0].tolist())) == [1, 2, 3, 4, 5]
    for value in range(6):
        np.testing.assert_array_equal(results[value], _rows(value * 10, 1 + value % 3))
    assert batcher.stats().calls == 2 and batcher.stats().requests == 6


def test_a_batch_never_exceeds_max_rows_and_a_caller_is_never_split():
    batcher, compute = MicroBatcher(max_rows=4), Recorder(hold_first=True)
    results = {}
    threads = _call_in_threads(batcher, "t", [0], compute, results)
    assert compute.started.wait(5)
    threads += _call_in_threads(batcher, "t", [1, 2, 4, 5], compute, results)  # 2 + 3 + 2 + 3 rows
    time.sleep(0.3)
    compute.release.set()
    for thread in threads:
        thread.join(10)
    assert all(len(rows) <= 4 for rows in compute.inputs)
    for value in (0, 1, 2, 4, 5):
        np.testing.assert_array_equal(results[value], _rows(value * 10, 1 + value % 3))
    with pytest.raises(ValueError, match="exceed"):
        batcher.run("t", _rows(0, 5), compute)


def test_an_error_reaches_every_caller_of_its_batch_and_not_the_next():
    batcher = MicroBatcher(max_rows=64, window_seconds=0.3)

    def failing(rows):
        raise RuntimeError("device lost")

    errors, results = {}, {}
    threads = _call_in_threads(batcher, "t", [0, 1, 2], failing, results, errors)
    for thread in threads:
        thread.join(10)
    assert sorted(errors) == [0, 1, 2] and all("device lost" in str(e) for e in errors.values())
    np.testing.assert_array_equal(batcher.run("t", _rows(7), Recorder()), _rows(70))


def test_a_window_gathers_calls_that_arrive_within_it():
    batcher, compute = MicroBatcher(max_rows=64, window_seconds=0.5), Recorder()
    results = {}
    threads = _call_in_threads(batcher, "t", [0, 1, 2, 3], compute, results)
    for thread in threads:
        thread.join(10)
    assert len(compute.inputs) == 1 and sum(len(r) for r in results.values()) == len(compute.inputs[0])


def test_keys_batch_apart_and_idle_keys_are_forgotten():
    batcher = MicroBatcher(max_rows=64, window_seconds=0.3)
    a, b = Recorder(), Recorder()
    results_a, results_b = {}, {}
    threads = _call_in_threads(batcher, "a", [0, 1], a, results_a) + _call_in_threads(batcher, "b", [2], b, results_b)
    for thread in threads:
        thread.join(10)
    assert len(a.inputs) == 1 and len(b.inputs) == 1 and len(b.inputs[0]) == 3
    assert batcher._keys == {} and batcher._open == {}


def test_with_two_instances_two_calls_run_at_once_and_the_third_waits_for_a_slot():
    batcher, compute = MicroBatcher(max_rows=64, instances=2), Recorder(hold_first=True)
    results = {}
    threads = _call_in_threads(batcher, "t", [0], compute, results)
    assert compute.started.wait(5)
    compute.started.clear()
    threads += _call_in_threads(batcher, "t", [1], compute, results)
    assert compute.started.wait(5), "the second call found the second slot free"
    threads += _call_in_threads(batcher, "t", [2, 3], compute, results)
    time.sleep(0.3)
    assert len(compute.inputs) == 2  # both slots held: the others queue in one batch
    compute.release.set()
    for thread in threads:
        thread.join(10)
    assert len(compute.inputs) == 3 and len(compute.inputs[2]) == 3 + 1
    for value in range(4):
        np.testing.assert_array_equal(results[value], _rows(value * 10, 1 + value % 3))


def test_bad_bounds_are_refused():
    with pytest.raises(ValueError):
        MicroBatcher(max_rows=4, instances=0)
    with pytest.raises(ValueError):
        MicroBatcher(max_rows=0)
    with pytest.raises(ValueError):
        MicroBatcher(max_rows=4, window_seconds=-1)


def _served_engine(**options):

    engine = Engine.create(tiny_config(generations=1, candidates_per_generation=1),
                           options=EngineOptions(**options))
    spec = dataclasses.replace(bundled_task_specs()[0], budget=SearchBudget(train_rounds=1, examples_per_round=64))
    engine.add_task(spec)
    engine.run_search(spec.name)
    return engine, spec.name


def test_engine_predicts_of_one_task_batch_together_and_match_lone_calls():
    engine, task = _served_engine(predict_batch_window_seconds=0.3)
    images = np.random.default_rng(0).integers(0, 256, size=(8, 3, 8, 8, 3), dtype=np.uint8)
    alone = [engine.predict(task, batch).probabilities for batch in images]
    calls_before = engine.batcher.stats().calls
    gate, results = threading.Barrier(8), {}

    def call(i):
        gate.wait()
        results[i] = engine.predict(task, images[i]).probabilities

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    stats = engine.batcher.stats()
    assert stats.calls - calls_before < 8, "concurrent calls within the window ran as fewer device calls"
    for i in range(8):  # another batch bucket: equal within float32 rounding
        np.testing.assert_allclose(results[i], alone[i], rtol=1e-5, atol=1e-6)


def test_engine_batching_can_be_turned_off():
    assert Engine.create(tiny_config(), options=EngineOptions(predict_batch_window_seconds=None)).batcher is None
    assert Engine.create(tiny_config()).batcher.window_seconds == 0.0


def test_the_server_flag_reaches_the_engine_options(monkeypatch):
    parser = server.add_serve_arguments(argparse.ArgumentParser())
    assert server.options_from_args(parser.parse_args([])).predict_batch_window_ms == 0.0
    assert server.options_from_args(parser.parse_args(["--predict-batch-window-ms", "-1"])).predict_batch_window_ms == -1
    monkeypatch.setenv("EVOLVE_PREDICT_BATCH_WINDOW_MS", "2.5")
    parser = server.add_serve_arguments(argparse.ArgumentParser())
    assert server.options_from_args(parser.parse_args([])).predict_batch_window_ms == 2.5
    with pytest.raises(ValueError, match="--predict-batch-window-ms"):
        server.options_from_args(parser.parse_args(["--predict-batch-window-ms", "nan"]))
