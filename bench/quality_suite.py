"""A fixed suite of small image-classification tasks for the quality benchmark.

Every task is built from data that ships inside installed packages (nothing is
downloaded) or is drawn with numpy:

  digits_jitter          scikit-learn `load_digits`, 10 classes; the training
                         originals plus two random affine jitters of each
                         (the FIRST task); validation and test are held-out
                         originals, never jittered.
  digits_parity_mirror   the same digits mirrored left-right, even / odd.
  shapes                 synthetic shapes (disc, ring, square, triangle, plus,
                         x) at random position, size, rotation, contrast and
                         noise.
  digits_rot90           the digits rotated by 90 degrees, 10 classes.
  textures               16 x 16 grey patches of scikit-learn's two sample
                         photos (china.jpg, flower.jpg): which of 8 regions
                         (2 x 2 per photo) a patch comes from.
  digits_loops_inverted  the digits inverted, how many closed loops (0, 1, 2).
  mnist1d_2d             the `mnist1d` package's 1-D signals (its default
                         generator arguments) plotted as 16 x 16 grey images.

All digit tasks share one stratified split of the 1,797 digits, so no test
digit of any task was seen, in any form, in any task's training set. Patches
of the photos come from disjoint cells per split. The data is fixed: every
random choice uses a constant seed of this module, so `build_suite(seed)`
returns the same arrays for every seed (the benchmark seed changes training
only).

Images are uint8 N x H x W x 3 (grey repeated), sides 8 or 16; labels int32.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import random
import re
from typing import Callable

import numpy as np

logger = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"[a-z0-9_]+")
SIMILARITIES = ("first", "similar", "dissimilar")
ARRAY_NAMES = (
    "train_images",
    "train_labels",
    "validation_images",
    "validation_labels",
    "test_images",
    "test_labels",
)

# Fixed internal seeds: the data never depends on the benchmark seed.
DIGITS_SPLIT_SEED = 1001
DIGITS_JITTER_SEED = 1002
SHAPES_SEED = 1003
TEXTURES_SEED = 1004

DIGITS_VALIDATION, DIGITS_TEST = 300, 300
DIGITS_JITTER_COPIES = 2  # jittered copies per training original (plus the original)
# Closed loops per digit: 0 for 1 2 3 5 7; 1 for 0 4 6 9; 2 for 8.
DIGIT_LOOPS = np.array([1, 0, 0, 0, 1, 0, 1, 0, 2, 1], dtype=np.int32)

SHAPE_CLASSES = ("disc", "ring", "square", "triangle", "plus", "x")
SHAPE_SIDE = 16
SHAPES_PER_CLASS = {"train": 500, "validation": 60, "test": 100}

TEXTURE_SIDE = 16
TEXTURE_DOWNSAMPLE = 2  # block-average the photos first: a patch covers 32 x 32 photo pixels
TEXTURE_REGION_GRID = (2, 2)  # regions (classes) per photo: rows x columns
TEXTURE_CELL_GRID = (4, 4)  # cells per region, assigned to the splits below
TEXTURES_PER_CLASS = {"train": 400, "validation": 40, "test": 60}
# Split of each region's 4 x 4 cells: t = train, v = validation, s = test. Every
# row and column of cells holds some train cells, validation and test spread out.
TEXTURE_CELL_SPLITS = ("tvts", "tstv", "vtst", "ttvt")

MNIST1D_SIDE = 16
MNIST1D_VALUE_RANGE = (-3.5, 3.5)  # signal values mapped to the image rows (clipped)
MNIST1D_TRAIN, MNIST1D_VALIDATION = 3500, 500  # of the generator's 4,000 train signals
MNIST1D_SAMPLES_PER_COLUMN = 8


@dataclasses.dataclass(frozen=True, eq=False)
class SuiteTask:
    """One task of the suite: metadata and its three splits (read-only arrays)."""

    name: str
    description: str
    similarity: str  # "first", "similar" or "dissimilar" (to the first task)
    num_classes: int
    train_images: np.ndarray
    train_labels: np.ndarray
    validation_images: np.ndarray
    validation_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray

    def __post_init__(self) -> None:
        if not NAME_PATTERN.fullmatch(self.name):
            raise ValueError(f"task name {self.name!r} must match [a-z0-9_]+")
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {self.similarity!r}")
        for split in ("train", "validation", "test"):
            images, labels = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            _check_split(self.name, split, images, labels, self.num_classes)
            images.flags.writeable = False
            labels.flags.writeable = False

    def arrays(self) -> dict[str, np.ndarray]:
        """The six arrays by their npz names."""
        return {name: getattr(self, name) for name in ARRAY_NAMES}

    def sizes(self) -> tuple[int, int, int]:
        return len(self.train_labels), len(self.validation_labels), len(self.test_labels)


def _check_split(task: str, split: str, images: np.ndarray, labels: np.ndarray, num_classes: int) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{task}/{split}: images must be uint8 N x H x W x 3, got {images.dtype} {images.shape}")
    if labels.dtype != np.int32 or labels.shape != (len(images),):
        raise ValueError(f"{task}/{split}: labels must be int32 of shape ({len(images)},)")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"{task}/{split}: labels must lie in 0..{num_classes - 1}")
    if split == "train" and len(np.unique(labels)) != num_classes:
        raise ValueError(f"{task}/train: every class needs training examples")


# ---- shared helpers -------------------------------------------------------------


def grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    """Floats N x H x W in 0..255 -> uint8 N x H x W x 3 (rounded, clipped, grey repeated)."""
    values = np.clip(np.round(grey), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(np.repeat(values[..., None], 3, axis=-1))


def stratified_split(labels: np.ndarray, held_out: tuple[int, ...], seed: int) -> tuple[np.ndarray, ...]:
    """Disjoint sorted index sets (rest, held-out set 1, 2, ...) with the class
    proportions of the whole; the held-out sets have the given sizes.
    scikit-learn's stratified split, deterministic in seed."""
    from sklearn.model_selection import train_test_split

    rest, parts = np.arange(len(labels)), []
    for i, size in enumerate(held_out[::-1]):
        rest, part = train_test_split(rest, test_size=size, stratify=labels[rest], random_state=seed + i)
        parts.append(np.sort(part))
    return (np.sort(rest),) + tuple(parts[::-1])


# ---- digits ------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as floats N x 8 x 8 in 0..255 and int32 labels (read-only)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float64) * (255.0 / 16.0)
    labels = np.asarray(bunch.target, dtype=np.int32)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


@functools.lru_cache(maxsize=1)
def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train / validation / test indices into the digits, shared by every digit task."""
    _, labels = _digits()
    return stratified_split(labels, (DIGITS_VALIDATION, DIGITS_TEST), DIGITS_SPLIT_SEED)


def affine_jitter(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random small affine warp of each image (rotation +-12 deg, scale 0.9-1.1,
    shear +-0.1, shift +-1 px), bilinear, about the image centre; zeros outside."""
    from scipy.ndimage import affine_transform

    out = np.empty_like(images)
    height, width = images.shape[1:3]
    centre = np.array([(height - 1) / 2.0, (width - 1) / 2.0])
    for i, image in enumerate(images):
        angle = np.deg2rad(rng.uniform(-12.0, 12.0))
        scale = rng.uniform(0.9, 1.1)
        shear = rng.uniform(-0.1, 0.1)
        shift = rng.uniform(-1.0, 1.0, size=2)
        rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        forward = scale * rotation @ np.array([[1.0, shear], [0.0, 1.0]])
        inverse = np.linalg.inv(forward)  # affine_transform maps output coordinates to input
        offset = centre - inverse @ (centre + shift)
        out[i] = affine_transform(image, inverse, offset=offset, order=1, mode="constant", cval=0.0)
    return np.clip(out, 0.0, 255.0)


def _digit_task(
    name: str,
    description: str,
    similarity: str,
    num_classes: int,
    transform: Callable[[np.ndarray], np.ndarray],
    relabel: Callable[[np.ndarray], np.ndarray],
    train_images: np.ndarray | None = None,
    train_digits: np.ndarray | None = None,
) -> SuiteTask:
    """A task on the shared digits split: `transform` maps float images, `relabel` digits."""
    images, digits = _digits()
    train_idx, val_idx, test_idx = digits_split()
    if train_images is None:
        train_images, train_digits = images[train_idx], digits[train_idx]
    return SuiteTask(
        name=name,
        description=description,
        similarity=similarity,
        num_classes=num_classes,
        train_images=grey_to_rgb(transform(train_images)),
        train_labels=relabel(train_digits).astype(np.int32),
        validation_images=grey_to_rgb(transform(images[val_idx])),
        validation_labels=relabel(digits[val_idx]).astype(np.int32),
        test_images=grey_to_rgb(transform(images[test_idx])),
        test_labels=relabel(digits[test_idx]).astype(np.int32),
    )


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def build_digits_jitter() -> SuiteTask:
    """The first task: 10 digits; train = originals + jittered copies (train only)."""
    images, digits = _digits()
    train_idx, _, _ = digits_split()
    originals, labels = images[train_idx], digits[train_idx]
    rng = np.random.default_rng(DIGITS_JITTER_SEED)
    copies = [affine_jitter(originals, rng) for _ in range(DIGITS_JITTER_COPIES)]
    train_images = np.concatenate([originals] + copies)
    train_digits = np.concatenate([labels] * (1 + DIGITS_JITTER_COPIES))
    order = np.random.default_rng(DIGITS_JITTER_SEED + 1).permutation(len(train_digits))
    return _digit_task(
        "digits_jitter",
        "sklearn digits 8x8, 10 classes; train originals plus 2 random affine jitters each; "
        "validation/test are held-out originals",
        "first", 10, _identity, _identity, train_images[order], train_digits[order],
    )


def build_digits_parity_mirror() -> SuiteTask:
    return _digit_task(
        "digits_parity_mirror", "sklearn digits mirrored left-right, 2 classes: even / odd",
        "similar", 2, lambda x: x[:, :, ::-1], lambda d: d % 2,
    )


def build_digits_rot90() -> SuiteTask:
    return _digit_task(
        "digits_rot90", "sklearn digits rotated 90 degrees counter-clockwise, 10 classes",
        "similar", 10, lambda x: np.rot90(x, k=1, axes=(1, 2)), _identity,
    )


def build_digits_loops_inverted() -> SuiteTask:
    return _digit_task(
        "digits_loops_inverted", "sklearn digits inverted (255 - x), 3 classes: closed loops 0 / 1 / 2",
        "similar", 3, lambda x: 255.0 - x, lambda d: DIGIT_LOOPS[d],
    )


# ---- synthetic shapes -----------------------------------------------------------


def shape_distance(kind: str, qy: np.ndarray, qx: np.ndarray, radius: float) -> np.ndarray:
    """Signed distance (pixels, negative inside) of a shape centred at the origin
    in rotated coordinates (qy, qx); `radius` is its outer half-size."""
    if kind == "disc":
        return np.hypot(qy, qx) - radius
    if kind == "ring":
        width = max(1.2, 0.35 * radius)
        return np.abs(np.hypot(qy, qx) - (radius - width / 2)) - width / 2
    if kind == "square":
        return np.maximum(np.abs(qy), np.abs(qx)) - 0.85 * radius
    if kind == "triangle":  # equilateral, circumradius `radius`, a flat side up (apex down)
        angles = np.deg2rad([-90.0, 30.0, 150.0])  # outward normals of the three sides
        sides = [np.sin(a) * qy + np.cos(a) * qx for a in angles]
        return np.max(np.stack(sides), axis=0) - 0.5 * radius
    if kind in ("plus", "x"):
        if kind == "x":
            c = np.sqrt(0.5)
            qy, qx = c * (qy + qx), c * (qx - qy)
        half = max(0.8, 0.25 * radius)
        bar_h = np.maximum(np.abs(qx) - radius, np.abs(qy) - half)
        bar_v = np.maximum(np.abs(qx) - half, np.abs(qy) - radius)
        return np.minimum(bar_h, bar_v)
    raise ValueError(f"unknown shape {kind!r}")


def draw_shape(kind: str, rng: np.random.Generator, side: int = SHAPE_SIDE) -> np.ndarray:
    """One grey image (floats 0..255): a shape at random position, size, rotation
    (+-15 deg), foreground / background levels and Gaussian noise."""
    radius = rng.uniform(3.0, 6.5)
    margin = radius * 0.9
    cy, cx = rng.uniform(margin - 0.5, side - 0.5 - margin, size=2)
    angle = np.deg2rad(rng.uniform(-15.0, 15.0))
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float64)
    dy, dx = yy - cy, xx - cx
    qy = np.cos(angle) * dy - np.sin(angle) * dx
    qx = np.sin(angle) * dy + np.cos(angle) * dx
    coverage = np.clip(0.5 - shape_distance(kind, qy, qx, radius), 0.0, 1.0)  # ~1 px antialiased edge
    background = rng.uniform(0.0, 90.0)
    foreground = rng.uniform(background + 60.0, 255.0)
    noise = rng.normal(0.0, rng.uniform(4.0, 24.0), size=(side, side))
    return background + (foreground - background) * coverage + noise


def _shape_split(rng: np.random.Generator, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    labels = np.repeat(np.arange(len(SHAPE_CLASSES), dtype=np.int32), per_class)
    labels = labels[rng.permutation(len(labels))]
    images = np.stack([draw_shape(SHAPE_CLASSES[label], rng) for label in labels])
    return grey_to_rgb(images), labels


def build_shapes() -> SuiteTask:
    splits = {}
    for offset, (split, per_class) in enumerate(SHAPES_PER_CLASS.items()):
        splits[split] = _shape_split(np.random.default_rng([SHAPES_SEED, offset]), per_class)
    return SuiteTask(
        name="shapes",
        description=f"synthetic 16x16 grey shapes, {len(SHAPE_CLASSES)} classes ({', '.join(SHAPE_CLASSES)}); "
        "random position, size, rotation, contrast, noise",
        similarity="dissimilar",
        num_classes=len(SHAPE_CLASSES),
        train_images=splits["train"][0], train_labels=splits["train"][1],
        validation_images=splits["validation"][0], validation_labels=splits["validation"][1],
        test_images=splits["test"][0], test_labels=splits["test"][1],
    )


# ---- texture patches of the sample photos --------------------------------------


@functools.lru_cache(maxsize=1)
def _sample_photos_grey() -> tuple[np.ndarray, ...]:
    """china.jpg and flower.jpg as grey floats, block-averaged by TEXTURE_DOWNSAMPLE."""
    from sklearn.datasets import load_sample_images

    photos = []
    for image in load_sample_images().images:
        grey = np.asarray(image, dtype=np.float64) @ np.array([0.299, 0.587, 0.114])
        f = TEXTURE_DOWNSAMPLE
        h, w = (grey.shape[0] // f) * f, (grey.shape[1] // f) * f
        photos.append(grey[:h, :w].reshape(h // f, f, w // f, f).mean(axis=(1, 3)))
    return tuple(photos)


def texture_cells(photo_shape: tuple[int, int]) -> dict[str, list[tuple[int, int, int, int, int]]]:
    """Cells (class, y0, y1, x0, x1) of one photo by split; class is the region index."""
    rows, cols = TEXTURE_REGION_GRID
    cell_rows, cell_cols = TEXTURE_CELL_GRID
    height, width = photo_shape
    y_edges = np.linspace(0, height, rows * cell_rows + 1).astype(int)
    x_edges = np.linspace(0, width, cols * cell_cols + 1).astype(int)
    codes = {"t": "train", "v": "validation", "s": "test"}
    cells: dict[str, list] = {split: [] for split in codes.values()}
    for gy in range(rows * cell_rows):
        for gx in range(cols * cell_cols):
            region = (gy // cell_rows) * cols + gx // cell_cols
            split = codes[TEXTURE_CELL_SPLITS[gy % cell_rows][gx % cell_cols]]
            cells[split].append((region, y_edges[gy], y_edges[gy + 1], x_edges[gx], x_edges[gx + 1]))
    return cells


def _sample_patches(
    photo: np.ndarray, cells: list, per_region: int, region_offset: int, rng: np.random.Generator
) -> tuple[list[np.ndarray], list[int]]:
    """per_region random patches of each region, wholly inside that region's cells."""
    side = TEXTURE_SIDE
    by_region: dict[int, list] = {}
    for region, y0, y1, x0, x1 in cells:
        if y1 - y0 < side or x1 - x0 < side:
            raise ValueError(f"texture cell {y1 - y0}x{x1 - x0} is smaller than a {side}px patch")
        by_region.setdefault(region, []).append((y0, y1, x0, x1))
    patches, labels = [], []
    for region in sorted(by_region):
        options = by_region[region]
        for _ in range(per_region):
            y0, y1, x0, x1 = options[rng.integers(len(options))]
            y = rng.integers(y0, y1 - side + 1)
            x = rng.integers(x0, x1 - side + 1)
            patches.append(photo[y : y + side, x : x + side])
            labels.append(region_offset + region)
    return patches, labels


def build_textures() -> SuiteTask:
    photos = _sample_photos_grey()
    regions = TEXTURE_REGION_GRID[0] * TEXTURE_REGION_GRID[1]
    splits = {}
    for offset, (split, per_class) in enumerate(TEXTURES_PER_CLASS.items()):
        rng = np.random.default_rng([TEXTURES_SEED, offset])
        patches, labels = [], []
        for index, photo in enumerate(photos):
            p, lab = _sample_patches(photo, texture_cells(photo.shape)[split], per_class, index * regions, rng)
            patches += p
            labels += lab
        order = rng.permutation(len(labels))
        splits[split] = (grey_to_rgb(np.stack(patches)[order]), np.asarray(labels, dtype=np.int32)[order])
    return SuiteTask(
        name="textures",
        description=f"16x16 grey patches of sklearn's china.jpg / flower.jpg (downsampled x{TEXTURE_DOWNSAMPLE}), "
        f"{regions * len(photos)} classes: which {TEXTURE_REGION_GRID[0]}x{TEXTURE_REGION_GRID[1]} region of "
        "which photo; splits from disjoint cells",
        similarity="dissimilar",
        num_classes=regions * len(photos),
        train_images=splits["train"][0], train_labels=splits["train"][1],
        validation_images=splits["validation"][0], validation_labels=splits["validation"][1],
        test_images=splits["test"][0], test_labels=splits["test"][1],
    )


# ---- mnist1d rendered as images ---------------------------------------------------


def _mnist1d_raw() -> dict[str, np.ndarray]:
    """mnist1d's generator with its default arguments (seeded by the package itself).

    make_dataset reseeds the global `random` and `np.random` states; they are
    restored afterwards so that nothing else is affected.
    """
    import mnist1d.data

    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        return mnist1d.data.make_dataset(mnist1d.data.get_dataset_args())
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


def render_signals(signals: np.ndarray, side: int = MNIST1D_SIDE) -> np.ndarray:
    """Plots 1-D signals (N x L) as side x side grey images (floats 0..255).

    Column c covers the signal over its 1/side of the length (linearly
    interpolated, MNIST1D_SAMPLES_PER_COLUMN samples); its pixels are lit by
    their distance to the covered value range, so the trace is continuous and
    antialiased. High values are at the top.
    """
    length = signals.shape[1]
    fine = side * MNIST1D_SAMPLES_PER_COLUMN
    positions = (np.arange(fine + 1) / fine) * (length - 1)
    sampled = np.stack([np.interp(positions, np.arange(length), s) for s in signals])  # N x (fine + 1)
    low, high = MNIST1D_VALUE_RANGE
    rows = (high - np.clip(sampled, low, high)) / (high - low) * (side - 1)
    k = MNIST1D_SAMPLES_PER_COLUMN
    windows = np.stack([rows[:, c * k : (c + 1) * k + 1] for c in range(side)], axis=1)  # N x side x (k + 1)
    top, bottom = windows.min(axis=-1), windows.max(axis=-1)  # N x side
    pixel_rows = np.arange(side, dtype=np.float64)[None, :, None]  # rows along axis 1
    distance = np.maximum(top[:, None, :] - pixel_rows, pixel_rows - bottom[:, None, :])
    return 255.0 * np.clip(1.0 - np.maximum(distance, 0.0), 0.0, 1.0)


def build_mnist1d_2d() -> SuiteTask:
    data = _mnist1d_raw()
    x, y = np.asarray(data["x"]), np.asarray(data["y"], dtype=np.int32)
    x_test, y_test = np.asarray(data["x_test"]), np.asarray(data["y_test"], dtype=np.int32)
    train = slice(0, MNIST1D_TRAIN)
    val = slice(MNIST1D_TRAIN, MNIST1D_TRAIN + MNIST1D_VALIDATION)
    return SuiteTask(
        name="mnist1d_2d",
        description="mnist1d (default generator args) 1-D signals of length 40 plotted as 16x16 grey images, "
        "10 classes; test = the generator's test split",
        similarity="dissimilar",
        num_classes=10,
        train_images=grey_to_rgb(render_signals(x[train])), train_labels=y[train],
        validation_images=grey_to_rgb(render_signals(x[val])), validation_labels=y[val],
        test_images=grey_to_rgb(render_signals(x_test)), test_labels=y_test,
    )


# ---- the suite ------------------------------------------------------------------

# Task order: the first task, then similar and dissimilar tasks alternating.
BUILDERS: tuple[Callable[[], SuiteTask], ...] = (
    build_digits_jitter,
    build_digits_parity_mirror,
    build_shapes,
    build_digits_rot90,
    build_textures,
    build_digits_loops_inverted,
    build_mnist1d_2d,
)


@functools.lru_cache(maxsize=1)
def _suite() -> tuple[SuiteTask, ...]:
    tasks = []
    for builder in BUILDERS:
        task = builder()
        logger.info("suite task %s: %d classes, %d/%d/%d train/validation/test, %s",
                    task.name, task.num_classes, *task.sizes(), task.similarity)
        tasks.append(task)
    return tuple(tasks)


def build_suite(seed: int) -> list[SuiteTask]:
    """The suite's tasks in training order (the first task first).

    `seed` is the benchmark seed; the data deliberately does not depend on it
    (every task uses this module's fixed seeds), so all seeds get identical
    arrays and seeds differ only in training.
    """
    del seed  # the data is fixed across seeds on purpose
    return list(_suite())


def write_npz(task: SuiteTask, directory: str) -> str:
    """Writes the task's six arrays to <directory>/<name>.npz; returns the path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{task.name}.npz")
    with open(path, "wb") as f:  # a file object keeps numpy from renaming the file
        np.savez_compressed(f, **task.arrays())
    return path
