"""Compiled executables in bounded least-recently-used caches: eviction order,
a separate bound for serving, results and donation as plain jax.jit, no
retrace on reuse, and memory that stays flat while structures come and go."""

from __future__ import annotations

import functools
import gc
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from evolve.models import vit
from evolve.train import optimizer, steps
from evolve.types import PathStructure
from tests.conftest import TEST_SIZE

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_BASE = vit.init_path_params(PathStructure(TEST_SIZE, 1, 16, 2, (), 8), jax.random.key(0))


def _structure(classes: int) -> PathStructure:
    return PathStructure(TEST_SIZE, 1, 16, classes, (), 8)


def _params(classes: int) -> dict:
    """A path of `classes` classes: the shared body and a head of its own, made in
    numpy (initialising a new head shape with jax would compile eager ops)."""
    rng = np.random.default_rng(classes)
    head = {"kernel": rng.normal(0, 0.1, (TEST_SIZE.hidden_size, classes)).astype(np.float32),
            "bias": np.zeros(classes, np.float32)}
    return dict(_BASE, head=head)


def _images(batch: int = 4) -> np.ndarray:
    return np.random.default_rng(7).uniform(-1, 1, (batch, 16, 16, 3)).astype(np.float32)


def _predict(classes: int) -> np.ndarray:
    return np.asarray(steps.predict_probabilities(_params(classes), _images(), structure=_structure(classes)))


def _train_inputs(classes: int, device: jax.Device):
    params = _params(classes)
    trainable = {n: p for n, p in params.items() if n in ("head", "encoder_norm")}
    frozen = {n: p for n, p in params.items() if n not in trainable}
    opt_state = optimizer.make_optimizer(False).init(trainable)
    labels = np.arange(4, dtype=np.int32) % classes
    trainable, frozen, opt_state = jax.device_put((trainable, frozen, opt_state), device)
    return trainable, frozen, opt_state, _images(), labels, np.float32(0.1), np.float32(0.9)


def _train(classes: int):
    return steps.train_step(*_train_inputs(classes, jax.devices()[0]), structure=_structure(classes), nesterov=False)


@pytest.fixture
def bounds():
    """Empty caches whose bounds the test may change; the bounds come back after."""
    saved = steps.TRAINING.max_entries, steps.SERVING.max_entries
    steps.TRAINING.clear()
    steps.SERVING.clear()
    yield steps.set_compiled_bounds
    steps.set_compiled_bounds(training=saved[0], serving=saved[1])


def test_cache_evicts_the_least_recently_used_and_a_hit_refreshes():
    cache = steps.CompiledCache("test", 2)
    cache.put("a", "A")
    cache.put("b", "B")
    assert cache.get("a") == "A"  # now b is the least recently used
    cache.put("c", "C")
    assert cache.keys() == ["a", "c"] and cache.get("b") is None
    assert (cache.hits, cache.misses, cache.evictions) == (1, 1, 1)
    assert cache.put("c", "other") == "C"  # the first one stored stays
    cache.set_max_entries(1)
    assert cache.keys() == ["c"]
    with pytest.raises(ValueError, match="at least 1"):
        cache.set_max_entries(0)


def test_steps_evict_least_recently_used_and_retrace_only_what_was_evicted(bounds):
    bounds(serving=2)
    traces = steps.TRACE_COUNTS["predict"]

    def traced(classes):
        before = steps.TRACE_COUNTS["predict"]
        _predict(classes)
        return steps.TRACE_COUNTS["predict"] - before

    assert [traced(3), traced(4), traced(3)] == [1, 1, 0]  # a re-used structure does not retrace
    assert traced(5) == 1  # evicts 4, the least recently used (3 was just used)
    assert traced(3) == 0
    assert traced(4) == 1  # evicted, so compiled again (loop.py counts that as compile time)
    assert steps.TRACE_COUNTS["predict"] - traces == 4
    assert len(steps.SERVING) == 2


def test_serving_has_a_bound_of_its_own(bounds):
    bounds(training=2, serving=1)
    jax.block_until_ready(_train(3))
    traces = steps.TRACE_COUNTS["train_step"]
    for classes in (3, 4, 5):  # predict evicts predict only
        _predict(classes)
    assert len(steps.SERVING) == 1 and len(steps.TRAINING) == 1
    jax.block_until_ready(_train(3))
    assert steps.TRACE_COUNTS["train_step"] == traces
    predicts = steps.TRACE_COUNTS["predict"]
    for classes in (6, 7, 8):  # and training evicts training only
        jax.block_until_ready(_train(classes))
    assert len(steps.TRAINING) == 2
    _predict(5)
    assert steps.TRACE_COUNTS["predict"] == predicts


def test_results_are_bit_equal_to_the_plain_jitted_steps(bounds):
    device = jax.devices()[0]
    structure = _structure(3)
    bounded = steps.train_step(*_train_inputs(3, device), structure=structure, nesterov=False)
    plain = steps.train_step.jitted(*_train_inputs(3, device), structure=structure, nesterov=False)
    bounded_leaves, plain_leaves = jax.tree.leaves(bounded), jax.tree.leaves(plain)
    assert len(bounded_leaves) == len(plain_leaves)
    for a, b in zip(bounded_leaves, plain_leaves):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()

    trainable, frozen, _, images, labels, _, _ = _train_inputs(3, device)
    mask = np.array([True, True, False, True])
    assert int(steps.count_correct(trainable, frozen, images, labels, mask, structure=structure)) == int(
        steps.count_correct.jitted(trainable, frozen, images, labels, mask, structure=structure))
    params = _params(3)
    assert (np.asarray(steps.predict_probabilities(params, _images(), structure=structure)).tobytes()
            == np.asarray(steps.predict_probabilities.jitted(params, _images(), structure=structure)).tobytes())


def test_train_step_still_donates_as_the_plain_jitted_step(bounds):
    def donated(step):
        trainable, frozen, opt_state, *batch = _train_inputs(3, jax.devices()[0])
        outputs = step(trainable, frozen, opt_state, *batch, structure=_structure(3), nesterov=False)
        assert not any(leaf.is_deleted() for leaf in jax.tree.leaves((frozen, outputs)))
        return [leaf.is_deleted() for leaf in jax.tree.leaves((trainable, opt_state))]

    plain = donated(steps.train_step.jitted)
    assert donated(steps.train_step) == donated(steps.train_step) == plain  # the call that compiles, one that hits
    assert sum(plain) >= len(jax.tree.leaves(_train_inputs(3, jax.devices()[0])[0])) * 2  # parameters and momentum


def test_under_a_trace_it_is_the_plain_jitted_function(bounds):
    """jax.export of a served path traces predict_probabilities inside its own jit."""
    structure, params = _structure(3), _params(3)
    outer = jax.jit(functools.partial(steps.predict_probabilities, structure=structure))
    np.testing.assert_allclose(np.asarray(outer(params, _images())), _predict(3), rtol=1e-6)
    assert len(steps.SERVING) == 1  # only the direct call's


def _live(name: str) -> int:
    gc.collect()
    return sum(e.hlo_modules()[0].name == name for e in jax.devices()[0].client.live_executables())


def test_evicted_executables_are_freed(bounds):
    """Nothing else keeps them: neither jax.jit's dispatch cache nor its trace
    and lowering caches (which an ahead-of-time compile through the shared
    jitted function would fill)."""
    bounds(serving=1)
    before, dispatch_cache = _live("jit_predict_probabilities"), steps.predict_probabilities.jitted._cache_size()
    for classes in (3, 4, 5):
        _predict(classes)
    assert _live("jit_predict_probabilities") - before == 1
    assert steps.predict_probabilities.jitted._cache_size() == dispatch_cache
    bounds(serving=3)  # the control: kept ones are counted
    for classes in (6, 7):
        _predict(classes)
    assert _live("jit_predict_probabilities") - before == 3


_MEMORY = """
import ctypes, gc, json, os, sys
sys.path.insert(0, sys.argv[1])
import jax, numpy as np
from evolve.train import optimizer, steps
from tests.train.test_compiled_lru import _params, _structure, _images

class MallInfo(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo

def memory_mb():
    \"\"\"(RSS, heap in use): the heap is what malloc has handed out, which no
    reuse of freed pages blurs.\"\"\"
    gc.collect()
    with open("/proc/self/statm") as handle:
        rss = int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    info = libc.mallinfo2()
    return np.array([rss, info.uordblks + info.hblkhd]) / 2**20

"""

_GROWTH = _MEMORY + """
def train(classes):
    params = _params(classes)
    trainable = {n: p for n, p in params.items() if n in ("head", "encoder_norm")}
    frozen = {n: p for n, p in params.items() if n not in trainable}
    # zeros of the state's shapes: initialising it with jax would compile eager ops per head shape
    opt_state = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype),
                             jax.eval_shape(optimizer.make_optimizer(False).init, trainable))
    labels = np.arange(4, dtype=np.int32) % classes
    jax.block_until_ready(steps.train_step(trainable, frozen, opt_state, _images(), labels, np.float32(0.1),
                                           np.float32(0.9), structure=_structure(classes), nesterov=False))

structures = int(sys.argv[2])
steps.set_compiled_bounds(training=1)
for classes in (2, 3):  # warm-up, with an eviction
    train(classes)
start = memory_mb()
for classes in range(10, 10 + structures):
    train(classes)
bounded = memory_mb() - start
# Second, so that it reuses pages the first phase freed: if anything, it grows less than in a fresh process.
steps.set_compiled_bounds(training=1000)
start = memory_mb()
for classes in range(100, 100 + structures):
    train(classes)
large = memory_mb() - start
print(json.dumps({"bounded_rss_mb": bounded[0], "bounded_heap_mb": bounded[1], "large_bound_rss_mb": large[0],
                  "large_bound_heap_mb": large[1], "kept": len(steps.TRAINING)}))
"""


def test_memory_stays_flat_under_the_bound_and_grows_beyond_it():
    """Five new structures after another: with a bound of one executable the
    heap in use grows less than 1 MB a structure (measured on 2 loaded cores:
    0.24-0.27; what grows is jax's own trace caches, bounded themselves) and
    RSS less than 6 (measured 0.8-5: RSS also counts freed pages the allocator
    has not returned, which depends on timing, so the heap is the sharp
    measure); with a large bound the heap grows more than 2 MB a structure and
    RSS more than 1.5 (measured: 2.7 and 3-5.5, one train step executable each)."""
    structures = 5
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    result = subprocess.run([sys.executable, "-c", _GROWTH, REPO, str(structures)], capture_output=True, text=True,
                            env=env, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    print(out)
    assert out["kept"] == structures + 1
    assert out["bounded_rss_mb"] < 6 * structures and out["bounded_heap_mb"] < 1 * structures, out
    assert out["large_bound_heap_mb"] > 2 * structures and out["large_bound_rss_mb"] > 1.5 * structures, out


def test_the_engine_and_the_server_flags_set_the_bounds(bounds, monkeypatch):
    import argparse

    from evolve.engine import Engine, EngineOptions
    from service import server
    from tests.conftest import tiny_config

    Engine.create(tiny_config(), options=EngineOptions(max_compiled_structures=5, max_compiled_predicts=7))
    assert (steps.TRAINING.max_entries, steps.SERVING.max_entries) == (5, 7)

    monkeypatch.setenv("EVOLVE_MAX_COMPILED_PREDICTS", "32")
    parser = server.add_serve_arguments(argparse.ArgumentParser())
    options = server.options_from_args(parser.parse_args(["--max-compiled-steps", "16"]))
    assert (options.max_compiled_steps, options.max_compiled_predicts) == (16, 32)
    with pytest.raises(ValueError, match="--max-compiled-steps must be at least 1"):
        server.options_from_args(parser.parse_args(["--max-compiled-steps", "0"]))


_SEARCH_PROGRAMS = _MEMORY + """
from evolve.models import cost
from evolve.search import probe

def programs(classes):
    structure = _structure(classes)
    cost.forward_flops(structure)
    cost.forward_flops.cache_clear()  # its result cache is bounded apart; the programs must not stay
    params = {n: p for n, p in _params(classes).items() if n != "head"}
    probe.body_features(params, np.zeros((4, 16, 16, 3), np.uint8), structure, 4)

structures = int(sys.argv[2])
steps.set_compiled_bounds(training=1)
for classes in (2, 3):
    programs(classes)
start = memory_mb()
for classes in range(10, 10 + structures):
    programs(classes)
grown = memory_mb() - start
print(json.dumps({"rss_mb": grown[0], "heap_mb": grown[1]}))
"""


def test_the_search_s_flops_and_probe_programs_do_not_pile_up():
    """The FLOPs compile of every planned candidate and the probe's feature
    program of every served structure: five new structures grow the heap by
    less than 1 MB each. Compiled through a jit of `vit.forward` itself (as
    before), jax's caches keyed on that function kept every program: the
    heap grew by 28.6 MB for the five (0.46 MB with a function of its own)."""
    structures = 5
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    result = subprocess.run([sys.executable, "-c", _SEARCH_PROGRAMS, REPO, str(structures)], capture_output=True,
                            text=True, env=env, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    print(out)
    assert out["heap_mb"] < 1 * structures, out
