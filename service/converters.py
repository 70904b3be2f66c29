"""All conversion between protos and the library's domain objects.

Requests are validated here, at the boundary: bad input raises
InvalidArgumentError naming the offending field as the client spelled it
("spec.name", "inputs[0].shape", "encoded.images[3]"), which service/errors.py
turns into INVALID_ARGUMENT with a BadRequest field violation.
"""

from __future__ import annotations

import io
import math
import re
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from google.protobuf import timestamp_pb2

from evolve import events as domain_events
from evolve.data.limits import DEFAULT_LIMITS, check_image_header
from evolve.errors import InvalidArgumentError, ResourceExhaustedError
from evolve.types import (
    BundledSource,
    ImageFolderSource,
    NpzSource,
    SearchBudget,
    TaskSpec,
    TfdsSource,
    validate_task_name,
)
from service.gen.evolve.v1 import evolve_pb2
from service.gen.inference import grpc_predict_v2_pb2 as infer_pb2

if TYPE_CHECKING:  # the engine imports JAX; this module must not need it
    from evolve.engine import Prediction, SystemSummary, TaskInfo
    from evolve.search.budget import SearchPlan
    from evolve.types import ParentProbe
    from service.event_log import LoggedEvent
    from service.jobs import OperationRecord

# Image input limits (the engine resizes to its own image size anyway): the
# data layer's, so that Predict and task sources accept the same images.
MAX_IMAGE_SIDE = DEFAULT_LIMITS.max_image_side
CHANNELS = (1, 3)
DATATYPES = {"UINT8": np.dtype("<u1"), "FP32": np.dtype("<f4")}
BUDGET_LIMITS = {
    "generations": 10_000,
    "candidates_per_generation": 1_024,
    "train_rounds": 1_000,
    "examples_per_round": 100_000_000,
}

MAX_REQUEST_ID = 256  # characters; a UUID has 36
MAX_PATH = 4096  # characters of a data path (PATH_MAX)
MAX_FIELD = 1024  # characters of any other string of a task spec
# Decoded pixels of one encoded Predict batch (bytes as uint8 RGB): a few KiB of
# PNG can decode to 48 MiB, so the message size limit alone does not bound memory.
MAX_DECODED_BYTES = 256 * 1024 * 1024

INPUT_NAME = "images"
PROBABILITIES = "probabilities"
CLASSES = "classes"
PLATFORM = "evolve-jax"

# ---- task specs -------------------------------------------------------------


def task_name(name: str, field: str) -> str:
    """A task name a new task may take (checked before any work is queued)."""
    return validate_task_name(name, field)


def request_id(value: str, field: str = "request_id") -> str:
    if len(value) > MAX_REQUEST_ID:
        raise InvalidArgumentError(field, f"at most {MAX_REQUEST_ID} characters, got {len(value)}")
    return value


def _bounded(value: str, field: str, limit: int = MAX_FIELD) -> str:
    if len(value) > limit:
        raise InvalidArgumentError(field, f"at most {limit} characters, got {len(value)}")
    if "\x00" in value:
        raise InvalidArgumentError(field, "must not contain NUL characters")
    return value


def spec_from_proto(spec: evolve_pb2.TaskSpec, field: str = "spec") -> TaskSpec:
    """A validated TaskSpec; the data itself is checked when the task is added."""
    task_name(spec.name, f"{field}.name")
    kind = spec.WhichOneof("source")
    if kind is None:
        raise InvalidArgumentError(f"{field}.source", "one of tfds, npz, image_folder or bundled is required")
    source = _SOURCE_FROM_PROTO[kind](getattr(spec, kind), f"{field}.{kind}")
    return TaskSpec(name=spec.name, source=source, budget=_budget_from_proto(spec.budget, f"{field}.budget"))


def _tfds_from_proto(source: evolve_pb2.TfdsSource, field: str) -> TfdsSource:
    if not source.name:
        raise InvalidArgumentError(f"{field}.name", "a tfds data set name is required")
    for name in ("name", "train_split", "validation_split", "test_split", "image_key", "label_key"):
        _bounded(getattr(source, name), f"{field}.{name}")
    _bounded(source.data_dir, f"{field}.data_dir", MAX_PATH)
    validation = source.validation_split if source.HasField("validation_split") else ""
    return TfdsSource(
        name=source.name,
        data_dir=source.data_dir if source.HasField("data_dir") else None,
        train_split=source.train_split or "train",
        validation_split=validation or None,
        test_split=(source.test_split or None) if source.HasField("test_split") else "test",
        image_key=source.image_key or "image",
        label_key=source.label_key or "label",
    )


def _npz_from_proto(source: evolve_pb2.NpzSource, field: str) -> NpzSource:
    if not source.path:
        raise InvalidArgumentError(f"{field}.path", "a path is required")
    return NpzSource(path=_bounded(source.path, f"{field}.path", MAX_PATH))


def _fraction(value: float, field: str) -> float:
    if not (math.isfinite(value) and 0.0 <= value < 1.0):
        raise InvalidArgumentError(field, f"must be in [0, 1), got {value}")
    return float(value)


def _folder_from_proto(source: evolve_pb2.ImageFolderSource, field: str) -> ImageFolderSource:
    if not source.path:
        raise InvalidArgumentError(f"{field}.path", "a path is required")
    _bounded(source.path, f"{field}.path", MAX_PATH)
    validation = source.validation_fraction if source.HasField("validation_fraction") else 0.1
    test = source.test_fraction if source.HasField("test_fraction") else 0.1
    validation = _fraction(validation, f"{field}.validation_fraction")
    test = _fraction(test, f"{field}.test_fraction")
    if validation + test >= 1.0:
        raise InvalidArgumentError(f"{field}.test_fraction", "validation and test fractions leave no training data")
    return ImageFolderSource(path=source.path, validation_fraction=validation, test_fraction=test)


def _bundled_from_proto(source: evolve_pb2.BundledSource, field: str) -> BundledSource:
    if not source.name:
        raise InvalidArgumentError(f"{field}.name", "a bundled data set name is required")
    return BundledSource(name=_bounded(source.name, f"{field}.name"))


_SOURCE_FROM_PROTO = {
    "tfds": _tfds_from_proto,
    "npz": _npz_from_proto,
    "image_folder": _folder_from_proto,
    "bundled": _bundled_from_proto,
}


def _budget_from_proto(budget: evolve_pb2.SearchBudget, field: str) -> SearchBudget:
    values = {}
    for name, limit in BUDGET_LIMITS.items():
        if not budget.HasField(name):
            continue
        value = getattr(budget, name)
        if not 1 <= value <= limit:
            raise InvalidArgumentError(f"{field}.{name}", f"must be in 1..{limit}, got {value}")
        values[name] = int(value)
    return SearchBudget(**values)


# The TaskSpec oneof field of each source kind.
SOURCE_FIELDS = {TfdsSource: "tfds", NpzSource: "npz", ImageFolderSource: "image_folder", BundledSource: "bundled"}


def with_spec_field(error: InvalidArgumentError, spec: TaskSpec) -> InvalidArgumentError:
    """The same error with its field relative to the request (see spec_error_field)."""
    return InvalidArgumentError(spec_error_field(error.field, spec), error.description)


def spec_error_field(field: str, spec: TaskSpec, prefix: str = "spec") -> str:
    """The request field of an error the data layer reports about a spec.

    The library names fields relative to the TaskSpec ("source.name",
    "name"); clients see them relative to the request ("spec.bundled.name").
    """
    if field == prefix or field.startswith(prefix + "."):
        return field
    kind = SOURCE_FIELDS.get(type(spec.source), "source")
    if field == "source" or field.startswith("source."):
        return f"{prefix}.{kind}{field[len('source'):]}"
    return f"{prefix}.{field}"


def spec_to_proto(spec: TaskSpec) -> evolve_pb2.TaskSpec:
    message = evolve_pb2.TaskSpec(name=spec.name)
    source = spec.source
    if isinstance(source, TfdsSource):
        tfds = message.tfds
        tfds.name, tfds.train_split = source.name, source.train_split
        tfds.image_key, tfds.label_key = source.image_key, source.label_key
        if source.data_dir is not None:
            tfds.data_dir = source.data_dir
        if source.validation_split is not None:
            tfds.validation_split = source.validation_split
        tfds.test_split = source.test_split or ""
    elif isinstance(source, NpzSource):
        message.npz.path = source.path
    elif isinstance(source, ImageFolderSource):
        message.image_folder.path = source.path
        message.image_folder.validation_fraction = source.validation_fraction
        message.image_folder.test_fraction = source.test_fraction
    elif isinstance(source, BundledSource):
        message.bundled.name = source.name
    for name in BUDGET_LIMITS:
        value = getattr(spec.budget, name)
        if value is not None:
            setattr(message.budget, name, value)
    return message


# ---- tasks, operations, events, the system ---------------------------------


def task_to_proto(info: "TaskInfo") -> evolve_pb2.Task:
    task = evolve_pb2.Task(
        name=info.name,
        status=evolve_pb2.TaskStatus.Value(f"TASK_STATUS_{info.status}"),
        best_score=info.best_score or 0.0,
        validation_accuracy=info.validation_accuracy or 0.0,
        test_accuracy=info.test_accuracy or 0.0,
        params=info.params,
        accounted_params=info.accounted_params,
        own_params=info.own_params,
        path_params=info.path_params,
        flops=info.flops,
        path_version=info.path_version,
        shares_with=list(info.shares_with),
        num_classes=info.num_classes,
        spec=spec_to_proto(info.spec),
        status_message=info.message,
    )
    for component in info.components:
        task.components.add(
            name=component.name, id=component.id, locked_by=list(component.locked_by), params=component.params
        )
    for key, value in info.hparams.items():
        task.hparams[key] = str(value)
    task.probes.extend(probe_to_proto(p) for p in info.probes)
    return task


def probe_to_proto(probe: "ParentProbe") -> evolve_pb2.ParentProbe:
    return evolve_pb2.ParentProbe(
        path_id=probe.path_id, task=probe.task, accuracy=probe.accuracy, seconds=probe.seconds,
        chosen=probe.chosen, reason=probe.reason,
    )


def plan_to_proto(plan: "SearchPlan") -> evolve_pb2.SearchPlan:
    return evolve_pb2.SearchPlan(
        generations=plan.generations, candidates_per_generation=plan.candidates_per_generation,
        rounds=plan.rounds, examples_per_round=plan.examples_per_round, batch_size=plan.batch_size,
        steps_per_candidate=plan.steps_per_candidate, train_examples=plan.train_examples,
        validation_examples=plan.validation_examples, description=plan.describe(),
        first_generation_candidates=plan.first_generation_candidates, halving_round=plan.halving_round,
    )


def timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def operation_to_proto(record: "OperationRecord", task: "TaskInfo | None" = None) -> evolve_pb2.Operation:
    """An operation; `task` (the task as it stands) fills the response when done."""
    metadata = evolve_pb2.OperationMetadata(
        kind=record.kind,
        task=record.task,
        state=evolve_pb2.OperationState.Value(f"OPERATION_STATE_{record.state}"),
        generation=record.generation,
        generations=record.generations,
        candidates_scored=record.candidates_scored,
        best_score=record.best_score,
        best_quality=record.best_quality,
        create_time=timestamp(record.create_time),
        update_time=timestamp(record.update_time),
        current_task=record.current_task,
        tasks=list(record.tasks),
    )
    if record.plan is not None:
        metadata.plan.CopyFrom(plan_to_proto(record.plan))
    operation = evolve_pb2.Operation(name=record.name, metadata=metadata, done=record.done)
    if record.error is not None:
        operation.error.code = record.error.code
        operation.error.message = record.error.message
        operation.error.details.extend(record.error.details)
    elif record.done:
        operation.response.SetInParent()
        if task is not None:
            operation.response.task.CopyFrom(task_to_proto(task))
    return operation


def event_to_proto(logged: "LoggedEvent") -> evolve_pb2.Event:
    """A proto Event; generations become 1-based as the API documents."""
    message = evolve_pb2.Event(
        sequence=logged.sequence, time=timestamp(logged.time), task=logged.task, operation=logged.operation
    )
    event = logged.event
    if isinstance(event, domain_events.SearchStarted):
        message.search_started.CopyFrom(evolve_pb2.SearchStarted(
            kind=event.plan.kind, plan=plan_to_proto(event.plan), probes=[probe_to_proto(p) for p in event.probes]
        ))
    elif isinstance(event, domain_events.GenerationStarted):
        message.generation_started.CopyFrom(evolve_pb2.GenerationStarted(
            generation=event.generation + 1, generations=event.generations, candidates=event.candidates
        ))
    elif isinstance(event, domain_events.CandidateScored):
        message.candidate_scored.CopyFrom(evolve_pb2.CandidateScored(
            path_id=event.path_id, parent_id=event.parent_id, parent_task=event.parent_task,
            generation=event.generation + 1, score=event.score, quality=event.quality, params=event.params,
            flops=event.flops, mutations=list(event.mutations),
            accepted_into_population=event.accepted_into_population,
            train_seconds=event.train_seconds, compile_seconds=event.compile_seconds,
            learned_mu=dict(event.learned_mu),
        ))
    elif isinstance(event, domain_events.CandidateAccepted):
        message.candidate_accepted.CopyFrom(evolve_pb2.CandidateAccepted(
            path_id=event.path_id, score=event.score, quality=event.quality
        ))
    elif isinstance(event, domain_events.SearchFinished):
        message.search_finished.CopyFrom(evolve_pb2.SearchFinished(
            path_id=event.path_id, score=event.score, quality=event.quality, test_accuracy=event.test_accuracy,
            state=event.state, message=event.message,
        ))
    elif isinstance(event, domain_events.CheckpointWritten):
        message.checkpoint_written.CopyFrom(evolve_pb2.CheckpointWritten(
            step=event.step, directory=event.directory, new_components=event.new_components
        ))
    elif isinstance(event, domain_events.TrainingProgress):
        message.training_progress.CopyFrom(evolve_pb2.TrainingProgress(
            generation=event.generation + 1, generations=event.generations, candidates=event.candidates,
            step=event.step, steps=event.steps, examples_per_second=event.examples_per_second,
        ))
    return message


def summary_to_proto(summary: "SystemSummary") -> evolve_pb2.SystemSummary:
    message = evolve_pb2.SystemSummary(
        num_tasks=summary.num_tasks,
        num_components=summary.num_components,
        total_params=summary.total_params,
        dot=summary.dot(),
        checkpoint_step=summary.checkpoint_step,
        root_model=summary.root_description,
        config_name=summary.config_name,
        damaged_tasks=list(summary.damaged_tasks),
    )
    for task, params in summary.params_per_task.items():
        message.params_per_task[task] = params
    for (task_a, task_b), shared in sorted(summary.sharing.items()):
        message.edges.add(task_a=task_a, task_b=task_b, shared_components=shared)
    return message


# ---- paging -------------------------------------------------------------------

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
_PAGE_TOKEN = re.compile(r"o[0-9]{1,18}")


def page(items: Sequence[Any], page_size: int, page_token: str) -> tuple[Sequence[Any], str]:
    """One page of `items` and the token of the next ("" on the last page)."""
    start, end = page_bounds(page_size, page_token)
    return items[start:end], next_page_token(end, len(items))


def page_bounds(page_size: int, page_token: str) -> tuple[int, int]:
    """The offsets [start, end) of the page a request asks for."""
    if page_size < 0:
        raise InvalidArgumentError("page_size", f"must not be negative, got {page_size}")
    size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    start = 0
    if page_token:
        if not _PAGE_TOKEN.fullmatch(page_token):  # ASCII digits only: int() takes others
            raise InvalidArgumentError("page_token", "not a token this server issued")
        start = int(page_token[1:])
    return start, start + size


def next_page_token(end: int, total: int) -> str:
    """The token of the page after one ending at `end` of `total` items ("" on the last page)."""
    return f"o{end}" if end < total else ""


# ---- image tensors --------------------------------------------------------------


def _check_shape(shape: Sequence[int], field: str) -> tuple[int, ...]:
    """A [N, H, W, C] shape (a single [H, W, C] image gets N = 1)."""
    shape = tuple(int(d) for d in shape)
    if len(shape) == 3:
        shape = (1,) + shape
    if len(shape) != 4:
        raise InvalidArgumentError(field, f"expected [N, H, W, C] or [H, W, C], got {list(shape)}")
    if any(d < 0 for d in shape):
        raise InvalidArgumentError(field, f"dimensions must not be negative, got {list(shape)}")
    if shape[0] == 0:
        raise InvalidArgumentError(field, "the batch is empty")
    if not all(1 <= d <= MAX_IMAGE_SIDE for d in shape[1:3]):
        raise InvalidArgumentError(field, f"image height and width must be 1..{MAX_IMAGE_SIDE}, got {list(shape)}")
    if shape[3] not in CHANNELS:
        raise InvalidArgumentError(field, f"expected 1 or 3 channels, got {shape[3]}")
    return shape


def _dtype(datatype: str, field: str) -> np.dtype:
    if datatype not in DATATYPES:
        raise InvalidArgumentError(field, f"expected one of {sorted(DATATYPES)}, got {datatype!r}")
    return DATATYPES[datatype]


def _check_pixels(images: np.ndarray, field: str) -> np.ndarray:
    if images.dtype.kind == "f" and not (np.all(np.isfinite(images)) and images.min() >= 0.0 and images.max() <= 1.0):
        raise InvalidArgumentError(field, "FP32 pixels must be finite and within [0, 1]")
    return images


def array_from_bytes(data: bytes, datatype: str, shape: Sequence[int], field: str) -> np.ndarray:
    """Row-major little-endian image bytes as an [N, H, W, C] array."""
    dtype = _dtype(datatype, f"{field}.datatype")
    shape = _check_shape(shape, f"{field}.shape")
    expected = math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise InvalidArgumentError(
            f"{field}.data", f"expected {expected} bytes for shape {list(shape)} {datatype}, got {len(data)}"
        )
    images = np.frombuffer(data, dtype=dtype).reshape(shape)
    return _check_pixels(images, f"{field}.data")


def images_from_tensor(tensor: evolve_pb2.Tensor, field: str = "array") -> np.ndarray:
    return array_from_bytes(tensor.data, tensor.datatype, tensor.shape, field)


# Formats PIL may identify an encoded image as: the accepted ones, and common
# ones that are refused by name. Other parsers are never tried.
_IDENTIFIED_FORMATS = ("PNG", "JPEG", "GIF", "TIFF", "BMP", "WEBP")


def _undecodable(where: str, error: Exception) -> InvalidArgumentError | ResourceExhaustedError:
    """The error for an image PIL cannot read; never PIL's "<_io.BytesIO object at ...>"."""
    from PIL import Image, UnidentifiedImageError  # lazy: only this path needs PIL

    if isinstance(error, MemoryError):
        return ResourceExhaustedError(f"{where}: out of memory while decoding the image; retry later")
    if isinstance(error, Image.DecompressionBombError):
        return InvalidArgumentError(where, f"the image declares over {DEFAULT_LIMITS.max_image_pixels} pixels")
    if isinstance(error, UnidentifiedImageError):
        return InvalidArgumentError(where, "not a PNG or JPEG image")
    # PIL raises many kinds on damaged data (OSError, SyntaxError, EOFError, struct.error, zlib.error, ...)
    return InvalidArgumentError(where, f"not a decodable PNG or JPEG image: {type(error).__name__}: {error}")


def _open_image(blob: bytes) -> Any:
    from PIL import Image  # lazy: only this path needs PIL

    return Image.open(io.BytesIO(blob), formats=_IDENTIFIED_FORMATS)


def _checked_size(blob: bytes, where: str) -> tuple[int, int]:
    """(width, height) of an encoded image from its header, which must be an
    8-bit PNG or JPEG within the data layer's side and pixel limits."""
    try:
        with _open_image(blob) as image:
            check_image_header(image.format, image.mode, image.size, DEFAULT_LIMITS, where, "the image")
            return int(image.size[0]), int(image.size[1])
    except InvalidArgumentError:
        raise
    except Exception as error:  # noqa: BLE001 - PIL raises many kinds on damaged data
        raise _undecodable(where, error) from None


def _decode(blob: bytes, where: str) -> np.ndarray:
    """An encoded image (its header checked) as uint8 H x W x 3."""
    try:
        with _open_image(blob) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except Exception as error:  # noqa: BLE001 - PIL raises many kinds on damaged data
        raise _undecodable(where, error) from None


def images_from_encoded(encoded: evolve_pb2.EncodedImages, field: str = "encoded.images") -> np.ndarray:
    """Decodes 8-bit PNG / JPEG files to one uint8 [N, H, W, 3] batch (equal sizes).

    Every header is checked before anything is decoded: GIF, TIFF, 16-bit PNG
    and images over the data layer's side or pixel limits are refused by
    index, and the batch's decoded size is bounded by MAX_DECODED_BYTES.
    """
    if not encoded.images:
        raise InvalidArgumentError(field, "the batch is empty")
    sizes = [_checked_size(blob, f"{field}[{index}]") for index, blob in enumerate(encoded.images)]
    if sum(w * h * 3 for w, h in sizes) > MAX_DECODED_BYTES:
        raise InvalidArgumentError(
            field, f"the decoded batch exceeds {MAX_DECODED_BYTES >> 20} MiB; send fewer or smaller images"
        )
    for index, size in enumerate(sizes):
        if size != sizes[0]:
            raise InvalidArgumentError(
                f"{field}[{index}]", f"all images must have the same size; got {size} after {sizes[0]} (width x height)"
            )
    return np.stack([_decode(blob, f"{field}[{index}]") for index, blob in enumerate(encoded.images)])


def images_from_predict_request(request: evolve_pb2.PredictRequest) -> np.ndarray:
    kind = request.WhichOneof("input")
    if kind == "array":
        return images_from_tensor(request.array, "array")
    if kind == "encoded":
        return images_from_encoded(request.encoded, "encoded.images")
    raise InvalidArgumentError("input", "one of array or encoded is required")


def _contents_bytes(tensor, dtype: np.dtype, field: str) -> bytes:
    """The typed `contents` of a KServe input tensor, as raw bytes."""
    if dtype == DATATYPES["UINT8"]:
        values = np.asarray(tensor.contents.uint_contents, dtype=np.int64)
        if values.size and (values.min() < 0 or values.max() > 255):
            raise InvalidArgumentError(f"{field}.contents", "UINT8 values must be in 0..255")
        return values.astype(np.uint8).tobytes()
    return np.asarray(tensor.contents.fp32_contents, dtype="<f4").tobytes()


def images_from_infer_request(request: infer_pb2.ModelInferRequest) -> np.ndarray:
    """The image batch of a KServe v2 ModelInfer request (one input tensor)."""
    if len(request.inputs) != 1:
        raise InvalidArgumentError("inputs", f"expected exactly one input tensor, got {len(request.inputs)}")
    tensor = request.inputs[0]
    field = "inputs[0]"
    if tensor.name and tensor.name != INPUT_NAME:
        raise InvalidArgumentError(f"{field}.name", f"the model's input is {INPUT_NAME!r}, got {tensor.name!r}")
    dtype = _dtype(tensor.datatype, f"{field}.datatype")
    if request.raw_input_contents:
        if len(request.raw_input_contents) != len(request.inputs):
            raise InvalidArgumentError("raw_input_contents", "expected one raw content per input tensor")
        if tensor.HasField("contents"):
            raise InvalidArgumentError(f"{field}.contents", "use raw_input_contents or contents, not both")
        data = request.raw_input_contents[0]
    else:
        data = _contents_bytes(tensor, dtype, field)
    shape = _check_shape(tensor.shape, f"{field}.shape")
    expected = math.prod(shape)
    if len(data) != expected * dtype.itemsize:
        raise InvalidArgumentError(
            f"{field}.contents" if not request.raw_input_contents else "raw_input_contents[0]",
            f"expected {expected} {tensor.datatype} values for shape {list(shape)}, "
            f"got {len(data) // dtype.itemsize}",
        )
    images = np.frombuffer(data, dtype=dtype).reshape(shape)
    return _check_pixels(images, f"{field}.contents")


def probabilities_tensor(prediction: "Prediction") -> evolve_pb2.Tensor:
    probabilities = np.ascontiguousarray(prediction.probabilities, dtype="<f4")
    return evolve_pb2.Tensor(shape=list(probabilities.shape), datatype="FP32", data=probabilities.tobytes())


def predict_response(prediction: "Prediction") -> evolve_pb2.PredictResponse:
    classes = [int(c) for c in prediction.classes]
    names = list(prediction.class_names)
    response = evolve_pb2.PredictResponse(
        task=prediction.task,
        path_version=prediction.path_version,
        classes=classes,
        probabilities=probabilities_tensor(prediction),
    )
    if names:
        response.class_names.extend(names[c] if 0 <= c < len(names) else "" for c in classes)
    return response


def requested_outputs(request: infer_pb2.ModelInferRequest) -> list[str]:
    """Output names in the order the client asked for them (default: all)."""
    names = [output.name for output in request.outputs]
    for index, name in enumerate(names):
        if name not in (PROBABILITIES, CLASSES):
            raise InvalidArgumentError(
                f"outputs[{index}].name", f"unknown output {name!r}; known: {PROBABILITIES}, {CLASSES}"
            )
    return names or [PROBABILITIES, CLASSES]


def infer_response(
    prediction: "Prediction", request: infer_pb2.ModelInferRequest, outputs: Sequence[str]
) -> infer_pb2.ModelInferResponse:
    """Outputs as raw_output_contents, in the order of `outputs`."""
    response = infer_pb2.ModelInferResponse(
        model_name=prediction.task, model_version=str(prediction.path_version), id=request.id
    )
    for name in outputs:
        if name == PROBABILITIES:
            values = np.ascontiguousarray(prediction.probabilities, dtype="<f4")
            datatype = "FP32"
        else:
            values = np.ascontiguousarray(prediction.classes, dtype="<i8")
            datatype = "INT64"
        response.outputs.add(name=name, datatype=datatype, shape=list(values.shape))
        response.raw_output_contents.append(values.tobytes())
    return response


def model_metadata(info: "TaskInfo") -> infer_pb2.ModelMetadataResponse:
    response = infer_pb2.ModelMetadataResponse(
        name=info.name,
        versions=[str(info.path_version)] if info.path_version else [],
        platform=PLATFORM,
    )
    response.inputs.add(name=INPUT_NAME, datatype="UINT8", shape=[-1, -1, -1, 3])
    response.outputs.add(name=PROBABILITIES, datatype="FP32", shape=[-1, info.num_classes])
    response.outputs.add(name=CLASSES, datatype="INT64", shape=[-1])
    return response
