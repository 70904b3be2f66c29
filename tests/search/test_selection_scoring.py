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


def _scored(pid, quality, params, generation=0):
    return Path(id=pid, task="t", components={}, hparams={}, score=quality, quality=quality,
                accounted_params=params, generation=generation)


def test_final_choice_is_the_best_when_parsimony_is_off():
    population = [_scored("big", 0.90, 1000.0), _scored("small", 0.899, 10.0)]
    assert selection.final_choice(population, 300, 0.0).id == "big"


def test_final_choice_takes_the_smallest_path_within_the_standard_error():
    # 300 validation images at 0.9: one standard error is sqrt(0.09 / 300) = 0.0173
    population = [_scored("big", 0.90, 1000.0), _scored("mid", 0.889, 400.0), _scored("small", 0.884, 100.0),
                  _scored("tiny", 0.87, 10.0)]
    assert selection.final_choice(population, 300, 1.0).id == "small"
    assert selection.final_choice(population, 300, 2.0).id == "tiny"
    # with 30,000 images the same differences are no longer noise
    assert selection.final_choice(population, 30_000, 1.0).id == "big"


def test_final_choice_breaks_size_ties_by_quality_then_newest():
    population = [_scored("a", 0.90, 10.0, generation=0), _scored("b", 0.895, 10.0, generation=2),
                  _scored("c", 0.90, 10.0, generation=1)]
    assert selection.final_choice(population, 300, 1.0).id == "c"


def test_quality_margin_never_vanishes_at_perfect_accuracy():
    assert selection.quality_margin(1.0, 300, 1.0) == 1 / 300
    assert abs(selection.quality_margin(0.5, 100, 2.0) - 0.1) < 1e-12
