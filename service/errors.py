"""The one place that maps domain errors to gRPC status codes (DESIGN §6).

Servicers raise the library's domain errors (evolve.errors) and never pick a
status code themselves. `ErrorInterceptor` wraps every handler of the server,
unary and streaming alike, and turns what they raise into a gRPC status with
google.rpc rich details; anything unexpected becomes INTERNAL with a generic
message (the traceback goes to the log, never to the client).
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Iterator

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from evolve.errors import (
    AlreadyExistsError,
    CancelledError,
    CorruptCheckpointError,
    EvolveError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    StateDirLockedError,
    StorageError,
)

logger = logging.getLogger(__name__)

ERROR_DOMAIN = "evolve"
INTERNAL_MESSAGE = "internal error; the server log has the details"
# Statuses travel in trailers, and gRPC clients drop a call whose metadata
# passes 8-16 KiB; messages echo client input (names, shapes), so bound them.
MAX_MESSAGE_BYTES = 512
MAX_NAME_BYTES = 128


class UnavailableError(EvolveError):
    """The server cannot answer yet (still loading) or any more (draining)."""

    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


def _packed(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _retry_info(seconds: float | None) -> any_pb2.Any:
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(int(max(seconds or 1.0, 0.0) * 1e9))
    return _packed(error_details_pb2.RetryInfo(retry_delay=delay))


def clip(text: str, limit: int = MAX_MESSAGE_BYTES) -> str:
    """`text` cut to at most `limit` UTF-8 bytes (at a character boundary)."""
    data = str(text).encode("utf-8", "replace")
    if len(data) <= limit:
        return str(text)
    return data[: limit - 3].decode("utf-8", "ignore") + "..."


def _loggable(error: BaseException) -> str:
    """A clipped message with control characters escaped: client input must not forge log lines."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in clip(str(error)))


def status_of(error: BaseException) -> status_pb2.Status:
    """A google.rpc.Status (code, message, details) for an exception; every
    text is clipped, so the status fits in a call's trailers."""
    message = clip(str(error))
    if isinstance(error, InvalidArgumentError):
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=clip(error.field, MAX_NAME_BYTES), description=clip(error.description)
        )
        details = [_packed(error_details_pb2.BadRequest(field_violations=[violation]))]
        return status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=message, details=details)
    if isinstance(error, (NotFoundError, AlreadyExistsError)):
        info = error_details_pb2.ResourceInfo(
            resource_type=clip(error.kind, MAX_NAME_BYTES), resource_name=clip(error.name, MAX_NAME_BYTES),
            description=message,
        )
        code = code_pb2.NOT_FOUND if isinstance(error, NotFoundError) else code_pb2.ALREADY_EXISTS
        return status_pb2.Status(code=code, message=message, details=[_packed(info)])
    if isinstance(error, ResourceExhaustedError):
        return status_pb2.Status(
            code=code_pb2.RESOURCE_EXHAUSTED, message=message, details=[_retry_info(error.retry_after_s)]
        )
    if isinstance(error, FailedPreconditionError):
        info = error_details_pb2.ErrorInfo(reason=clip(error.reason, MAX_NAME_BYTES), domain=ERROR_DOMAIN)
        return status_pb2.Status(code=code_pb2.FAILED_PRECONDITION, message=message, details=[_packed(info)])
    if isinstance(error, CancelledError):
        return status_pb2.Status(code=code_pb2.CANCELLED, message=message)
    if isinstance(error, CorruptCheckpointError):
        return status_pb2.Status(code=code_pb2.DATA_LOSS, message=message)
    if isinstance(error, StorageError):
        code = code_pb2.RESOURCE_EXHAUSTED if error.disk_full else code_pb2.UNAVAILABLE
        return status_pb2.Status(code=code, message=message, details=[_retry_info(60.0)])
    if isinstance(error, StateDirLockedError):
        info = error_details_pb2.ErrorInfo(reason="STATE_DIR_LOCKED", domain=ERROR_DOMAIN)
        return status_pb2.Status(code=code_pb2.FAILED_PRECONDITION, message=message, details=[_packed(info)])
    if isinstance(error, UnavailableError):
        return status_pb2.Status(
            code=code_pb2.UNAVAILABLE, message=message, details=[_retry_info(error.retry_after_s)]
        )
    return status_pb2.Status(code=code_pb2.INTERNAL, message=INTERNAL_MESSAGE)


def abort(context: grpc.ServicerContext, error: BaseException) -> None:
    """Ends the call with the status of `error` (raises, as context.abort does)."""
    context.abort_with_status(rpc_status.to_status(status_of(error)))


def _already_aborted(context: grpc.ServicerContext) -> bool:
    """Whether the handler ended the call itself (context.abort raises a bare Exception)."""
    code = context.code() if hasattr(context, "code") else None
    return code not in (None, grpc.StatusCode.OK)


def _handle(error: Exception, context: grpc.ServicerContext, method: str) -> None:
    if _already_aborted(context):
        raise error
    if isinstance(error, UnavailableError):
        logger.debug("%s: %s", method, _loggable(error))
    elif isinstance(error, EvolveError):
        logger.info("%s: %s: %s", method, type(error).__name__, _loggable(error))
    else:
        logger.exception("%s failed unexpectedly", method)
    abort(context, error)


class _Undecodable:
    """What a request deserializes to when its bytes do not parse."""

    __slots__ = ("message_type", "reason")

    def __init__(self, message_type: str, reason: str):
        self.message_type = message_type
        self.reason = reason


def _message_type(deserializer: Callable) -> str:
    owner = getattr(deserializer, "__self__", None)  # Message.FromString is a bound classmethod
    descriptor = getattr(owner, "DESCRIPTOR", None)
    return getattr(descriptor, "full_name", "") or "request"


def _safe_deserializer(deserializer: Callable | None) -> Callable | None:
    """A deserializer that returns an `_Undecodable` marker instead of raising."""
    if deserializer is None:
        return None
    message_type = _message_type(deserializer)

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as error:  # DecodeError, invalid UTF-8, recursion limit, ...
            return _Undecodable(message_type, type(error).__name__)

    return deserialize


def _check_decoded(request: Any) -> None:
    if isinstance(request, _Undecodable):
        raise InvalidArgumentError(
            "request",
            f"the request bytes are not a valid serialized {request.message_type} message ({request.reason})",
        )


def _wrap_unary(behavior: Callable, method: str) -> Callable:
    @functools.wraps(behavior)
    def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            _check_decoded(request)
            return behavior(request, context)
        except Exception as error:  # the one place errors become statuses
            _handle(error, context, method)

    return wrapped


# gRPC runs a server-streaming behaviour in one of two styles, chosen by
# attributes on the function: a generator it iterates (the default), or, with
# `experimental_non_blocking` set (grpc.health.v1's Watch), a function called
# as f(request, context, send_response_callback) that returns at once and
# sends its responses through the callback later, holding no worker thread.
_NON_BLOCKING = "experimental_non_blocking"
_THREAD_POOL = "experimental_thread_pool"


def _is_non_blocking(behavior: Callable) -> bool:
    return bool(getattr(behavior, _NON_BLOCKING, False))


def _wrap_stream(behavior: Callable, method: str) -> Callable:
    """The behaviour with its errors mapped to statuses, in the behaviour's own style.

    functools.wraps must not copy `__dict__` here: it would carry
    `experimental_non_blocking` onto a generator wrapper, and gRPC would then
    call it with a third argument (UNKNOWN: "takes 2 positional arguments").
    """
    if _is_non_blocking(behavior):
        return _wrap_non_blocking_stream(behavior, method)

    @functools.wraps(behavior, updated=())
    def wrapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            _check_decoded(request)
            yield from behavior(request, context)
        except Exception as error:
            _handle(error, context, method)

    return wrapped


def _wrap_non_blocking_stream(behavior: Callable, method: str) -> Callable:
    """A callback-style behaviour wrapped as one: gRPC still calls it non-blocking."""

    @functools.wraps(behavior, updated=())
    def wrapped(request: Any, context: grpc.ServicerContext,
                send_response_callback: Callable[[Any], None] | None = None) -> Any:
        try:
            _check_decoded(request)
            return behavior(request, context, send_response_callback)
        except Exception as error:  # noqa: BLE001 (mapped to a status, as in _wrap_unary)
            _handle(error, context, method)

    setattr(wrapped, _NON_BLOCKING, True)
    setattr(wrapped, _THREAD_POOL, getattr(behavior, _THREAD_POOL, None))
    return wrapped


class ErrorInterceptor(grpc.ServerInterceptor):
    """Maps exceptions of every handler (unary and server-streaming) to statuses,
    undecodable request bytes included."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.request_streaming:
            return handler
        method = handler_call_details.method
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, method),
                request_deserializer=_safe_deserializer(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return grpc.unary_unary_rpc_method_handler(
            _wrap_unary(handler.unary_unary, method),
            request_deserializer=_safe_deserializer(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
