"""TensorFlow Datasets sources: mocked mnist and a tiny dataset really prepared on disk."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from evolve.data import DataLimits, load_task_data
from evolve.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    ResourceExhaustedError,
)
from evolve.types import TaskSpec, TfdsSource

tfds.disable_progress_bar()

NUM_TRAIN, NUM_TEST = 100, 20
NAME = "evolve_tiny_tfds_shapes"


class EvolveTinyTfdsShapes(tfds.core.GeneratorBasedBuilder):
    """100 train / 20 test 6x6 RGB images, 3 classes; generated, never downloaded.

    Pixel (0, 0) holds a unique id (train 0..99, test 100..119) and pixel
    (5, 5) holds 80 * label, so tests can check splits and label pairing.
    """

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(6, 6, 3)),
                    "label": tfds.features.ClassLabel(names=["circle", "square", "star"]),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {"train": self._generate_examples(0, NUM_TRAIN), "test": self._generate_examples(NUM_TRAIN, NUM_TEST)}

    def _generate_examples(self, first_id, count):
        rng = np.random.default_rng(first_id)
        for example_id in range(first_id, first_id + count):
            label = example_id % 3
            image = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
            image[0, 0] = example_id
            image[5, 5] = 80 * label
            yield example_id, {"image": image, "label": label}


@pytest.fixture(scope="module", params=["array_record", "tfrecord"])
def prepared(request, tmp_path_factory):
    """A data_dir with the tiny dataset prepared in one file format."""
    data_dir = tmp_path_factory.mktemp(f"tfds_{request.param}")
    EvolveTinyTfdsShapes(data_dir=str(data_dir), file_format=request.param).download_and_prepare()
    return str(data_dir)


# tfds' mock_data replaces download_and_prepare: the mocked datasets count as downloadable.
MOCK_LIMITS = DataLimits(allow_download=True)


def _load(data_dir, roots=(), max_train=None, limits: DataLimits | None = None, **source_fields):
    source = TfdsSource(name=NAME, data_dir=data_dir, **source_fields)
    return load_task_data(
        TaskSpec("tiny", source), data_roots=roots, max_train_examples=max_train, limits=limits or DataLimits()
    )


def _ids(split) -> set[int]:
    return set(split.images[:, 0, 0, 0].tolist())


def _check_pairing(split) -> None:
    np.testing.assert_array_equal(split.images[:, 5, 5, 0] // 80, split.labels)
    np.testing.assert_array_equal(split.images[:, 0, 0, 0] % 3, split.labels)


# ---- (a) mocked tfds -----------------------------------------------------------


def test_mocked_mnist_through_load_task_data():
    with tfds.testing.mock_data(num_examples=50):
        data = load_task_data(TaskSpec("mnist", TfdsSource(name="mnist")), limits=MOCK_LIMITS)
    assert data.num_classes == 10 and data.class_names == tuple(str(d) for d in range(10))
    for split in (data.train, data.validation, data.test):
        assert split.images.shape[1:] == (28, 28, 3) and split.images.dtype == np.uint8
        assert len(split) > 0 and 0 <= split.labels.min() and split.labels.max() < 10
    np.testing.assert_array_equal(data.train.images[..., 0], data.train.images[..., 2])  # gray -> RGB


def test_mocked_mnist_max_train_and_explicit_splits():
    with tfds.testing.mock_data(num_examples=40):
        data = load_task_data(
            TaskSpec("mnist", TfdsSource(name="mnist", validation_split="test", test_split=None)),
            max_train_examples=7, limits=MOCK_LIMITS,
        )
    assert len(data.train) == 7 and len(data.validation) == 40 and data.test is data.validation


# ---- (b) a dataset prepared on disk ----------------------------------------------


def test_default_validation_is_a_slice_of_train(prepared):
    data = _load(prepared)
    assert data.num_classes == 3 and data.class_names == ("circle", "square", "star")
    # mu2Net's 2% of train, raised towards 200 validation images up to 30% of train
    assert (len(data.train), len(data.validation), len(data.test)) == (70, 30, NUM_TEST)
    assert not _ids(data.train) & _ids(data.validation)
    assert _ids(data.train) | _ids(data.validation) == set(range(NUM_TRAIN))
    assert _ids(data.test) == set(range(NUM_TRAIN, NUM_TRAIN + NUM_TEST))
    for split in (data.train, data.validation, data.test):
        assert split.images.shape[1:] == (6, 6, 3)
        _check_pairing(split)


def test_max_train_examples_slices_train(prepared):
    data = _load(prepared, max_train=10)
    assert (len(data.train), len(data.validation)) == (10, 30)
    assert not _ids(data.train) & _ids(data.validation)


def test_explicit_validation_and_no_test(prepared):
    data = _load(prepared, max_train=30, validation_split="test", test_split=None)
    assert (len(data.train), len(data.validation)) == (30, NUM_TEST) and data.test is data.validation


def test_sliced_train_split_without_validation(prepared):
    data = _load(prepared, train_split="train[:50]")
    assert (len(data.train), len(data.validation)) == (35, 15)
    assert _ids(data.train) | _ids(data.validation) <= set(range(NUM_TRAIN))
    _check_pairing(data.train)


def test_deterministic(prepared):
    first, second = _load(prepared), _load(prepared)
    np.testing.assert_array_equal(first.train.images, second.train.images)
    np.testing.assert_array_equal(first.validation.labels, second.validation.labels)


def test_data_dir_inside_the_roots(prepared):
    parent = os.path.dirname(prepared)
    relative = os.path.basename(prepared)
    assert len(_load(relative, roots=[parent]).test) == NUM_TEST
    assert len(_load(None, roots=[prepared]).test) == NUM_TEST  # default data_dir: the first root
    assert len(_load("", roots=[prepared]).test) == NUM_TEST  # "" (proto default) means not given


# ---- (c) bad inputs ------------------------------------------------------------------


def _expect(field: str, data_dir=None, match: str | None = None, **source_fields) -> None:
    with pytest.raises(InvalidArgumentError, match=match) as info:
        _load(data_dir, **source_fields)
    assert info.value.field == field


def test_unknown_dataset_name(tmp_path):
    with pytest.raises(InvalidArgumentError, match="unknown tfds dataset") as info:
        load_task_data(TaskSpec("t", TfdsSource(name="no_such_dataset_evolve", data_dir=str(tmp_path))))
    assert info.value.field == "source.name"


@pytest.mark.parametrize("name", ["", "huggingface:mnist", "../mnist", "mnist name"])
def test_malformed_dataset_name(name):
    with pytest.raises(InvalidArgumentError) as info:
        load_task_data(TaskSpec("t", TfdsSource(name=name)))
    assert info.value.field == "source.name"


@pytest.mark.parametrize(
    "fields, field",
    [
        (dict(train_split="nope"), "source.train_split"),
        (dict(train_split="train[:"), "source.train_split"),
        (dict(validation_split="nope"), "source.validation_split"),
        (dict(test_split="nope"), "source.test_split"),
        (dict(test_split="test[5:5]"), "source.test_split"),
        (dict(label_key="nope"), "source.label_key"),
        (dict(label_key="image"), "source.label_key"),
        (dict(image_key="nope"), "source.image_key"),
        (dict(train_split=""), "source.train_split"),
    ],
)
def test_bad_fields(prepared, fields, field):
    _expect(field, prepared, **fields)


def test_missing_data_dir(tmp_path):
    _expect("source.data_dir", str(tmp_path / "missing"), match="as a tfds data_dir")
    with pytest.raises(InvalidArgumentError, match="not a directory") as info:
        _load("missing", roots=[str(tmp_path)])
    assert info.value.field == "source.data_dir"


# ---- (d) preparation and bounds (DataLimits) ---------------------------------------------


def _prepared_files(data_dir) -> list[str]:
    return [name for _, _, names in os.walk(data_dir) for name in names]


def test_unprepared_dataset_fails_fast_without_allow_download(tmp_path):
    started = time.monotonic()
    with pytest.raises(FailedPreconditionError) as info:
        _load(str(tmp_path))
    assert time.monotonic() - started < 10.0
    assert info.value.reason == "DATASET_NOT_PREPARED"
    message = str(info.value)
    assert f"{NAME!r} is not prepared under data_dir {str(tmp_path)!r}" in message
    assert "`tfds build`" in message and "--allow-download" in message
    assert _prepared_files(tmp_path) == []  # nothing was generated or downloaded


def test_allow_download_prepares_the_dataset(tmp_path):
    data = _load(str(tmp_path), limits=DataLimits(allow_download=True))
    assert len(data.test) == NUM_TEST and _prepared_files(tmp_path)
    assert len(_load(str(tmp_path)).test) == NUM_TEST  # prepared now: no download needed


def test_image_side_limit_from_the_feature_shape(prepared):
    with pytest.raises(InvalidArgumentError, match="6x6: sides must be at most 5") as info:
        _load(prepared, limits=DataLimits(max_image_side=5))
    assert info.value.field == "source.image_key"


def test_image_limits_of_each_decoded_example(prepared, monkeypatch):
    """Datasets of varying image sizes declare no static shape: each decoded example is checked."""
    from evolve.data import tfds_source

    monkeypatch.setattr(tfds_source, "_check_feature_shape", lambda *args: None)
    with pytest.raises(InvalidArgumentError, match=r"example 0 of split .* is 6x6: at most 35 pixels") as info:
        _load(prepared, limits=DataLimits(max_image_pixels=35))
    assert info.value.field == "source.image_key"


def test_decoded_size_is_bounded_before_reading_a_split(prepared, monkeypatch):
    from evolve.data import tfds_source

    read = []
    original = tfds_source._check_example
    monkeypatch.setattr(tfds_source, "_check_example", lambda *args: read.append(1) or original(*args))
    with pytest.raises(InvalidArgumentError, match="decompresses to at least") as info:
        _load(prepared, limits=DataLimits(max_decompressed_bytes=2000))  # 70 train images of 108 bytes
    assert info.value.field == "source.train_split"
    assert len(read) <= 19  # refused at the first example (random access) or once over (tf.data)


def test_memory_error_while_reading_is_resource_exhausted(prepared, monkeypatch):
    from evolve.data import tfds_source

    def out_of_memory(*args):
        raise MemoryError

    monkeypatch.setattr(tfds_source, "_check_example", out_of_memory)
    with pytest.raises(ResourceExhaustedError, match=f"tfds dataset {NAME!r}"):
        _load(prepared)


def test_reader_follows_the_file_format(prepared, monkeypatch):
    """array_record is read by random access (no TensorFlow), tfrecord through tf.data."""
    from evolve.data import tfds_source

    def refuse(*args, **kwargs):
        raise AssertionError("wrong reader")

    is_array_record = "array_record" in os.path.basename(prepared)
    unused = "_examples_tf_data" if is_array_record else "_examples_random_access"
    monkeypatch.setattr(tfds_source, unused, refuse)
    assert len(_load(prepared).test) == NUM_TEST
