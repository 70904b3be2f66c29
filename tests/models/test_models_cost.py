"""Inference FLOPs: XLA's cost analysis against the textbook count, and caching."""

import time

import jax
import pytest

from evolve.config import VIT_SIZES
from evolve.models import cost
from evolve.types import PathStructure

TINY = VIT_SIZES["tiny"]


def test_analytic_flops_by_hand():
    # tiny at 16px: 4x4 patches of 4x4 pixels, 17 tokens, width 64, mlp 128.
    structure = PathStructure(TINY, 3, image_size=16, num_classes=10)
    embedding = 16 * (4 * 4 * 3) * 64
    block = 4 * 17 * 64 * 64 + 2 * 17 * 17 * 64 + 2 * 17 * 64 * 128
    head = 64 * 10
    assert cost.analytic_flops(structure) == 2 * (embedding + 3 * block + head)
    adapted = PathStructure(TINY, 3, image_size=16, num_classes=10, adapter_layers=(1,), adapter_dim=16)
    assert cost.analytic_flops(adapted) - cost.analytic_flops(structure) == 2 * 2 * 17 * 64 * 16


def test_vit_ti16_at_224_matches_the_textbook_count():
    size = VIT_SIZES["Ti/16"]
    structure = PathStructure(size, size.num_layers, image_size=224, num_classes=1000)
    flops = cost.forward_flops(structure)
    analytic = cost.analytic_flops(structure)
    assert analytic == pytest.approx(2.507e9, rel=1e-3)  # the ~1.25 GMACs usually quoted for ViT-Ti/16
    assert analytic <= flops <= 1.10 * analytic


def test_tiny_matches_the_textbook_count():
    structure = PathStructure(TINY, TINY.num_layers, image_size=16, num_classes=10)
    flops = cost.forward_flops(structure)
    analytic = cost.analytic_flops(structure)
    # XLA also counts elementwise work; at width 64 the exact GELU (erf,
    # ~64 FLOPs per element in XLA's count) adds ~12% to the matmuls.
    assert analytic <= flops <= 1.20 * analytic


def test_flops_grow_with_image_size_depth_and_adapters():
    base = PathStructure(TINY, 2, image_size=16, num_classes=10)
    bigger = PathStructure(TINY, 2, image_size=32, num_classes=10)
    deeper = PathStructure(TINY, 3, image_size=16, num_classes=10)
    adapted = PathStructure(TINY, 2, image_size=16, num_classes=10, adapter_layers=(0,), adapter_dim=32)
    flops = cost.forward_flops(base)
    assert cost.forward_flops(bigger) > 3 * flops
    assert cost.forward_flops(deeper) > flops
    assert cost.forward_flops(adapted) > flops


def test_forward_flops_is_cached_per_structure(monkeypatch):
    structure = PathStructure(TINY, 1, image_size=16, num_classes=11, adapter_layers=(0,), adapter_dim=8)
    before = cost.forward_flops.cache_info()
    live = len(jax.live_arrays())
    first = cost.forward_flops(structure)
    after_first = cost.forward_flops.cache_info()
    assert after_first.misses == before.misses + 1
    assert len(jax.live_arrays()) <= live  # no parameters were allocated

    equal = PathStructure(TINY, 1, image_size=16, num_classes=11, adapter_layers=(0,), adapter_dim=8)

    def no_compiling(*args, **kwargs):
        raise AssertionError("forward_flops compiled again for a cached structure")

    monkeypatch.setattr(jax, "jit", no_compiling)
    start = time.perf_counter()
    second = cost.forward_flops(equal)  # an equal structure, not the same object
    elapsed = time.perf_counter() - start
    after_second = cost.forward_flops.cache_info()
    assert second == first
    assert after_second.misses == after_first.misses  # nothing lowered or compiled again
    assert after_second.hits == after_first.hits + 1
    assert elapsed < 0.05


def test_flops_of_handles_both_cost_analysis_shapes():
    assert cost._flops_of({"flops": 12.0}) == 12.0
    assert cost._flops_of([{"flops": 7.0}]) == 7.0
    assert cost._flops_of([]) is None
    assert cost._flops_of(None) is None
    assert cost._flops_of({"flops": -1.0}) is None
