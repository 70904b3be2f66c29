"""Access logs, request ids and log formats of the server (DESIGN §8).

`ObservabilityInterceptor` is the outermost interceptor of the server: it
sees every call, denials of service.auth and statuses mapped by
service.errors included, and when the call ends

- writes one access line (logger "evolve.access": method, peer, code,
  duration_ms, request id, and a W3C trace id when the client sent one);
- reports it to an optional observer (service.metrics counts and times it).

Request ids: a client's `x-request-id` is echoed back in the initial
metadata, or, when absent or unusable, a new one (uuid4 hex) is minted and
sent. A valid `traceparent` header is logged and echoed too. While a call
runs, every log line its thread writes carries its request id.

Client input never reaches a log line raw: request ids and trace headers are
checked against strict patterns, and method names are escaped.
"""

from __future__ import annotations

import contextvars
import dataclasses
import datetime
import json
import logging
import re
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import grpc

ACCESS_LOGGER = "evolve.access"
REQUEST_ID_HEADER = "x-request-id"
TRACEPARENT_HEADER = "traceparent"
MAX_REQUEST_ID = 128
MAX_LOGGED_TEXT = 256
LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Visible ASCII without quotes, backslashes or spaces: uuids, ULIDs, "Root=1-...;Parent=..." all fit.
_REQUEST_ID = re.compile(rf"[!#-\[\]-~]{{1,{MAX_REQUEST_ID}}}")
# W3C Trace Context: version-traceid-parentid-flags, lower-case hex.
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")

_current = contextvars.ContextVar("evolve_request", default=None)


@dataclasses.dataclass(frozen=True)
class TraceContext:
    trace_id: str
    parent_id: str
    header: str  # the traceparent as received (valid, so safe to echo)


@dataclasses.dataclass(frozen=True)
class RequestContext:
    request_id: str
    trace: TraceContext | None = None


def current_request() -> RequestContext | None:
    """The request the calling thread is serving, if any."""
    return _current.get()


# ---- pure helpers --------------------------------------------------------------------


def escape(text: Any, limit: int = MAX_LOGGED_TEXT) -> str:
    """`text` with control and non-printable characters escaped, cut to `limit`
    characters: client input must not forge or break log lines."""
    value = str(text)
    if len(value) > limit:
        value = value[: limit - 3] + "..."
    if value.isprintable():
        return value
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in value)


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def header(metadata: Iterable[tuple[str, Any]] | None, name: str) -> str | None:
    """The first value of metadata entry `name` (keys are lower-case on the wire)."""
    for key, value in metadata or ():
        if key.lower() == name:
            return _text(value)
    return None


def valid_request_id(value: str | None) -> str | None:
    """`value` stripped when it can serve as a request id, else None."""
    if value is None:
        return None
    value = value.strip()
    return value if _REQUEST_ID.fullmatch(value) else None


def mint_request_id() -> str:
    return uuid.uuid4().hex


def parse_traceparent(value: str | None) -> TraceContext | None:
    """The trace context of a W3C `traceparent` header; None when absent or invalid."""
    if value is None:
        return None
    value = value.strip()
    match = _TRACEPARENT.fullmatch(value)
    if match is None:
        return None
    version, trace_id, parent_id, _ = match.groups()
    if version == "ff" or trace_id == "0" * 32 or parent_id == "0" * 16:
        return None
    return TraceContext(trace_id, parent_id, value)


def request_context(metadata: Iterable[tuple[str, Any]] | None) -> tuple[RequestContext, bool]:
    """The call's request id (the client's, or a new one) and trace; and
    whether the id was minted here."""
    metadata = tuple(metadata or ())
    given = valid_request_id(header(metadata, REQUEST_ID_HEADER))
    trace = parse_traceparent(header(metadata, TRACEPARENT_HEADER))
    if given is not None:
        return RequestContext(given, trace), False
    return RequestContext(mint_request_id(), trace), True


def split_method(method: str) -> tuple[str, str]:
    """("evolve.v1.EvolutionService", "GetTask") of "/evolve.v1.EvolutionService/GetTask"."""
    service, _, name = method.lstrip("/").rpartition("/")
    return service, name


# ---- log formats -----------------------------------------------------------------------


_STANDARD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message,
    request_id / trace_id inside a call, `exception` with a traceback, and the
    fields a caller passed with `extra=`."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request = current_request()
        if request is not None:
            entry["request_id"] = request.request_id
            if request.trace is not None:
                entry["trace_id"] = request.trace.trace_id
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRIBUTES and not key.startswith("_"):
                entry[key] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=True)


def configure_logging(level: str, log_format: str = "text", stream: Any = None) -> None:
    """Logging of the server process: one handler on stderr, text or JSON lines.

    In JSON, warnings and uncaught exceptions (of any thread) are logged too,
    so that every line Python writes parses."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"--log-format must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    for noisy in ("absl", "jax._src", "orbax"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    if log_format == "json":
        logging.captureWarnings(True)
        sys.excepthook = _log_uncaught
        threading.excepthook = lambda args: _log_uncaught(args.exc_type, args.exc_value, args.exc_traceback)


def _log_uncaught(exc_type, exc_value, exc_traceback) -> None:
    if issubclass(exc_type, KeyboardInterrupt):
        sys.__excepthook__(exc_type, exc_value, exc_traceback)
        return
    logging.getLogger("evolve").critical("uncaught exception", exc_info=(exc_type, exc_value, exc_traceback))


# ---- the interceptor ---------------------------------------------------------------------


class RpcObserver(Protocol):
    """What the interceptor reports each finished call to (service.metrics)."""

    def rpc_started(self, method: str, rpc_type: str) -> None: ...

    def rpc_finished(self, method: str, rpc_type: str, code: str, seconds: float, request: Any) -> None:
        """`method` is "" for a method the server does not have."""


UNARY, SERVER_STREAM, CLIENT_STREAM, BIDI_STREAM = "unary", "server_stream", "client_stream", "bidi_stream"
_NON_BLOCKING = "experimental_non_blocking"  # see service/errors.py: callback-style streaming behaviours


@dataclasses.dataclass
class _Call:
    """What is known of one call, filled in by the handler thread and read once
    the call has ended."""

    method: str
    rpc_type: str
    request: RequestContext
    started: float
    peer: str = ""
    code: str | None = None  # set when the behaviour finished; None: the client left first
    message: Any = None  # the request message of a unary-request call
    logged: bool = False
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def claim(self) -> bool:
        """True exactly once: for whoever logs the call (its handler, or gRPC's end-of-call callback)."""
        with self.lock:
            first, self.logged = not self.logged, True
            return first


def _code_name(code: grpc.StatusCode | None) -> str:
    return code.name if code is not None else "OK"


def _rpc_type(handler: grpc.RpcMethodHandler) -> str:
    if handler.request_streaming:
        return BIDI_STREAM if handler.response_streaming else CLIENT_STREAM
    return SERVER_STREAM if handler.response_streaming else UNARY


class ObservabilityInterceptor(grpc.ServerInterceptor):
    """Request ids, access log and call metrics for every handler.

    Put it first in the server's interceptor list, so that it wraps the
    others and sees the status each call really ended with. It echoes the
    request id in the initial metadata, so handlers must not send initial
    metadata themselves."""

    def __init__(self, observer: RpcObserver | None = None):
        self._observer = observer
        self._access = logging.getLogger(ACCESS_LOGGER)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None:  # gRPC answers UNIMPLEMENTED itself
            self._unimplemented(method, handler_call_details.invocation_metadata)
            return None
        rpc_type = _rpc_type(handler)
        metadata = handler_call_details.invocation_metadata
        wrap = {UNARY: self._wrap_unary, SERVER_STREAM: self._wrap_stream,
                CLIENT_STREAM: self._wrap_unary, BIDI_STREAM: self._wrap_stream}[rpc_type]
        behavior = {UNARY: handler.unary_unary, SERVER_STREAM: handler.unary_stream,
                    CLIENT_STREAM: handler.stream_unary, BIDI_STREAM: handler.stream_stream}[rpc_type]
        make = {UNARY: grpc.unary_unary_rpc_method_handler, SERVER_STREAM: grpc.unary_stream_rpc_method_handler,
                CLIENT_STREAM: grpc.stream_unary_rpc_method_handler,
                BIDI_STREAM: grpc.stream_stream_rpc_method_handler}[rpc_type]
        return make(
            wrap(behavior, method, rpc_type, metadata, request_streaming=handler.request_streaming),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    # ---- per call ------------------------------------------------------------------

    def _begin(self, method: str, rpc_type: str, metadata, context, message: Any) -> _Call:
        request, _ = request_context(metadata)
        call = _Call(method, rpc_type, request, time.perf_counter(), message=message)
        try:
            call.peer = context.peer() or ""
            if not context.add_callback(lambda: self._end(call, context)):
                self._end(call, context)  # already over
            echoed = [(REQUEST_ID_HEADER, request.request_id)]
            if request.trace is not None:
                echoed.append((TRACEPARENT_HEADER, request.trace.header))
            context.send_initial_metadata(echoed)
        except Exception:
            logging.getLogger(__name__).debug("cannot observe %s", escape(method), exc_info=True)
        if self._observer is not None:
            self._guarded(self._observer.rpc_started, method, rpc_type)
        return call

    def _settle(self, call: _Call, context, error: BaseException | None) -> None:
        """Logs the call once its behaviour is done, on the handler's thread:
        before the client has the answer, so its effects are visible to it."""
        code = context.code() if hasattr(context, "code") else None
        if error is not None:
            call.code = code.name if code is not None else "UNKNOWN"
        elif not context.is_active():
            call.code = "CANCELLED"  # the client left before the answer
        else:
            call.code = _code_name(code)
        self._end(call, context)

    def _end(self, call: _Call, context) -> None:
        """The call has ended: one access line, one observation."""
        if not call.claim():
            return
        seconds = time.perf_counter() - call.started
        code = call.code
        if code is None:  # still running when the call ended: cancelled or out of time
            status = context.code() if hasattr(context, "code") else None
            if status is not None:
                code = status.name
            else:
                code = "DEADLINE_EXCEEDED" if _past_deadline(context) else "CANCELLED"
        self._log(call, code, seconds)
        if self._observer is not None:
            self._guarded(self._observer.rpc_finished, call.method, call.rpc_type, code, seconds, call.message)

    def _log(self, call: _Call, code: str, seconds: float) -> None:
        request = call.request
        fields = {
            "method": escape(call.method), "peer": escape(call.peer), "code": code,
            "duration_ms": round(seconds * 1000.0, 3), "request_id": request.request_id,
        }
        trace = ""
        if request.trace is not None:
            fields["trace_id"] = request.trace.trace_id
            trace = f" trace_id={request.trace.trace_id}"
        self._access.info(
            "%s %s %.1f ms peer=%s request_id=%s%s", fields["method"], code, fields["duration_ms"], fields["peer"],
            request.request_id, trace, extra=fields,
        )

    def _unimplemented(self, method: str, metadata) -> None:
        request, _ = request_context(metadata)
        call = _Call(method, UNARY, request, time.perf_counter(), code="UNIMPLEMENTED")
        self._log(call, "UNIMPLEMENTED", 0.0)
        if self._observer is not None:  # "": the client chose the name; it must not become a label
            self._guarded(self._observer.rpc_finished, "", UNARY, "UNIMPLEMENTED", 0.0, None)

    @staticmethod
    def _guarded(function: Callable, *args: Any) -> None:
        try:
            function(*args)
        except Exception:
            logging.getLogger(__name__).exception("call observer failed")

    # ---- wrappers ------------------------------------------------------------------

    def _wrap_unary(self, behavior: Callable, method: str, rpc_type: str, metadata, *, request_streaming: bool):
        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            call = self._begin(method, rpc_type, metadata, context, None if request_streaming else request)
            previous = _current.get()
            _current.set(call.request)
            try:
                response = behavior(request, context)
            except BaseException as error:
                self._settle(call, context, error)
                raise
            finally:
                _current.set(previous)
            self._settle(call, context, None)
            return response

        return wrapped

    def _wrap_stream(self, behavior: Callable, method: str, rpc_type: str, metadata, *, request_streaming: bool):
        if getattr(behavior, _NON_BLOCKING, False):
            return self._wrap_non_blocking(behavior, method, rpc_type, metadata)

        def wrapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            call = self._begin(method, rpc_type, metadata, context, None if request_streaming else request)
            previous = _current.get()
            _current.set(call.request)
            try:
                yield from behavior(request, context)
            except GeneratorExit:
                raise  # gRPC closed the stream: the client left (the callback says so)
            except BaseException as error:
                self._settle(call, context, error)
                raise
            else:
                self._settle(call, context, None)
            finally:
                _current.set(previous)

        return wrapped

    def _wrap_non_blocking(self, behavior: Callable, method: str, rpc_type: str, metadata):
        """A callback-style stream (grpc health Watch): it ends when the client leaves."""

        def wrapped(request: Any, context: grpc.ServicerContext, send_response_callback=None) -> Any:
            call = self._begin(method, rpc_type, metadata, context, request)
            try:
                return behavior(request, context, send_response_callback)
            except BaseException as error:
                self._settle(call, context, error)
                raise

        setattr(wrapped, _NON_BLOCKING, True)
        wrapped.experimental_thread_pool = getattr(behavior, "experimental_thread_pool", None)
        return wrapped


def _past_deadline(context) -> bool:
    try:
        remaining = context.time_remaining()
    except Exception:  # noqa: BLE001
        return False
    return remaining is not None and remaining <= 0
