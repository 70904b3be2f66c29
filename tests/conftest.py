"""Shared fixtures: a tiny configuration that trains in seconds on 2 CPU cores."""

from __future__ import annotations


import numpy as np
import pytest

from evolve.config import get_config
from evolve.types import ViTSize

TEST_SIZE = ViTSize("test", patch_size=4, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64)


def tiny_config(**overrides):
    """A 2-block width-32 ViT and a search of a few dozen steps."""
    base = dict(
        size=TEST_SIZE, max_layers=3, generations=2, candidates_per_generation=2, train_rounds=2,
        examples_per_round=256, batch_size=32, eval_batch_size=256, population_size=4,
        image_sizes=(16,), default_image_size=16,
    )
    base.update(overrides)
    return get_config("tiny", **base)


@pytest.fixture
def config():
    return tiny_config()


@pytest.fixture
def probe_images():
    """Fixed inputs for bit-identity checks of predictions."""
    rng = np.random.default_rng(1234)
    return rng.integers(0, 256, size=(16, 8, 8, 3), dtype=np.uint8)
