from __future__ import annotations

import numpy as np

from evolve.search import scoring, selection
from evolve.types import Component, Path
from tests.conftest import tiny_config


def _path(pid, score, children=0, generation=0):
    return Path(id=pid, task="t", components={}, hparams={}, score=score, children=children, generation=generation)


def test_parent_acceptance_follows_half_to_the_k():
    rng = np.random.default_rng(0)
    best = _path("best", 0.9, children=1)  # accepted with probability 0.5
    other = _path("other", 0.5, children=30)  # practically never
    fallback = [_path("root", None)]
    picks = [selection.select_parent([other, best], fallback, rng).id for _ in range(4000)]
    share = picks.count("best") / len(picks)
    assert 0.46 < share < 0.54
    assert picks.count("other") < 10
    assert picks.count("root") > 1500


def test_prune_keeps_best_and_prefers_newest_on_ties():
    population = [_path("a", 0.5, generation=0), _path("b", 0.7), _path("c", 0.5, generation=3)]
    kept = selection.prune(population, 2)
    assert [p.id for p in kept] == ["b", "c"]


def test_shared_components_are_divided_among_lockers():
    params = {"w": np.zeros((10, 10), np.float32)}  # 100 parameters
    own = Component("c1", "encoderblock_0", params, origin="t")
    shared = Component("c2", "encoderblock_1", params, origin="a", locked_by=frozenset({"a", "b"}))
    mine_locked = Component("c3", "head", params, origin="t", locked_by=frozenset({"t"}))
    assert scoring.accounted_params([own], "t") == 100
    assert scoring.accounted_params([shared], "t") == 100 / 3
    assert scoring.accounted_params([mine_locked], "t") == 100


def test_score_penalises_size_only_when_scale_below_one():
    config = tiny_config()
    assert scoring.score(0.8, 1e9, 1e12, config) == 0.8
    config = tiny_config(scale_factor=0.99, params_ref=1e6, flops_ref=1e9)
    assert scoring.score(0.8, 1e6, 1e9, config) == 0.8 * 0.99 * 0.99
