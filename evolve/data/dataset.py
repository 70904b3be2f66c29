"""In-memory task data: images and labels of the train / validation / test splits.

Every source (tfds, npz, image folder, bundled demo) is converted to this one
form: uint8 images N x H x W x 3 and int32 labels, held on the host.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class ImageSet:
    """One split: uint8 images N x H x W x 3 and int32 labels of length N."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        images, labels = self.images, self.labels
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
            raise ValueError(f"images must be a uint8 numpy array, got {getattr(images, 'dtype', type(images))}")
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must have shape N x H x W x 3, got {images.shape}")
        if not isinstance(labels, np.ndarray) or labels.dtype != np.int32 or labels.ndim != 1:
            raise ValueError("labels must be a 1-D int32 numpy array")
        if len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, 3) of the stored images."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def take(self, indices: np.ndarray) -> "ImageSet":
        """The examples at `indices`, in that order (a copy)."""
        indices = np.asarray(indices, dtype=np.int64)
        return ImageSet(self.images[indices], self.labels[indices])


@dataclasses.dataclass(frozen=True, eq=False)
class TaskData:
    """The three splits of a task and its label space."""

    train: ImageSet
    validation: ImageSet
    test: ImageSet
    num_classes: int
    class_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {self.num_classes}")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {self.num_classes} classes")
        for split in (self.train, self.validation, self.test):
            if len(split) and int(split.labels.max()) >= self.num_classes:
                raise ValueError("a label is >= num_classes")
