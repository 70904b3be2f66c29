"""Shared setup of the data-layer tests."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO_ROOT not in sys.path:  # run from anywhere without installing the package
    sys.path.insert(0, REPO_ROOT)


@pytest.fixture
def images_rng() -> np.random.Generator:
    """A seeded generator for making test images."""
    return np.random.default_rng(0)
