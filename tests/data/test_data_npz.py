"""The local .npz source: round trips, conversions, defaults and every bad input."""

from __future__ import annotations

import os

import numpy as np
import pytest

from evolve.data import ImageSet, TaskData, load_task_data, write_npz_task
from evolve.errors import InvalidArgumentError
from evolve.types import NpzSource, TaskSpec


def _images(n: int, shape=(6, 6, 3), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n,) + shape, dtype=np.uint8)


def _load(path, **kwargs) -> TaskData:
    return load_task_data(TaskSpec("npz_task", NpzSource(str(path))), **kwargs)


def _write_raw(path, **arrays) -> str:
    np.savez(str(path), **arrays)
    return str(path)


def _expect_error(path, field: str = "source.path", match: str | None = None, **kwargs) -> InvalidArgumentError:
    with pytest.raises(InvalidArgumentError, match=match) as info:
        _load(path, **kwargs)
    assert info.value.field == field
    return info.value


def test_round_trip_with_all_splits(tmp_path):
    train, val, test = _images(30, seed=1), _images(8, seed=2), _images(9, seed=3)
    path = write_npz_task(
        tmp_path / "sub" / "task.npz", train, np.arange(30) % 4, val, np.arange(8) % 4, test, np.arange(9) % 5
    )
    assert os.path.isfile(path)
    data = _load(path)
    np.testing.assert_array_equal(data.train.images, train)
    np.testing.assert_array_equal(data.validation.images, val)
    np.testing.assert_array_equal(data.test.images, test)
    np.testing.assert_array_equal(data.train.labels, np.arange(30) % 4)
    assert data.train.labels.dtype == np.int32 and data.train.images.dtype == np.uint8
    assert data.num_classes == 5  # max label + 1 over all splits, test included
    assert isinstance(data.train, ImageSet) and len(data.test) == 9


def test_uncompressed_write_and_path_without_extension(tmp_path):
    path = write_npz_task(tmp_path / "plain", _images(10), np.arange(10) % 2, compress=False)
    assert path.endswith("plain") and os.path.isfile(path)
    assert len(_load(path).train) == 7  # 3 of 10 (30%, short of the 200 floor) become validation


@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 1)])
def test_grayscale_becomes_three_channels(tmp_path, shape):
    gray = _images(12, shape)
    data = _load(write_npz_task(tmp_path / "g.npz", gray, np.arange(12) % 3, gray, np.arange(12) % 3))
    assert data.validation.images.shape == (12, 5, 7, 3)
    flat = gray.reshape(12, 5, 7)
    for channel in range(3):
        np.testing.assert_array_equal(data.validation.images[..., channel], flat)


def test_float_images_are_scaled(tmp_path):
    images = np.zeros((4, 2, 2, 3), np.float32)
    images[1] = 1.0
    images[2] = 0.5
    images[3] = 0.2
    data = _load(write_npz_task(tmp_path / "f.npz", images, [0, 1, 0, 1], images, [0, 1, 0, 1]))
    assert data.validation.images.dtype == np.uint8
    assert [int(v) for v in data.validation.images[:, 0, 0, 0]] == [0, 255, 128, 51]


def test_other_integer_dtypes_and_label_shapes(tmp_path):
    images = _images(6).astype(np.int64)
    labels = np.array([[0.0], [1.0], [2.0], [0.0], [1.0], [2.0]])  # N x 1, integral floats
    data = _load(write_npz_task(tmp_path / "i.npz", images, labels, images, labels))
    np.testing.assert_array_equal(data.train.images, images.astype(np.uint8))
    np.testing.assert_array_equal(data.train.labels, [0, 1, 2, 0, 1, 2])
    assert data.num_classes == 3


def test_missing_validation_is_a_deterministic_slice_of_train(tmp_path):
    images = _images(50)
    labels = np.arange(50) % 5
    images[:, 0, 0, 0] = np.arange(50)  # an id per example
    path = write_npz_task(tmp_path / "t.npz", images, labels)
    first, second = _load(path), _load(path)
    assert (len(first.train), len(first.validation)) == (35, 15)  # 20% of 50, raised towards 200 up to 30%
    np.testing.assert_array_equal(first.validation.images, second.validation.images)
    ids_train = set(first.train.images[:, 0, 0, 0].tolist())
    ids_val = set(first.validation.images[:, 0, 0, 0].tolist())
    assert not ids_train & ids_val and ids_train | ids_val == set(range(50))
    assert first.test is first.validation  # missing test: the validation set


def test_tiny_train_split_gives_at_least_one_validation_example(tmp_path):
    data = _load(write_npz_task(tmp_path / "t.npz", _images(3), [0, 1, 1]))
    assert (len(data.train), len(data.validation)) == (2, 1)


def test_max_train_examples_caps_train_only(tmp_path):
    path = write_npz_task(tmp_path / "t.npz", _images(40), np.arange(40) % 2, _images(7), np.arange(7) % 2)
    data = _load(path, max_train_examples=10)
    assert (len(data.train), len(data.validation)) == (10, 7)
    again = _load(path, max_train_examples=10)
    np.testing.assert_array_equal(data.train.images, again.train.images)


# ---- bad inputs ----------------------------------------------------------------


def test_without_data_roots_missing_unreadable_and_wrong_type_paths_read_alike(tmp_path):
    """Without --data-root any server path can be named: errors must not tell which exist."""
    (tmp_path / "text.npz").write_bytes(b"this is not a zip archive at all")
    os.makedirs(tmp_path / "dir.npz")
    os.mkfifo(tmp_path / "fifo.npz")  # opening it would block: it is never opened
    cases = ["nope.npz", "dir.npz", "text.npz", "fifo.npz"]
    messages = {}
    for name in cases:
        path = tmp_path / name
        messages[name] = _expect_error(path).description.replace(str(path), "PATH")
    assert len(set(messages.values())) == 1, messages
    assert messages["nope.npz"] == "no such file, or not readable as a .npz archive: 'PATH'"


def test_with_data_roots_the_reason_is_given(tmp_path):
    (tmp_path / "text.npz").write_bytes(b"this is not a zip archive at all")
    os.makedirs(tmp_path / "dir.npz")
    roots = [str(tmp_path)]
    _expect_error("nope.npz", match="No such file", data_roots=roots)
    _expect_error("dir.npz", match="not a regular file", data_roots=roots)
    message = _expect_error("text.npz", match="not a zip archive", data_roots=roots).description
    assert str(tmp_path) not in message  # the path as the client gave it, not resolved


def test_unreadable_npz(tmp_path):
    path = tmp_path / "bad.npz"
    path.write_bytes(b"this is not a zip archive at all")
    _expect_error(path, match="not readable as a .npz archive")


def test_truncated_npz(tmp_path):
    good = write_npz_task(tmp_path / "good.npz", _images(10), np.arange(10) % 2)
    path = tmp_path / "cut.npz"
    path.write_bytes(open(good, "rb").read()[:100])
    _expect_error(path)


def test_npy_instead_of_npz(tmp_path):
    np.save(tmp_path / "a.npy", _images(3))
    _expect_error("a.npy", match=r"a single \.npy array", data_roots=[str(tmp_path)])


def test_pickled_arrays_are_refused(tmp_path):
    path = _write_raw(tmp_path / "p.npz", train_images=np.array([{"a": 1}], dtype=object), train_labels=[0])
    _expect_error(path, match="pickles are not read")


@pytest.mark.parametrize("missing", ["train_images", "train_labels"])
def test_missing_train_arrays(tmp_path, missing):
    arrays = {"train_images": _images(4), "train_labels": np.array([0, 1, 0, 1])}
    del arrays[missing]
    _expect_error(_write_raw(tmp_path / "m.npz", **arrays), match=missing)


def test_half_a_validation_split(tmp_path):
    path = _write_raw(
        tmp_path / "h.npz", train_images=_images(4), train_labels=[0, 1, 0, 1], validation_images=_images(2)
    )
    _expect_error(path, match="validation_labels")


@pytest.mark.parametrize(
    "images, match",
    [
        (np.zeros((4,), np.uint8), "N x H x W"),
        (np.zeros((4, 2, 2, 3, 1), np.uint8), "N x H x W"),
        (np.zeros((4, 2, 2, 2), np.uint8), "1 or 3 channels"),
        (np.zeros((4, 2, 2, 4), np.uint8), "1 or 3 channels"),
        (np.full((4, 2, 2, 3), 1.5, np.float32), r"\[0, 1\]"),
        (np.full((4, 2, 2, 3), -0.1, np.float64), r"\[0, 1\]"),
        (np.full((4, 2, 2, 3), np.nan, np.float32), r"\[0, 1\]"),
        (np.full((4, 2, 2, 3), 300, np.int32), "0..255"),
        (np.full((4, 2, 2, 3), -1, np.int16), "0..255"),
        (np.zeros((4, 2, 2, 3), bool), "uint8 or float"),
        (np.full((4, 2, 2, 3), "x"), "uint8 or float"),
        (np.zeros((4, 0, 2, 3), np.uint8), "empty spatial"),
    ],
)
def test_bad_images(tmp_path, images, match):
    path = _write_raw(tmp_path / "b.npz", train_images=images, train_labels=np.array([0, 1, 0, 1]))
    _expect_error(path, match=match)


@pytest.mark.parametrize(
    "labels, match",
    [
        (np.array([0, 1, -1, 1]), "0..K-1"),
        (np.array([0.0, 1.5, 0.0, 1.0]), "0..K-1"),
        (np.array([0.0, np.nan, 0.0, 1.0]), "0..K-1"),
        (np.array(["a", "b", "a", "b"]), "integers"),
        (np.array([True, False, True, False]), "integers"),
        (np.zeros((4, 2), np.int32), "1-D"),
        (np.array([0, 1, 0]), "4 images but 3 labels"),
        (np.array([0, 0, 0, 0]), "at least 2 classes"),
    ],
)
def test_bad_labels(tmp_path, labels, match):
    path = _write_raw(tmp_path / "l.npz", train_images=_images(4), train_labels=labels)
    _expect_error(path, match=match)


def test_bad_validation_labels_are_reported(tmp_path):
    path = _write_raw(
        tmp_path / "v.npz", train_images=_images(4), train_labels=[0, 1, 0, 1],
        validation_images=_images(2), validation_labels=[0, -3],
    )
    _expect_error(path, match="validation labels")


def test_empty_train_set(tmp_path):
    path = _write_raw(tmp_path / "e.npz", train_images=np.zeros((0, 4, 4, 3), np.uint8), train_labels=np.zeros(0))
    _expect_error(path, match="empty")


def test_empty_test_set(tmp_path):
    path = _write_raw(
        tmp_path / "e.npz", train_images=_images(4), train_labels=[0, 1, 0, 1],
        test_images=np.zeros((0, 6, 6, 3), np.uint8), test_labels=np.zeros(0, np.int32),
    )
    _expect_error(path, match="test set is empty")


def test_single_train_example_cannot_split_validation(tmp_path):
    path = write_npz_task(tmp_path / "one.npz", _images(1), [0])
    _expect_error(path, match="too few")


@pytest.mark.parametrize("value", [0, -3, 2.5, True])
def test_bad_max_train_examples(tmp_path, value):
    path = write_npz_task(tmp_path / "t.npz", _images(10), np.arange(10) % 2)
    _expect_error(path, field="max_train_examples", max_train_examples=value)


@pytest.mark.parametrize(
    "name", ["", "__root__", "has space", "a/b", "x" * 64, None, "-lead", "Upper", "X" * 63, "ok\n"]
)
def test_bad_task_name(tmp_path, name):
    """The data layer applies the one task-name rule, evolve.types.validate_task_name."""
    path = write_npz_task(tmp_path / "t.npz", _images(10), np.arange(10) % 2)
    with pytest.raises(InvalidArgumentError) as info:
        load_task_data(TaskSpec(name, NpzSource(str(path))))
    assert info.value.field == "name"


def test_good_task_names(tmp_path):
    path = write_npz_task(tmp_path / "t.npz", _images(10), np.arange(10) % 2)
    for name in ("a", "cifar100", "my-task_v2.1", "x" * 63, "0lead"):
        assert load_task_data(TaskSpec(name, NpzSource(str(path)))).num_classes == 2


def test_one_task_name_rule(tmp_path):
    """load_task_data accepts exactly the names evolve.types.validate_task_name accepts, with its message."""
    from evolve.types import validate_task_name

    path = write_npz_task(tmp_path / "t.npz", _images(10), np.arange(10) % 2)
    for name in ("a", "A", "x" * 63, "x" * 64, "a.b-c_d", "_a", "é", "a b"):
        try:
            validate_task_name(name)
            expected = None
        except InvalidArgumentError as error:
            expected = error.description
        try:
            load_task_data(TaskSpec(name, NpzSource(str(path))))
            got = None
        except InvalidArgumentError as error:
            got = error.description
        assert got == expected, name


@pytest.mark.parametrize("path", ["", "   ", "a\x00b"])
def test_bad_path_strings(path):
    _expect_error(path)


def test_not_a_task_spec():
    with pytest.raises(InvalidArgumentError) as info:
        load_task_data(NpzSource("x.npz"))  # type: ignore[arg-type]
    assert info.value.field == "spec"


def test_unknown_source_type():
    with pytest.raises(InvalidArgumentError) as info:
        load_task_data(TaskSpec("t", "x.npz"))  # type: ignore[arg-type]
    assert info.value.field == "source"
