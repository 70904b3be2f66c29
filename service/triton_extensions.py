"""Triton's model configuration, statistics and repository index extensions of
the Open Inference Protocol (inference.GRPCInferenceService), for evolve tasks.

A task is a model: name = task name, version = the task's path version. The
class labels travel as the JSON list "class_labels", in the model config's
`parameters` and in ModelMetadata's `parameters`.

ModelStats counts Predict and ModelInfer per model version, under one lock
(the server answers on many threads).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from evolve.errors import NotFoundError
from service import converters
from service.gen.inference import grpc_predict_v2_pb2 as infer_pb2

if TYPE_CHECKING:  # pragma: no cover
    from evolve.engine import Prediction, TaskInfo

EXTENSIONS = ("model_configuration", "statistics", "model_repository")
LABELS_PARAMETER = "class_labels"
BACKEND = "jax"
READY, UNAVAILABLE = "READY", "UNAVAILABLE"


def class_labels(info: TaskInfo) -> list[str]:
    """The task's class names, index i naming class i ("0", "1", ... when the data had none)."""
    return list(info.class_names) or [str(i) for i in range(info.num_classes)]


def labels_json(info: TaskInfo) -> str:
    return json.dumps(class_labels(info), ensure_ascii=False)


def model_metadata(info: TaskInfo) -> infer_pb2.ModelMetadataResponse:
    """converters.model_metadata plus the class labels parameter."""
    response = converters.model_metadata(info)
    response.parameters[LABELS_PARAMETER].string_param = labels_json(info)
    return response


def model_config(info: TaskInfo, max_batch_size: int) -> infer_pb2.ModelConfigResponse:
    """The configuration of a task's model: what ModelInfer takes and returns.

    Inputs: `images`, UINT8 (FP32 in [0, 1] is accepted too), one NHWC image
    of any size per batch element. Outputs: `probabilities` FP32
    [num_classes] and `classes` INT64, one scalar per batch element (Triton's
    dims [1] reshaped to [])."""
    config = infer_pb2.ModelConfig(
        name=info.name, platform=converters.PLATFORM, backend=BACKEND, max_batch_size=max_batch_size,
    )
    config.input.add(
        name=converters.INPUT_NAME, data_type=infer_pb2.TYPE_UINT8,
        format=infer_pb2.ModelInput.FORMAT_NHWC, dims=[-1, -1, 3],
    )
    config.output.add(name=converters.PROBABILITIES, data_type=infer_pb2.TYPE_FP32, dims=[info.num_classes])
    classes = config.output.add(name=converters.CLASSES, data_type=infer_pb2.TYPE_INT64, dims=[1])
    classes.reshape.SetInParent()  # an empty reshape: a scalar per batch element
    config.parameters[LABELS_PARAMETER].string_value = labels_json(info)
    config.parameters["accepted_input_datatypes"].string_value = "UINT8,FP32"
    return infer_pb2.ModelConfigResponse(config=config)


def repository_index(tasks: list[TaskInfo], ready_only: bool) -> infer_pb2.RepositoryIndexResponse:
    """Every task as a model: READY with its path version, or UNAVAILABLE with the reason."""
    response = infer_pb2.RepositoryIndexResponse()
    for info in sorted(tasks, key=lambda t: t.name):
        ready = info.status == READY
        if ready_only and not ready:
            continue
        response.models.add(
            name=info.name,
            version=str(info.path_version) if info.path_version else "",
            state=READY if ready else UNAVAILABLE,
            reason="" if ready else (info.message or f"task is {info.status}"),
        )
    return response


@dataclasses.dataclass
class _Counts:
    inference_count: int = 0  # batch elements of successful requests
    success: int = 0
    success_ns: int = 0
    fail: int = 0
    fail_ns: int = 0
    input_ns: int = 0  # successes only: decoding the request, before the engine's predict
    compute_ns: int = 0  # inside the engine's predict
    output_ns: int = 0  # building the response, after it
    last_inference_ms: int = 0


class ModelStats:
    """Inference counts and cumulative durations per (task, path version); thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], _Counts] = {}

    def success(self, task: str, version: str, batch: int, total_ns: int, phases_ns: tuple[int, int, int]) -> None:
        """One successful request of `batch` images; phases_ns: (input, compute, output)."""
        with self._lock:
            counts = self._counts.setdefault((task, version), _Counts())
            counts.inference_count += batch
            counts.success += 1
            counts.success_ns += total_ns
            counts.input_ns += phases_ns[0]
            counts.compute_ns += phases_ns[1]
            counts.output_ns += phases_ns[2]
            counts.last_inference_ms = time.time_ns() // 1_000_000

    def failure(self, task: str, version: str, total_ns: int) -> None:
        with self._lock:
            counts = self._counts.setdefault((task, version), _Counts())
            counts.fail += 1
            counts.fail_ns += total_ns
            counts.last_inference_ms = time.time_ns() // 1_000_000

    def forget(self, task: str) -> None:
        """Drops a deleted task's counts (a new task of that name starts from zero)."""
        with self._lock:
            for key in [key for key in self._counts if key[0] == task]:
                del self._counts[key]

    def versions(self, task: str) -> list[str]:
        with self._lock:
            return sorted((v for t, v in self._counts if t == task), key=lambda v: (len(v), v))

    def to_proto(self, task: str, version: str) -> infer_pb2.ModelStatistics:
        with self._lock:
            counts = dataclasses.replace(self._counts.get((task, version), _Counts()))
        stats = infer_pb2.ModelStatistics(
            name=task, version=version, last_inference=counts.last_inference_ms,
            inference_count=counts.inference_count, execution_count=counts.success,
        )
        infer = stats.inference_stats
        infer.success.count, infer.success.ns = counts.success, counts.success_ns
        infer.fail.count, infer.fail.ns = counts.fail, counts.fail_ns
        # Every successful request passes each phase once (perf_analyzer
        # requires equal compute counts, and finds the version whose queue
        # count rose); evolve does not queue inference, so queue time is 0.
        infer.queue.count = counts.success
        infer.compute_input.count, infer.compute_input.ns = counts.success, counts.input_ns
        infer.compute_infer.count, infer.compute_infer.ns = counts.success, counts.compute_ns
        infer.compute_output.count, infer.compute_output.ns = counts.success, counts.output_ns
        infer.cache_hit.SetInParent()
        infer.cache_miss.SetInParent()
        return stats


def statistics(stats: ModelStats, tasks: list[TaskInfo], name: str, version: str) -> infer_pb2.ModelStatisticsResponse:
    """Triton's ModelStatistics answer: every model (name empty) or one, every
    version it served (version empty) or one; NOT_FOUND for an unknown model
    or a version it never had."""
    by_name = {info.name: info for info in tasks}
    if name and name not in by_name:
        raise NotFoundError("model", name)
    response = infer_pb2.ModelStatisticsResponse()
    for task in sorted([name] if name else by_name):
        info = by_name[task]
        known = stats.versions(task)
        current = str(info.path_version) if info.path_version else ""
        if current and current not in known:
            known.append(current)
        if version:
            if name and version not in known:
                raise NotFoundError("model version", f"{name}/{version}")
            known = [v for v in known if v == version]
        for v in known:
            response.model_stats.append(stats.to_proto(task, v))
    return response


def failure_version(requested: str, info: TaskInfo | None) -> str | None:
    """The version a failed request counts under: the current one, when the
    task has a model and the request asked for it (or for none); None (not
    counted) otherwise, so that unknown names and versions add no entries."""
    if info is None or not info.path_version:
        return None
    current = str(info.path_version)
    return current if requested in ("", current) else None


@dataclasses.dataclass
class Counted:
    """Filled by the handler inside ModelStats.counting."""
    prediction: Prediction | None = None
    compute_start_ns: int = 0
    compute_end_ns: int = 0

    def predict(self, fn: Callable[..., Prediction], *args, **kwargs) -> Prediction:
        """Runs the prediction `fn(*args, **kwargs)`, timing it as compute."""
        self.compute_start_ns = time.perf_counter_ns()
        self.prediction = fn(*args, **kwargs)
        self.compute_end_ns = time.perf_counter_ns()
        return self.prediction


@contextlib.contextmanager
def counting(stats: ModelStats, lookup: Callable[[str], TaskInfo], task: str, version: str) -> Iterator[Counted]:
    """Counts one Predict or ModelInfer: a success when the block sets
    `prediction` and returns, a failure (of a known task version) when it
    raises. `lookup` is Engine.task."""
    start = time.perf_counter_ns()
    run = Counted()
    try:
        yield run
    except Exception:
        try:
            info = lookup(task) if task else None
        except NotFoundError:
            info = None
        where = failure_version(version, info)
        if where is not None:
            stats.failure(task, where, elapsed_ns(start))
        raise
    if run.prediction is not None:
        end = time.perf_counter_ns()
        phases = (run.compute_start_ns - start, run.compute_end_ns - run.compute_start_ns, end - run.compute_end_ns)
        stats.success(task, str(run.prediction.path_version), len(run.prediction.probabilities),
                      end - start, phases)


def elapsed_ns(start_ns: int) -> int:
    return max(time.perf_counter_ns() - start_ns, 0)
