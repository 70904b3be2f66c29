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
)

logger = logging.getLogger(__name__)

ERROR_DOMAIN = "evolve"
INTERNAL_MESSAGE = "internal error; the server log has the details"


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


def status_of(error: BaseException) -> status_pb2.Status:
    """A google.rpc.Status (code, message, details) for an exception."""
    message = str(error)
    if isinstance(error, InvalidArgumentError):
        violation = error_details_pb2.BadRequest.FieldViolation(field=error.field, description=error.description)
        details = [_packed(error_details_pb2.BadRequest(field_violations=[violation]))]
        return status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=message, details=details)
    if isinstance(error, NotFoundError):
        info = error_details_pb2.ResourceInfo(resource_type=error.kind, resource_name=error.name, description=message)
        return status_pb2.Status(code=code_pb2.NOT_FOUND, message=message, details=[_packed(info)])
    if isinstance(error, AlreadyExistsError):
        info = error_details_pb2.ResourceInfo(resource_type=error.kind, resource_name=error.name, description=message)
        return status_pb2.Status(code=code_pb2.ALREADY_EXISTS, message=message, details=[_packed(info)])
    if isinstance(error, ResourceExhaustedError):
        return status_pb2.Status(
            code=code_pb2.RESOURCE_EXHAUSTED, message=message, details=[_retry_info(error.retry_after_s)]
        )
    if isinstance(error, FailedPreconditionError):
        info = error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN)
        return status_pb2.Status(code=code_pb2.FAILED_PRECONDITION, message=message, details=[_packed(info)])
    if isinstance(error, CancelledError):
        return status_pb2.Status(code=code_pb2.CANCELLED, message=message)
    if isinstance(error, CorruptCheckpointError):
        return status_pb2.Status(code=code_pb2.DATA_LOSS, message=message)
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
        logger.debug("%s: %s", method, error)
    elif isinstance(error, EvolveError):
        logger.info("%s: %s: %s", method, type(error).__name__, error)
    else:
        logger.exception("%s failed unexpectedly", method)
    abort(context, error)


def _wrap_unary(behavior: Callable, method: str) -> Callable:
    @functools.wraps(behavior)
    def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return behavior(request, context)
        except Exception as error:  # the one place errors become statuses
            _handle(error, context, method)

    return wrapped


def _wrap_stream(behavior: Callable, method: str) -> Callable:
    @functools.wraps(behavior)
    def wrapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from behavior(request, context)
        except Exception as error:
            _handle(error, context, method)

    return wrapped


class ErrorInterceptor(grpc.ServerInterceptor):
    """Maps exceptions of every handler (unary and server-streaming) to statuses."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.request_streaming:
            return handler
        method = handler_call_details.method
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.unary_unary_rpc_method_handler(
            _wrap_unary(handler.unary_unary, method),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
