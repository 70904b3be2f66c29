"""Loads and runs an `evolve export` artefact with jax, numpy and orbax only.

    from evolve.export_runtime import load_exported

    model = load_exported("exported/digits")
    probabilities = model.probabilities(images)   # uint8 N x H x W x C
    classes = probabilities.argmax(-1); names = [model.class_names[c] for c in classes]

No engine, no Flax model code, no server: the model is the `jax.export`
serialisation in the artefact (see evolve/export.py for the layout). Batches
are padded to the next power of two (at most 1024 images per call), as the
server's Predict pads them, so the probabilities are bit-identical to Predict
for the same batch. Images of the model's size S x S run through predict.jax
alone; other sizes are resized first by evolve's own numpy preprocessing
(evolve.data.preprocess, numpy and Pillow), imported only then.

Without this module, plain JAX does the same for S x S images:

    exported = jax.export.deserialize(open(f"{d}/predict.jax", "rb").read())
    params = orbax.checkpoint.StandardCheckpointer().restore(f"{d}/params")
    probabilities = exported.call(params, images_uint8)   # pad the batch for bit-identity
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

SUPPORTED_FORMAT = 1


def bucket(n: int) -> int:
    """The padded batch size of n images: the next power of two (as the server pads)."""
    return 1 << max(n - 1, 0).bit_length()


@dataclasses.dataclass(frozen=True)
class ExportedModel:
    """A loaded export: config, parameters on a device, the two serialised functions."""

    config: Mapping[str, Any]
    params: Any
    predict_uint8: jax.export.Exported
    predict_preprocessed: jax.export.Exported

    @property
    def task(self) -> str:
        return str(self.config["task"])

    @property
    def version(self) -> int:
        return int(self.config["path_version"])

    @property
    def image_size(self) -> int:
        return int(self.config["image_size"])

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.config["class_names"])

    @property
    def max_batch(self) -> int:
        return int(self.config["batch"]["max"])

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """float32 N x classes for uint8 images N x H x W x C (C = 1 or 3) or N x H x W."""
        images = _as_rgb_uint8(images)
        size = self.image_size
        resize = images.shape[1:3] != (size, size)
        if resize:
            preprocess_eval = _preprocess_eval(images.shape, size)
        outputs = []
        for start in range(0, len(images), self.max_batch):
            chunk = images[start:start + self.max_batch]
            inputs = preprocess_eval(chunk, size) if resize else chunk
            padded = np.zeros((bucket(len(inputs)),) + inputs.shape[1:], inputs.dtype)
            padded[: len(inputs)] = inputs
            function = self.predict_preprocessed if resize else self.predict_uint8
            outputs.append(np.asarray(function.call(self.params, padded))[: len(inputs)])
        return np.concatenate(outputs) if outputs else np.zeros((0, len(self.class_names)), np.float32)

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(classes, probabilities) of a batch."""
        probabilities = self.probabilities(images)
        return probabilities.argmax(axis=-1), probabilities


def _as_rgb_uint8(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 N x H x W x C with C = 1 or 3, got {images.dtype} {images.shape}")
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    return images


def _preprocess_eval(shape: tuple[int, ...], size: int):
    try:
        from evolve.data.preprocess import preprocess_eval  # pylint: disable=import-outside-toplevel
    except ImportError as error:
        raise ValueError(
            f"images are {shape[1]} x {shape[2]} but the model takes {size} x {size}; resizing them as the "
            "server does needs evolve.data.preprocess (install evolve), or pass images of the model's size"
        ) from error
    return preprocess_eval


def _read_exported(path: str) -> jax.export.Exported:
    with open(path, "rb") as handle:
        return jax.export.deserialize(bytearray(handle.read()))


def load_exported(directory: str, device: jax.Device | None = None) -> ExportedModel:
    """The artefact `evolve export` wrote to `directory`; parameters go to `device`
    (default: JAX's default device)."""
    with open(os.path.join(directory, "config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    if config.get("format") != SUPPORTED_FORMAT:
        raise ValueError(f"{directory}: export format {config.get('format')!r}, this loader reads {SUPPORTED_FORMAT}")
    predict_uint8 = _read_exported(os.path.join(directory, "predict.jax"))
    predict_preprocessed = _read_exported(os.path.join(directory, "predict_preprocessed.jax"))
    # The function's own signature is the restore target: shapes and dtypes as exported.
    (abstract_params, _), _ = jax.tree.unflatten(predict_uint8.in_tree, predict_uint8.in_avals)
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), abstract_params)
    params = ocp.StandardCheckpointer().restore(os.path.join(os.path.abspath(directory), "params"), target)
    params = jax.device_put(params, device)
    return ExportedModel(config, params, predict_uint8, predict_preprocessed)
