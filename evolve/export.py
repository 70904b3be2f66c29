"""One task's served path as a standalone artefact (DESIGN §8, `evolve export`).

An export directory holds:
  params/                   orbax checkpoint: {component name: parameters}, the
                            served path's components in forward order;
  predict.jax               `jax.export` serialisation of
                            f(params, uint8[b, S, S, 3]) -> float32[b, classes]:
                            pixel scaling, the ViT and the softmax;
  predict_preprocessed.jax  the same model on float32[b, S, S, 3] in [-1, 1],
                            for images evolve's numpy preprocessing resized;
  config.json               what the model is: task, classes, image size S, the
                            ViT structure, hyperparameters, preprocessing,
                            batching and provenance.

The batch dimension `b` is symbolic (jax.export shape polymorphism), so one
serialisation serves every batch size. Predict pads a batch to the next power
of two (at most 1024 images) and XLA's results can differ in the last bit
between batch sizes, so a loader that pads the same way
(evolve.export_runtime) predicts bit-identically to the server for the same
batch.

Pixel scaling in predict.jax is a lookup table built by
evolve.data.preprocess.preprocess_eval itself, so it equals the server's
numpy arithmetic exactly on any backend. Resizing stays out of the graph: the
server resizes with numpy (an antialiased bilinear filter whose taps depend on
the input size), which a fixed graph cannot reproduce to the bit; images of
another size go through preprocess_eval and predict_preprocessed.jax.

Export reads a state directory offline and read-only (no server, no lock):
a committed manifest step never changes and components are written once, so
reading beside a running server is safe, and a task is READY only after the
checkpoint holding its model has committed.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import logging
import os
import shutil
import tempfile
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

import evolve
from evolve import checkpoint
from evolve.data.preprocess import preprocess_eval
from evolve.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from evolve.search.iteration import structure_of
from evolve.system import TaskStatus
from evolve.train import steps
from evolve.types import Params, PathStructure

logger = logging.getLogger(__name__)

EXPORT_FORMAT = 1
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
PREDICT_FILE = "predict.jax"
PREPROCESSED_FILE = "predict_preprocessed.jax"
# Lowered for both, so an artefact exported on a CPU machine runs on a GPU too.
DEFAULT_PLATFORMS = ("cpu", "cuda")
# Engine.predict's batch limit and padding (EngineOptions.max_predict_batch, engine._bucket).
MAX_BATCH = 1024


@dataclasses.dataclass(frozen=True)
class ExportResult:
    directory: str
    task: str
    path_id: str
    path_version: int
    checkpoint_step: int
    image_size: int
    class_names: tuple[str, ...]
    platforms: tuple[str, ...]
    files: Mapping[str, int]  # relative path -> bytes


def pixel_table() -> np.ndarray:
    """float32[256]: what preprocess_eval makes of each uint8 pixel value."""
    values = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=-1)
    return preprocess_eval(values, 16)[0, :, :, 0].reshape(256)


def _predict_uint8(params: Mapping[str, Params], images: jax.Array, *, structure: PathStructure,
                   table: np.ndarray) -> jax.Array:
    scaled = jnp.take(jnp.asarray(table), images.astype(jnp.int32), axis=0)
    return steps.predict_probabilities(params, scaled, structure=structure)


def _export(function, params: Mapping[str, Params], image_size: int, dtype, platforms: Sequence[str]) -> bytes:
    (batch,) = jax.export.symbolic_shape("b")
    abstract_params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype), params)
    images = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), dtype)
    exported = jax.export.export(jax.jit(function), platforms=tuple(platforms))(abstract_params, images)
    return bytes(exported.serialize())


def serialize_predict(structure: PathStructure, params: Mapping[str, Params],
                      platforms: Sequence[str] = DEFAULT_PLATFORMS) -> tuple[bytes, bytes]:
    """(predict.jax, predict_preprocessed.jax) of a path, batch dimension symbolic."""
    uint8 = functools.partial(_predict_uint8, structure=structure, table=pixel_table())
    preprocessed = functools.partial(steps.predict_probabilities, structure=structure)
    return (_export(uint8, params, structure.image_size, jnp.uint8, platforms),
            _export(preprocessed, params, structure.image_size, jnp.float32, platforms))


def _model_config(structure: PathStructure, component_ids: Mapping[str, str]) -> dict[str, Any]:
    return {
        "architecture": "ViT",
        "vit": dataclasses.asdict(structure.size),
        "num_layers": structure.num_layers,
        "adapter_layers": list(structure.adapter_layers),
        "adapter_dim": structure.adapter_dim,
        "image_size": structure.image_size,
        "num_classes": structure.num_classes,
        "components": [{"name": name, "id": component_ids[name]} for name in structure.component_names()],
    }


def _config(task: str, record, path, structure: PathStructure, step: int, state_dir: str,
            platforms: Sequence[str]) -> dict[str, Any]:
    size = structure.image_size
    return {
        "format": EXPORT_FORMAT,
        "task": task,
        "path_id": path.id,
        "path_version": path.version,
        "class_names": list(record.class_names) or [str(i) for i in range(structure.num_classes)],
        "image_size": size,
        "inputs": {
            PREDICT_FILE: {"name": "images", "dtype": "uint8", "shape": [None, size, size, 3], "layout": "NHWC RGB"},
            PREPROCESSED_FILE: {"name": "images", "dtype": "float32", "shape": [None, size, size, 3],
                                "range": [-1.0, 1.0]},
        },
        "output": {"name": "probabilities", "dtype": "float32", "shape": [None, structure.num_classes]},
        "preprocessing": {
            "resize": f"images of another size: bilinear, antialiased when shrinking, to {size} x {size} "
                      "(evolve.data.preprocess.preprocess_eval), then predict_preprocessed.jax",
            "scale": "x / 127.5 - 1, clipped to [-1, 1] (a lookup table inside predict.jax)",
            "grayscale": "repeated to 3 channels",
        },
        "batch": {"dimension": "symbolic", "pad_to": "power_of_two", "max": MAX_BATCH,
                  "why": "padded like the server's Predict, predictions are bit-identical to it"},
        "platforms": list(platforms),
        "model": _model_config(structure, path.components),
        "hparams": dict(path.hparams),
        "metrics": {"score": path.score, "validation_accuracy": path.quality, "test_accuracy": path.test_accuracy},
        "source": {"state_dir": os.path.abspath(state_dir), "checkpoint_step": step},
        "versions": {"evolve": evolve.__version__, "jax": jax.__version__},
        "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _check_out_dir(out_dir: str) -> str:
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise InvalidArgumentError("out", f"{out_dir} exists and is not an empty directory")
    return out_dir


def _file_sizes(directory: str) -> dict[str, int]:
    sizes = {}
    for root, _, names in os.walk(directory):
        for name in names:
            full = os.path.join(root, name)
            sizes[os.path.relpath(full, directory)] = os.path.getsize(full)
    return dict(sorted(sizes.items()))


def export_task(state_dir: str, task: str, out_dir: str, *,
                platforms: Sequence[str] = DEFAULT_PLATFORMS) -> ExportResult:
    """Writes the served path of `task`, as the newest checkpoint under
    `state_dir` holds it, to `out_dir` (new or empty).

    Reads the state directory only. The artefact appears complete or not at
    all: it is written beside `out_dir` and renamed into place. Raises
    NotFoundError (no such task), FailedPreconditionError (no checkpoint, or
    the task is not READY) and InvalidArgumentError (a non-empty `out_dir`).
    """
    out_dir = _check_out_dir(out_dir)
    restored = checkpoint.restore(state_dir, read_only=True)
    if restored is None:
        raise FailedPreconditionError("NO_CHECKPOINT", f"{os.path.abspath(state_dir)} holds no checkpoint")
    system = restored.system
    record = system.tasks.get(task)
    if record is None:
        raise NotFoundError("task", task)
    path = system.best_path(task)
    if record.status != TaskStatus.READY or path is None:
        why = f": {record.message}" if record.message else ""
        raise FailedPreconditionError(
            "TASK_NOT_READY", f"task {task!r} is {record.status.value}{why}; only a READY task's model can be exported"
        )
    structure = structure_of(system.config, record.num_classes, path.hparams, list(path.components))
    params = {name: system.components[cid].params for name, cid in path.components.items()}
    predict_blob, preprocessed_blob = serialize_predict(structure, params, platforms)

    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.", dir=parent)
    try:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(os.path.join(staging, PARAMS_DIR), params)
        checkpointer.wait_until_finished()
        for name, blob in ((PREDICT_FILE, predict_blob), (PREPROCESSED_FILE, preprocessed_blob)):
            with open(os.path.join(staging, name), "wb") as handle:
                handle.write(blob)
        config = _config(task, record, path, structure, restored.step, state_dir, platforms)
        with open(os.path.join(staging, CONFIG_FILE), "w", encoding="utf-8") as handle:
            json.dump(config, handle, indent=2)
            handle.write("\n")
        os.chmod(staging, 0o755)  # mkdtemp makes it 0700
        os.replace(staging, out_dir)  # onto a missing or empty directory: atomic
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("exported task %s (path %s, version %d) to %s", task, path.id, path.version, out_dir)
    return ExportResult(
        directory=out_dir, task=task, path_id=path.id, path_version=path.version, checkpoint_step=restored.step,
        image_size=structure.image_size, class_names=tuple(config["class_names"]), platforms=tuple(platforms),
        files=_file_sizes(out_dir),
    )
