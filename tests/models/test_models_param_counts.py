"""Golden parameter counts per ViT size (the vit_jax habit), without allocating."""

import jax
import numpy as np
import pytest

from evolve.config import VIT_SIZES
from evolve.models import cost, root
from evolve.types import PathStructure, count_params

# At 224px with a 1000-class head. The Ti/S/B/L numbers are the well-known
# counts of ViT-Ti/16, S/16, B/16 and L/16 (timm's vit_*_patch16_224).
GOLDEN_PARAM_COUNTS = {
    "tiny": 369_512,
    "Ti/16": 5_717_416,
    "S/16": 22_050_664,
    "B/16": 86_567_656,
    "L/16": 304_326_632,
}


def _structure(name: str, **overrides) -> PathStructure:
    size = VIT_SIZES[name]
    fields = dict(size=size, num_layers=size.num_layers, image_size=224, num_classes=1000)
    fields.update(overrides)
    return PathStructure(**fields)


def test_every_size_has_a_golden_count():
    assert set(GOLDEN_PARAM_COUNTS) == set(VIT_SIZES)


@pytest.mark.parametrize("name", sorted(GOLDEN_PARAM_COUNTS))
def test_param_count_matches_golden_table(name):
    assert cost.param_count(_structure(name)) == GOLDEN_PARAM_COUNTS[name]


def test_component_counts_of_vit_b16():
    counts = cost.component_param_counts(_structure("B/16"))
    assert list(counts) == list(_structure("B/16").component_names())
    assert counts["embedding"] == 16 * 16 * 3 * 768 + 768
    assert counts["cls"] == 768
    assert counts["posembed_input"] == 197 * 768
    assert counts["encoderblock_0"] == 7_087_872
    assert counts["encoder_norm"] == 2 * 768
    assert counts["head"] == 768 * 1000 + 1000
    assert sum(counts.values()) == GOLDEN_PARAM_COUNTS["B/16"]


def test_adapters_and_depth_change_the_count():
    base = _structure("tiny", image_size=16, num_classes=10)
    with_adapters = _structure("tiny", image_size=16, num_classes=10, adapter_layers=(0, 2), adapter_dim=16)
    # LayerNorm (2 * 64) + down (64 * 16 + 16) + up (16 * 64 + 64) per adapter.
    assert cost.param_count(with_adapters) - cost.param_count(base) == 2 * (128 + 1040 + 1088)
    shallower = _structure("tiny", image_size=16, num_classes=10, num_layers=2)
    assert cost.param_count(base) - cost.param_count(shallower) == 33_472


def test_abstract_params_allocate_nothing():
    before = len(jax.live_arrays())
    shapes = cost.abstract_params(_structure("L/16"))
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(shapes))
    assert len(jax.live_arrays()) <= before


def test_random_root_counts_and_names():
    size = VIT_SIZES["tiny"]
    params = root.random_root(size, image_size=16, rng=jax.random.key(0))
    structure = PathStructure(size, size.num_layers, 16, num_classes=10)
    assert tuple(params) == root.root_component_names(size.num_layers)
    assert "head" not in params
    head = cost.component_param_counts(structure)["head"]
    assert count_params(params) == cost.param_count(structure) - head
    assert all(isinstance(leaf, np.ndarray) for leaf in jax.tree.leaves(params))
    # Every block gets its own key; the class token starts at zero as in vit_jax.
    q0 = params["encoderblock_0"]["MultiHeadDotProductAttention_1"]["query"]["kernel"]
    q1 = params["encoderblock_1"]["MultiHeadDotProductAttention_1"]["query"]["kernel"]
    assert not np.array_equal(q0, q1)
    assert not np.any(params["cls"]["cls"])
    abstract = cost.abstract_params(structure)
    for name, component in params.items():
        got = jax.tree.map(lambda a: (a.shape, a.dtype), component)
        want = jax.tree.map(lambda a: (a.shape, a.dtype), abstract[name])
        assert got == want, name


def test_random_root_rejects_image_size_off_the_patch_grid():
    with pytest.raises(ValueError, match="patch size"):
        root.random_root(VIT_SIZES["tiny"], image_size=18, rng=jax.random.key(0))
