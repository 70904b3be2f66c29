"""Bundled demo tasks built from scikit-learn's digits (no download)."""

from __future__ import annotations

import numpy as np
import pytest

from evolve.data import BUNDLED_TASKS, bundled_task_specs, load_task_data
from evolve.errors import InvalidArgumentError
from evolve.types import BundledSource, TaskSpec

EXPECTED_CLASSES = {"digits": 10, "digits_parity": 2, "digits_loops": 3}
LOOPS = {0: 1, 1: 0, 2: 0, 3: 0, 4: 1, 5: 0, 6: 1, 7: 0, 8: 2, 9: 1}


@pytest.fixture(scope="module")
def tasks():
    return {spec.name: load_task_data(spec) for spec in bundled_task_specs()}


def test_three_distinct_tasks_with_specs():
    specs = bundled_task_specs()
    assert [s.name for s in specs] == list(BUNDLED_TASKS) and len(specs) >= 3
    assert all(isinstance(s.source, BundledSource) and s.source.name == s.name for s in specs)
    assert all(isinstance(d, str) and d for d in BUNDLED_TASKS.values())


def test_shapes_dtypes_and_label_ranges(tasks):
    for name, data in tasks.items():
        assert data.num_classes == EXPECTED_CLASSES[name]
        assert len(data.class_names) == data.num_classes
        for split, size in ((data.train, 1297), (data.validation, 200), (data.test, 300)):
            assert split.images.shape == (size, 8, 8, 3) and split.images.dtype == np.uint8
            assert split.labels.dtype == np.int32
            assert split.labels.min() == 0 and split.labels.max() == data.num_classes - 1
        assert data.train.images.max() == 255 and data.train.images.min() == 0


def test_splits_are_disjoint(tasks):
    data = tasks["digits"]
    keys = [{img.tobytes() + bytes([lab]) for img, lab in zip(s.images, s.labels)} for s in (data.train, data.test)]
    # a few digits are pixel-identical duplicates in sklearn's data; nearly all must differ
    assert len(keys[0] & keys[1]) <= 3


def test_label_semantics_differ_on_the_same_examples(tasks):
    digits = tasks["digits"].test.labels
    np.testing.assert_array_equal(tasks["digits_parity"].test.labels, digits % 2)
    np.testing.assert_array_equal(tasks["digits_loops"].test.labels, [LOOPS[int(d)] for d in digits])


def test_input_transforms_differ(tasks):
    plain = tasks["digits"].train.images
    np.testing.assert_array_equal(tasks["digits_parity"].train.images, plain[:, :, ::-1])
    np.testing.assert_array_equal(tasks["digits_loops"].train.images, 255 - plain)
    assert np.all(plain[..., 0] == plain[..., 2])  # grayscale repeated to 3 channels


def test_deterministic(tasks):
    again = load_task_data(TaskSpec("other_name", BundledSource("digits_loops")))
    np.testing.assert_array_equal(again.validation.images, tasks["digits_loops"].validation.images)
    np.testing.assert_array_equal(again.train.labels, tasks["digits_loops"].train.labels)


def test_max_train_examples(tasks):
    capped = load_task_data(bundled_task_specs()[0], max_train_examples=64)
    assert len(capped.train) == 64 and len(capped.validation) == 200
    np.testing.assert_array_equal(capped.train.images, tasks["digits"].train.images[:64])


def test_unknown_bundled_name():
    with pytest.raises(InvalidArgumentError, match="unknown bundled task") as info:
        load_task_data(TaskSpec("t", BundledSource("cifar10")))
    assert info.value.field == "source.name"
