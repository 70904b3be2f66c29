"""Validation and conversion of raw image / label arrays into an ImageSet."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Sequence

import numpy as np
from PIL import Image

from evolve.data.dataset import ImageSet
from evolve.errors import InvalidArgumentError

logger = logging.getLogger(__name__)

# Seed of every deterministic shuffle of the data layer (splits, subsets).
SPLIT_SEED = 0


@dataclasses.dataclass(frozen=True)
class ValidationSplit:
    """How much of train becomes validation when a source has none (DESIGN §3b):
    `fraction` of it, and at least `min_examples` where the data allows (never
    more than `max_share` of train)."""

    fraction: float = 0.2
    min_examples: int = 200
    max_share: float = 0.3

    def size(self, n: int) -> int:
        return max(1, int(n * self.fraction), min(self.min_examples, int(n * self.max_share)))


def to_uint8_rgb(images: object, field: str, what: str = "images") -> np.ndarray:
    """Converts N x H x W [x C] images (C = 1 or 3) to uint8 N x H x W x 3.

    Accepted values: any integer dtype within 0..255, or floats in [0, 1]
    (scaled to 0..255 and rounded). Grayscale is repeated to 3 channels.
    """
    if not isinstance(images, np.ndarray):
        raise InvalidArgumentError(field, f"{what} must be an array")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise InvalidArgumentError(field, f"{what} must be N x H x W or N x H x W x C, got shape {images.shape}")
    if images.shape[-1] not in (1, 3):
        raise InvalidArgumentError(field, f"{what} must have 1 or 3 channels, got {images.shape[-1]}")
    if images.shape[1] < 1 or images.shape[2] < 1:
        raise InvalidArgumentError(field, f"{what} have an empty spatial size {images.shape[1:3]}")
    images = _values_to_uint8(images, field, what)
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    return np.ascontiguousarray(images)


def _values_to_uint8(images: np.ndarray, field: str, what: str) -> np.ndarray:
    """Checks the value range of the dtype family and casts to uint8."""
    if images.dtype == np.uint8:
        return images
    if images.size == 0:
        return images.astype(np.uint8)
    if images.dtype == np.bool_ or not np.issubdtype(images.dtype, np.number):
        raise InvalidArgumentError(field, f"{what} must be uint8 or float, got dtype {images.dtype}")
    if np.issubdtype(images.dtype, np.integer):
        if images.min() < 0 or images.max() > 255:
            raise InvalidArgumentError(field, f"integer {what} must lie in 0..255")
        return images.astype(np.uint8)
    if np.issubdtype(images.dtype, np.floating):
        if not np.all(np.isfinite(images)) or images.min() < 0.0 or images.max() > 1.0:
            raise InvalidArgumentError(field, f"float {what} must lie in [0, 1]")
        return np.round(images.astype(np.float32) * 255.0).astype(np.uint8)
    raise InvalidArgumentError(field, f"{what} must be uint8 or float, got dtype {images.dtype}")


def to_labels(labels: object, field: str, what: str = "labels") -> np.ndarray:
    """Converts labels to a 1-D int32 array of non-negative integers.

    Integer dtypes are accepted, and floats whose values are all integral.
    Shape N or N x 1.
    """
    if not isinstance(labels, np.ndarray):
        raise InvalidArgumentError(field, f"{what} must be an array")
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise InvalidArgumentError(field, f"{what} must be 1-D, got shape {labels.shape}")
    if labels.dtype == np.bool_ or not np.issubdtype(labels.dtype, np.number):
        raise InvalidArgumentError(field, f"{what} must be integers, got dtype {labels.dtype}")
    if labels.size == 0:
        return labels.astype(np.int32)
    if np.issubdtype(labels.dtype, np.floating):
        if not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)):
            raise InvalidArgumentError(field, f"{what} must be integers 0..K-1")
    elif not np.issubdtype(labels.dtype, np.integer):
        raise InvalidArgumentError(field, f"{what} must be integers, got dtype {labels.dtype}")
    if labels.min() < 0 or labels.max() > np.iinfo(np.int32).max:
        raise InvalidArgumentError(field, f"{what} must be integers 0..K-1")
    return labels.astype(np.int32)


def make_image_set(images: object, labels: object, field: str, split: str) -> ImageSet:
    """Validates and converts one split's arrays."""
    uint8_images = to_uint8_rgb(images, field, f"{split} images")
    int_labels = to_labels(labels, field, f"{split} labels")
    if len(uint8_images) != len(int_labels):
        raise InvalidArgumentError(
            field, f"{split}: {len(uint8_images)} images but {len(int_labels)} labels"
        )
    return ImageSet(uint8_images, int_labels)


def split_off_validation(
    train: ImageSet, field: str, split: ValidationSplit = ValidationSplit()
) -> tuple[ImageSet, ImageSet]:
    """Splits a deterministic validation slice off train.

    The train set is permuted with a fixed seed (so that class-sorted files
    still give a mixed slice); the last `split.size(n)` examples of that
    order are validation, the rest stays train in its original order.
    """
    n = len(train)
    n_val = split.size(n)
    if n - n_val < 1:
        raise InvalidArgumentError(field, f"train set has {n} example(s): too few to split off a validation set")
    order = np.random.default_rng(SPLIT_SEED).permutation(n)
    return train.take(np.sort(order[:-n_val])), train.take(np.sort(order[-n_val:]))


def subsample(image_set: ImageSet, max_examples: int | None) -> ImageSet:
    """A deterministic (seeded) subset of at most `max_examples`, original order."""
    if max_examples is None or len(image_set) <= max_examples:
        return image_set
    keep = np.random.default_rng(SPLIT_SEED).choice(len(image_set), size=max_examples, replace=False)
    return image_set.take(np.sort(keep))


def num_classes_of(splits: Sequence[ImageSet], field: str) -> int:
    """max label + 1 over all splits; a task needs at least two classes."""
    num_classes = 1 + max(int(s.labels.max()) for s in splits if len(s))
    if num_classes < 2:
        raise InvalidArgumentError(field, "labels must span at least 2 classes (0..K-1 with K >= 2)")
    return num_classes


def cover_and_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """An H x W x 3 uint8 image resized (bilinear, antialiased) with its aspect
    ratio kept until it covers height x width, then cropped to it at the centre."""
    h, w = image.shape[:2]
    scale = max(height / h, width / w)
    covered = (max(width, round(w * scale)), max(height, round(h * scale)))
    resized = Image.fromarray(image).resize(covered, Image.BILINEAR) if covered != (w, h) else Image.fromarray(image)
    left, top = (covered[0] - width) // 2, (covered[1] - height) // 2
    return np.asarray(resized.crop((left, top, left + width, top + height)))


def stack_images(images: Iterable[np.ndarray], count: int | None = None) -> np.ndarray:
    """Stacks H x W x 3 uint8 images at the first one's size; another size is
    resized with its aspect ratio kept (`cover_and_crop`), never stretched.

    With `count`, `images` may be a generator: each image is written into the
    stack as it comes, so only one decoded image is held besides the stack.
    """
    if count is None:
        images = list(images)
        count = len(images)
    if count < 1:
        raise ValueError("no images to stack")
    out: np.ndarray | None = None
    resized = seen = 0
    for image in images:
        if seen >= count:
            raise ValueError(f"more than the {count} images announced")
        if out is None:
            out = np.empty((count,) + image.shape[:2] + (3,), dtype=np.uint8)
        height, width = out.shape[1:3]
        if image.shape[:2] != (height, width):
            image = cover_and_crop(image, height, width)
            resized += 1
        out[seen] = image
        seen += 1
    if out is None or seen != count:
        raise ValueError(f"{seen} images to stack, {count} announced")
    if resized:
        logger.info("resized %d of %d images to %dx%d", resized, count, out.shape[2], out.shape[1])
    return out
