"""Demo tasks built from real data shipped inside an installed package.

All use scikit-learn's `load_digits` (1,797 handwritten digits, 8 x 8
grayscale, values 0..16), read from the package's own files: nothing is
downloaded. The tasks differ in label semantics and input transform, so that a
multitask system has something to share and something to learn per task.
Images stay 8 x 8; the model's preprocessing resizes them.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable

import numpy as np

from evolve.data.dataset import ImageSet, TaskData
from evolve.errors import InvalidArgumentError
from evolve.types import BundledSource, TaskSpec

logger = logging.getLogger(__name__)

BUNDLED_TASKS: dict[str, str] = {
    "digits": "sklearn digits, 10 classes: which digit (8x8 grayscale)",
    "digits_parity": "sklearn digits, 2 classes: even or odd, images mirrored left-right",
    "digits_loops": "sklearn digits, 3 classes: closed loops in the digit (0, 1 or 2), images inverted",
}

# Fixed split of the 1,797 digits: a seeded permutation, then these sizes.
SPLIT_SEED = 1234
NUM_TRAIN, NUM_VALIDATION, NUM_TEST = 1297, 200, 300

# Closed loops per digit: 0 for 1 2 3 5 7; 1 for 0 4 6 9; 2 for 8.
_LOOPS = np.array([1, 0, 0, 0, 1, 0, 1, 0, 2, 1], dtype=np.int32)


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images N x 8 x 8 x 3 scaled 0..255, int32 digits), read-only."""
    from sklearn.datasets import load_digits  # lazy: sklearn is only needed here

    bunch = load_digits()
    gray = np.round(np.asarray(bunch.images, dtype=np.float64) * (255.0 / 16.0))
    images = np.repeat(np.clip(gray, 0, 255).astype(np.uint8)[..., None], 3, axis=-1)
    labels = np.asarray(bunch.target, dtype=np.int32)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def _plain(images: np.ndarray, digits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return images.copy(), digits.copy()


def _parity(images: np.ndarray, digits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return images[:, :, ::-1].copy(), (digits % 2).astype(np.int32)


def _loops(images: np.ndarray, digits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return (255 - images).astype(np.uint8), _LOOPS[digits]


_TRANSFORMS: dict[str, tuple[Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]], tuple[str, ...]]] = {
    "digits": (_plain, tuple(str(d) for d in range(10))),
    "digits_parity": (_parity, ("even", "odd")),
    "digits_loops": (_loops, ("no loop", "one loop", "two loops")),
}


def bundled_task_specs() -> list[TaskSpec]:
    """A TaskSpec for every bundled demo task, in BUNDLED_TASKS order."""
    return [TaskSpec(name=name, source=BundledSource(name=name)) for name in BUNDLED_TASKS]


def check_bundled(source: BundledSource) -> None:
    if source.name not in _TRANSFORMS:
        known = ", ".join(sorted(BUNDLED_TASKS))
        raise InvalidArgumentError("source.name", f"unknown bundled task {source.name!r}; known: {known}")


def load_bundled(source: BundledSource, max_train_examples: int | None) -> TaskData:
    """Builds a bundled task; its split is fixed (same for every task)."""
    check_bundled(source)
    transform, class_names = _TRANSFORMS[source.name]
    images, labels = transform(*_digits())
    order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    train_idx = order[:NUM_TRAIN]
    if max_train_examples is not None:
        train_idx = train_idx[:max_train_examples]
    val_idx = order[NUM_TRAIN : NUM_TRAIN + NUM_VALIDATION]
    test_idx = order[NUM_TRAIN + NUM_VALIDATION : NUM_TRAIN + NUM_VALIDATION + NUM_TEST]
    splits = [ImageSet(images[i], labels[i]) for i in (train_idx, val_idx, test_idx)]
    logger.info("bundled task %s: %s", source.name, [len(s) for s in splits])
    return TaskData(*splits, num_classes=len(class_names), class_names=class_names)
