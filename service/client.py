"""A typed Python client of an evolve server (evolve.v1 and the inference API).

    with EvolveClient("localhost:8500", token="...") as client:
        operation = client.submit_task(spec)
        for event in client.watch(task=spec.name):
            ...
        prediction = client.predict("digits", images)

Errors are the grpc.RpcError the stubs raise; `describe_error` renders one
(status code, message and google.rpc details) for people. Importing this module
loads neither JAX nor TensorFlow.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Iterator, NamedTuple, Sequence

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from evolve import types
from service import operation_filter
from service.gen.evolve.v1 import evolve_pb2, evolve_pb2_grpc
from service.gen.inference import grpc_predict_v2_pb2, grpc_predict_v2_pb2_grpc

logger = logging.getLogger(__name__)

DEFAULT_TARGET = "localhost:8500"
DEFAULT_TIMEOUT_S = 30.0
# Extra deadline on top of a server-side wait, so the server answers first.
_WAIT_MARGIN_S = 10.0
_DONE_STATES = frozenset({
    evolve_pb2.OPERATION_STATE_SUCCEEDED,
    evolve_pb2.OPERATION_STATE_FAILED,
    evolve_pb2.OPERATION_STATE_CANCELLED,
})


class Prediction(NamedTuple):
    """The answer of `predict`: unpacks as (probabilities, classes, class_names, version)."""

    probabilities: np.ndarray  # float32 (N, num_classes)
    classes: np.ndarray  # int (N,)
    class_names: list[str]  # parallel to classes; empty when the task has none
    version: int  # path version of the model that answered


# ---- conversions -------------------------------------------------------------


def spec_to_proto(spec: types.TaskSpec | evolve_pb2.TaskSpec) -> evolve_pb2.TaskSpec:
    """An evolve.types.TaskSpec as the wire TaskSpec (a proto passes through)."""
    if isinstance(spec, evolve_pb2.TaskSpec):
        return spec
    if not isinstance(spec, types.TaskSpec):
        raise TypeError(f"expected an evolve.types.TaskSpec or an evolve_pb2.TaskSpec, got {type(spec).__name__}")
    message = evolve_pb2.TaskSpec(name=spec.name)
    source = spec.source
    if isinstance(source, types.BundledSource):
        message.bundled.name = source.name
    elif isinstance(source, types.NpzSource):
        message.npz.path = source.path
    elif isinstance(source, types.ImageFolderSource):
        message.image_folder.path = source.path
        message.image_folder.validation_fraction = source.validation_fraction
        message.image_folder.test_fraction = source.test_fraction
    elif isinstance(source, types.TfdsSource):
        tfds = message.tfds
        tfds.name = source.name
        tfds.train_split = source.train_split
        tfds.image_key = source.image_key
        tfds.label_key = source.label_key
        if source.data_dir is not None:
            tfds.data_dir = source.data_dir
        if source.validation_split is not None:
            tfds.validation_split = source.validation_split
        # None means "no test split", which the wire spells as an empty string.
        tfds.test_split = "" if source.test_split is None else source.test_split
    else:
        raise TypeError(f"unsupported task source {type(source).__name__}")
    for field in ("generations", "candidates_per_generation", "train_rounds", "examples_per_round"):
        value = getattr(spec.budget, field)
        if value is not None:
            setattr(message.budget, field, int(value))
    return message


def images_to_tensor(images: np.ndarray) -> evolve_pb2.Tensor:
    """A batch of images as a wire Tensor.

    Accepts N x H x W x C (C = 1 or 3) or N x H x W (grayscale); uint8 pixels
    in 0..255 travel as UINT8, floating pixels in [0, 1] as FP32. Grayscale is
    repeated to 3 channels, as the server expects.
    """
    array = np.asarray(images)
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3):
        raise ValueError(f"images must be N x H x W x C with C = 1 or 3 (or N x H x W), got shape {array.shape}")
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    if array.dtype == np.uint8:
        datatype, wire = "UINT8", array
    elif np.issubdtype(array.dtype, np.floating):
        datatype, wire = "FP32", array.astype("<f4")
    elif np.issubdtype(array.dtype, np.integer) and (array.size == 0 or (array.min() >= 0 and array.max() <= 255)):
        datatype, wire = "UINT8", array.astype(np.uint8)
    else:
        raise ValueError(f"images must be uint8 (0..255) or floating point ([0, 1]), got {array.dtype}")
    return evolve_pb2.Tensor(shape=list(wire.shape), datatype=datatype, data=np.ascontiguousarray(wire).tobytes())


_NUMPY_TYPES = {"UINT8": np.dtype("u1"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"), "INT32": np.dtype("<i4"),
                "INT64": np.dtype("<i8")}


def tensor_to_array(tensor: evolve_pb2.Tensor) -> np.ndarray:
    """A wire Tensor as a numpy array of its shape."""
    dtype = _NUMPY_TYPES.get(tensor.datatype)
    if dtype is None:
        raise ValueError(f"unsupported tensor datatype {tensor.datatype!r}")
    return np.frombuffer(tensor.data, dtype=dtype).reshape(tuple(tensor.shape))


# ---- errors --------------------------------------------------------------------


def _describe_details(details: Sequence, message: str = "") -> list[str]:
    """One line per google.rpc detail (an Any) that people can read."""
    from google.rpc import error_details_pb2  # pylint: disable=import-outside-toplevel

    lines = []
    for any_detail in details:
        for cls in (error_details_pb2.BadRequest, error_details_pb2.RetryInfo, error_details_pb2.ErrorInfo,
                    error_details_pb2.PreconditionFailure, error_details_pb2.ResourceInfo,
                    error_details_pb2.QuotaFailure, error_details_pb2.DebugInfo, error_details_pb2.Help,
                    error_details_pb2.LocalizedMessage, error_details_pb2.RequestInfo):
            if any_detail.Is(cls.DESCRIPTOR):
                detail = cls()
                any_detail.Unpack(detail)
                lines.extend(_detail_lines(detail, message))
                break
        else:
            lines.append(f"  ({any_detail.type_url})")
    return lines


def _detail_lines(detail, message: str) -> list[str]:
    name = type(detail).__name__
    if name == "BadRequest":
        # The message already reads "field: description" for a single violation: say it once.
        violations = [v for v in detail.field_violations if f"{v.field}: {v.description}" != message]
        if not detail.field_violations:
            return ["  bad request"]
        return [f"  invalid {v.field}: {v.description}" for v in violations]
    if name == "RetryInfo":
        delay = detail.retry_delay.seconds + detail.retry_delay.nanos / 1e9
        return [f"  retry after {delay:g} s"]
    if name == "ErrorInfo":
        extra = "".join(f" {k}={v}" for k, v in sorted(detail.metadata.items()))
        where = f" ({detail.domain})" if detail.domain else ""
        return [f"  reason: {detail.reason}{where}{extra}"]
    if name == "PreconditionFailure":
        return [f"  precondition {v.type} {v.subject}: {v.description}" for v in detail.violations]
    if name == "QuotaFailure":
        return [f"  quota {v.subject}: {v.description}" for v in detail.violations]
    if name == "ResourceInfo":
        described = f" ({detail.description})" if detail.description and detail.description != message else ""
        return [f"  resource: {detail.resource_type} {detail.resource_name}{described}".rstrip()]
    if name == "DebugInfo":
        return [f"  debug: {detail.detail}"]
    if name == "Help":
        return [f"  see {link.url} ({link.description})" for link in detail.links]
    if name == "LocalizedMessage":
        return [f"  {detail.message}"]
    return [f"  request {detail.request_id}"]


def describe_error(error: BaseException) -> str:
    """A readable rendering of an RPC error: code, message and rich details.

    Reads google.rpc details (BadRequest field violations, RetryInfo,
    ErrorInfo, ...) from the call's trailers; other exceptions render as
    their type and message.
    """
    if not isinstance(error, grpc.RpcError) or not hasattr(error, "code"):
        return f"{type(error).__name__}: {error}"
    code = error.code()
    code_name = code.name if code is not None else "UNKNOWN"
    message = error.details() if hasattr(error, "details") else ""
    lines = [f"{code_name}: {message}" if message else code_name]
    status = rich_status(error)
    if status is not None:
        lines.extend(_describe_details(status.details, message))
    return "\n".join(lines)


def rich_status(error: grpc.RpcError):
    """The google.rpc.Status an RPC error carries in its trailers, or None."""
    try:
        from grpc_status import rpc_status  # pylint: disable=import-outside-toplevel

        return rpc_status.from_call(error)
    except (ValueError, AttributeError, TypeError):
        return None  # trailers that do not match the status, or no call at all


def describe_status(status) -> str:
    """A readable rendering of a google.rpc.Status, as describe_error renders one."""
    code_name = next((c.name for c in grpc.StatusCode if c.value[0] == status.code), f"code {status.code}")
    lines = [f"{code_name}: {status.message}" if status.message else code_name]
    return "\n".join(lines + _describe_details(status.details, status.message))


def describe_operation_error(error: evolve_pb2.OperationError) -> str:
    """A readable rendering of a failed operation's error (code, message, details)."""
    code_name = next((c.name for c in grpc.StatusCode if c.value[0] == error.code), f"code {error.code}")
    return "\n".join([f"{code_name}: {error.message}", *_describe_details(error.details, error.message)])


# ---- the client ----------------------------------------------------------------


class EvolveClient:
    """A client of one evolve server. Use as a context manager, or call close().

    `token`: sent as `authorization: Bearer <token>` on every call.
    `tls_ca`: path of a PEM CA bundle; given, the channel uses TLS.
    `tls_server_name`: overrides the name checked against the certificate.
    `timeout`: deadline in seconds of each unary call (waits add their own).
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        token: str | None = None,
        tls_ca: str | None = None,
        tls_server_name: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        max_message_mb: int = 64,
    ):
        self.target = target
        self.timeout = timeout
        options = [
            ("grpc.max_receive_message_length", max_message_mb * 1024 * 1024),
            ("grpc.max_send_message_length", max_message_mb * 1024 * 1024),
        ]
        if tls_ca:
            with open(tls_ca, "rb") as f:
                credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
            if tls_server_name:
                options.append(("grpc.ssl_target_name_override", tls_server_name))
            self._channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self.evolution = evolve_pb2_grpc.EvolutionServiceStub(self._channel)
        self.inference = grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    # -- lifecycle

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "EvolveClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _call(self, method, request, timeout: float | None = None):
        return method(request, timeout=self.timeout if timeout is None else timeout, metadata=self._metadata)

    # -- tasks and operations

    def submit_task(
        self, spec: types.TaskSpec | evolve_pb2.TaskSpec, request_id: str | None = None
    ) -> evolve_pb2.Operation:
        """Adds a task; returns its extension search's operation."""
        request = evolve_pb2.SubmitTaskRequest(spec=spec_to_proto(spec), request_id=request_id or "")
        return self._call(self.evolution.SubmitTask, request)

    def get_operation(self, name: str) -> evolve_pb2.Operation:
        return self._call(self.evolution.GetOperation, evolve_pb2.GetOperationRequest(name=name))

    def list_operations(
        self, task: str | None = None, page_size: int = 0, filter: str = ""
    ) -> list[evolve_pb2.Operation]:
        """Every operation (of one task when given, and passing `filter`, e.g.
        'done = false'), all pages."""
        if task:
            filter = " AND ".join(term for term in (operation_filter.task_filter(task), filter) if term)
        operations, token = [], ""
        while True:
            request = evolve_pb2.ListOperationsRequest(filter=filter, page_size=page_size, page_token=token)
            response = self._call(self.evolution.ListOperations, request)
            operations.extend(response.operations)
            token = response.next_page_token
            if not token:
                return operations

    def delete_task(self, name: str) -> evolve_pb2.DeleteTaskResponse:
        return self._call(self.evolution.DeleteTask, evolve_pb2.DeleteTaskRequest(name=name))

    def cancel_operation(self, name: str) -> evolve_pb2.Operation:
        return self._call(self.evolution.CancelOperation, evolve_pb2.CancelOperationRequest(name=name))

    def delete_operation(self, name: str) -> evolve_pb2.DeleteOperationResponse:
        """Forgets a finished operation (FAILED_PRECONDITION while it is not done)."""
        return self._call(self.evolution.DeleteOperation, evolve_pb2.DeleteOperationRequest(name=name))

    def wait_operation(self, name: str, timeout: float = 60.0) -> evolve_pb2.Operation:
        """One WaitOperation call: the operation when done or after `timeout` s."""
        request = evolve_pb2.WaitOperationRequest(name=name)
        request.timeout.FromNanoseconds(int(max(timeout, 0.0) * 1e9))
        return self._call(self.evolution.WaitOperation, request, timeout=timeout + _WAIT_MARGIN_S)

    def wait_done(
        self, name: str, *, poll: float = 30.0, timeout: float | None = None,
        on_progress: Callable[[evolve_pb2.Operation], None] | None = None,
    ) -> evolve_pb2.Operation:
        """Waits until the operation is done (WaitOperation in a loop).

        Rides out a server restart (UNAVAILABLE) within the timeout. Raises
        TimeoutError when `timeout` seconds pass first (None: wait forever).
        `on_progress` gets the operation each time a wait ends before it is done.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = poll if deadline is None else min(poll, deadline - time.monotonic())
            if remaining <= 0:
                raise TimeoutError(f"{name} is not done after {timeout:g} s")
            try:
                operation = self.wait_operation(name, timeout=max(remaining, 0.1))
            except grpc.RpcError as error:
                if error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise
                logger.info("waiting for %s: %s; retrying", name, error.code().name)
                time.sleep(min(1.0, max(remaining, 0.0)))
                continue
            if operation.done:
                return operation
            if on_progress is not None:
                on_progress(operation)

    def get_task(self, name: str) -> evolve_pb2.Task:
        return self._call(self.evolution.GetTask, evolve_pb2.GetTaskRequest(name=name))

    def list_tasks(self, page_size: int = 0) -> list[evolve_pb2.Task]:
        """Every task, all pages."""
        tasks, token = [], ""
        while True:
            response = self._call(self.evolution.ListTasks, evolve_pb2.ListTasksRequest(page_size=page_size,
                                                                                          page_token=token))
            tasks.extend(response.tasks)
            token = response.next_page_token
            if not token:
                return tasks

    def improve(self, task: str | None = None, request_id: str | None = None) -> evolve_pb2.Operation:
        """Starts a generalization search of one task (None: every ready task)."""
        request = evolve_pb2.ImproveRequest(task=task or "", request_id=request_id or "")
        return self._call(self.evolution.Improve, request)

    def watch(
        self, task: str | None = None, after_sequence: int = 0, *, resume_timeout: float = 60.0
    ) -> "EventStream":
        """Evolution events as they happen, after the retained ones newer than
        `after_sequence` (an iterator; cancel() or close it to stop).

        When the stream breaks with UNAVAILABLE (a server restart, a dropped
        connection) it reconnects from the last sequence seen, so no retained
        event is lost or repeated; it gives up after `resume_timeout` seconds
        without a connection.
        """
        return EventStream(self.evolution, self._metadata, task or "", after_sequence, resume_timeout)

    # -- predictions

    def predict(self, task: str, images: np.ndarray) -> Prediction:
        """Classifies a batch of images (see images_to_tensor for the layouts)."""
        request = evolve_pb2.PredictRequest(task=task, array=images_to_tensor(images))
        return self._prediction(self._call(self.evolution.Predict, request))

    def predict_encoded(self, task: str, images: Sequence[bytes]) -> Prediction:
        """Classifies PNG / JPEG files given as bytes."""
        request = evolve_pb2.PredictRequest(task=task, encoded=evolve_pb2.EncodedImages(images=list(images)))
        return self._prediction(self._call(self.evolution.Predict, request))

    @staticmethod
    def _prediction(response: evolve_pb2.PredictResponse) -> Prediction:
        return Prediction(
            probabilities=tensor_to_array(response.probabilities),
            classes=np.asarray(response.classes, dtype=np.int64),
            class_names=list(response.class_names),
            version=int(response.path_version),
        )

    def infer(self, task: str, images: np.ndarray, version: str = "") -> np.ndarray:
        """Class probabilities through the Open Inference Protocol (ModelInfer).

        Tensor names come from the model's metadata, as any KServe client does.
        """
        metadata = self._call(self.inference.ModelMetadata,
                              grpc_predict_v2_pb2.ModelMetadataRequest(name=task, version=version))
        tensor = images_to_tensor(images)
        request = grpc_predict_v2_pb2.ModelInferRequest(model_name=task, model_version=version)
        request.inputs.add(name=metadata.inputs[0].name, datatype=tensor.datatype, shape=tensor.shape)
        request.raw_input_contents.append(tensor.data)
        response = self._call(self.inference.ModelInfer, request)
        output = response.outputs[0]
        if response.raw_output_contents:
            return tensor_to_array(evolve_pb2.Tensor(shape=output.shape, datatype=output.datatype,
                                                     data=response.raw_output_contents[0]))
        return np.asarray(output.contents.fp32_contents, dtype=np.float32).reshape(tuple(output.shape))

    def model_ready(self, task: str) -> bool:
        response = self._call(self.inference.ModelReady, grpc_predict_v2_pb2.ModelReadyRequest(name=task))
        return bool(response.ready)

    # -- the system

    def system(self) -> evolve_pb2.SystemSummary:
        return self._call(self.evolution.GetSystem, evolve_pb2.GetSystemRequest())

    def health(self, service: str = "") -> str:
        """The standard gRPC health status name ("SERVING", "NOT_SERVING", ...)."""
        response = self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def wait_until_serving(self, timeout: float = 120.0, service: str = "") -> None:
        """Blocks until the health check says SERVING; TimeoutError after `timeout` s."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                status = self.health(service)
                if status == "SERVING":
                    return
                last = status
            except grpc.RpcError as error:
                last = error.code().name
            time.sleep(0.25)
        raise TimeoutError(f"{self.target} is not SERVING after {timeout:g} s (last: {last})")


class EventStream:
    """An iterator of Event protos over WatchEvolution that resumes after
    UNAVAILABLE. `cancel()` may be called from any thread: iteration then ends."""

    def __init__(self, stub, metadata, task: str, after_sequence: int, resume_timeout: float):
        self._stub = stub
        self._metadata = metadata
        self._task = task
        self._resume_timeout = resume_timeout
        self._lock = threading.Lock()
        self._call = None
        self._cancelled = False
        self.last_sequence = after_sequence
        self._events = self._generate()

    def __iter__(self) -> "EventStream":
        return self

    def __next__(self) -> evolve_pb2.Event:
        return next(self._events)

    def __enter__(self) -> "EventStream":
        return self

    def __exit__(self, *exc_info) -> None:
        self.cancel()

    def cancel(self) -> None:
        """Ends the stream (thread-safe)."""
        with self._lock:
            self._cancelled = True
            call = self._call
        if call is not None:
            call.cancel()

    close = cancel

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def _generate(self) -> Iterator[evolve_pb2.Event]:
        broken_since: float | None = None
        while True:
            request = evolve_pb2.WatchEvolutionRequest(task=self._task, after_sequence=self.last_sequence)
            with self._lock:
                if self._cancelled:
                    return
                call = self._call = self._stub.WatchEvolution(request, metadata=self._metadata)
            try:
                for event in call:
                    broken_since = None
                    if event.sequence <= self.last_sequence:
                        continue  # a replay overlap: never hand out an event twice
                    self.last_sequence = event.sequence
                    yield event
                return  # the server ended the stream
            except grpc.RpcError as error:
                if self._cancelled:
                    return
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                now = time.monotonic()
                broken_since = broken_since or now
                if now - broken_since > self._resume_timeout:
                    raise
                logger.info("watch stream unavailable; resuming after sequence %d", self.last_sequence)
                time.sleep(min(2.0, 0.2 + (now - broken_since) / 4))
            finally:
                call.cancel()


def operation_state_name(operation: evolve_pb2.Operation) -> str:
    """"RUNNING", "SUCCEEDED", ... of an operation."""
    return evolve_pb2.OperationState.Name(operation.metadata.state).removeprefix("OPERATION_STATE_")


def task_status_name(task: evolve_pb2.Task) -> str:
    """"READY", "SEARCHING", ... of a task."""
    return evolve_pb2.TaskStatus.Name(task.status).removeprefix("TASK_STATUS_")


def is_finished(operation: evolve_pb2.Operation) -> bool:
    """Whether an operation is done (by its flag or its final state)."""
    return operation.done or operation.metadata.state in _DONE_STATES
