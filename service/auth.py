"""Bearer-token authentication as a server interceptor (DESIGN §6).

Secure by default: once a token is configured, every RPC needs one, except
the probes. Three classes of RPC:

- open: grpc.health.v1 (Check and Watch) and the Open Inference Protocol's
  ServerLive and ServerReady. Probes (Kubernetes, load balancers, Docker's
  HEALTHCHECK) carry no credentials, and these answers reveal nothing but
  "up" and "ready".
- mutating: SubmitTask, Improve, CancelOperation, DeleteOperation and
  DeleteTask, google.longrunning.Operations' CancelOperation and
  DeleteOperation, and, so that a new RPC is never weaker by accident, any
  method whose name starts with Cancel, Create, Delete, Submit or Update.
  They need the full token.
- read: everything else, predictions, every Get / List / Watch / Wait (of
  google.longrunning.Operations too), model
  metadata and server reflection (it reveals only the API, but "every RPC
  but health" is the rule; grpcurl then needs `-H 'authorization: Bearer
  <token>'`). They need the full token or the read token; they are open only
  when the server is started with `--open-reads`, an explicit choice.

Without any token every call is open (the server warns beyond localhost).
A read-only server (a serving replica, `--read-only`) answers an otherwise
allowed mutating call with FAILED_PRECONDITION: changes go to the writer.
Clients send `authorization: Bearer <token>` metadata. Tokens are compared in
constant time; an empty or blank token is refused, never taken as "no auth".
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterable
from typing import Any

import grpc

from evolve.errors import READ_ONLY_MESSAGE

logger = logging.getLogger(__name__)

EVOLUTION_SERVICE = "evolve.v1.EvolutionService"
INFERENCE_SERVICE = "inference.GRPCInferenceService"
HEALTH_SERVICE = "grpc.health.v1.Health"
LONGRUNNING_SERVICE = "google.longrunning.Operations"

MUTATING_METHODS = frozenset(
    [f"/{EVOLUTION_SERVICE}/{name}" for name in ("SubmitTask", "Improve", "CancelOperation", "DeleteOperation",
                                                  "DeleteTask")]
    + [f"/{LONGRUNNING_SERVICE}/{name}" for name in ("CancelOperation", "DeleteOperation")]
)
MUTATING_VERBS = ("Cancel", "Create", "Delete", "Submit", "Update")
OPEN_METHODS = frozenset(f"/{INFERENCE_SERVICE}/{name}" for name in ("ServerLive", "ServerReady"))
OPEN_SERVICES = (f"/{HEALTH_SERVICE}/",)

OPEN, READ, MUTATING = "open", "read", "mutating"


def access_class(method: str) -> str:
    """OPEN, READ or MUTATING for a full method name ('/package.Service/Method')."""
    if method in OPEN_METHODS or method.startswith(OPEN_SERVICES):
        return OPEN
    if method in MUTATING_METHODS or method.rpartition("/")[2].startswith(MUTATING_VERBS):
        return MUTATING
    return READ  # unknown services and methods included: deny by default


def check_token(flag: str, value: str | None) -> str | None:
    """`value` stripped, None when not given; ValueError when it cannot be a token.

    An empty token must not silently turn authentication off, and a token
    must travel in an HTTP/2 header: visible ASCII, no spaces.
    """
    if value is None:
        return None
    token = value.strip()
    if not token:
        raise ValueError(f"{flag} is empty, which would turn authentication off: set a real token, "
                         "or do not set it at all to serve without one")
    if not all("!" <= character <= "~" for character in token):
        raise ValueError(f"{flag} must be visible ASCII characters without spaces (it is sent as a header)")
    return token


def bearer_token(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The token of an `authorization: Bearer <token>` metadata entry, if any."""
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


def _matches(given: str | None, expected: str | None) -> bool:
    if not given or not expected:
        return False
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def describe(token: str | None, read_token: str | None = None, open_reads: bool = False) -> str:
    """One line for the log: what a caller needs, per access class."""
    if token is None:
        return "no token: every call is open"
    if open_reads:
        return "mutating calls need the token; reads are open (--open-reads); health and ServerLive/Ready are open"
    reads = "the token or the read token" if read_token else "the token"
    return f"every call but health and ServerLive/Ready needs a token (reads: {reads}; mutating calls: the token)"


class AuthInterceptor(grpc.ServerInterceptor):
    """Rejects calls without the token their access class requires."""

    def __init__(self, token: str | None, read_token: str | None = None, open_reads: bool = False, *,
                 read_only: bool = False):
        self._read_only = read_only  # a serving replica: mutating calls go to the writer
        self._token = check_token("token", token)
        self._read_token = check_token("read token", read_token)
        self._open_reads = open_reads
        if self._token is None and (self._read_token is not None or open_reads):
            raise ValueError("a read token or open reads need a (full) token as well")
        if open_reads and self._read_token is not None:
            raise ValueError("open reads and a read token exclude each other")
        if self._token is not None and self._token == self._read_token:
            raise ValueError("the read token must differ from the token")

    def check(self, method: str, metadata: Iterable[tuple[str, Any]] | None) -> tuple[grpc.StatusCode, str] | None:
        """None when the call may proceed, else the status code and message.
        On a read-only server an authorised mutating call is refused too."""
        denied = self._check_token(method, metadata)
        if denied is None and self._read_only and access_class(method) == MUTATING:
            return grpc.StatusCode.FAILED_PRECONDITION, READ_ONLY_MESSAGE
        return denied

    def _check_token(self, method: str, metadata: Iterable[tuple[str, Any]] | None) -> tuple[grpc.StatusCode, str] | None:
        needed = access_class(method)
        if needed == OPEN or self._token is None or (needed == READ and self._open_reads):
            return None
        given = bearer_token(metadata)
        if _matches(given, self._token):
            return None
        if _matches(given, self._read_token):
            if needed == READ:
                return None
            return grpc.StatusCode.PERMISSION_DENIED, "the read token does not allow this call"
        if given is None:
            return grpc.StatusCode.UNAUTHENTICATED, "missing 'authorization: Bearer <token>' metadata"
        return grpc.StatusCode.UNAUTHENTICATED, "invalid token"

    def intercept_service(self, continuation, handler_call_details):
        denied = self.check(handler_call_details.method, handler_call_details.invocation_metadata)
        if denied is None:
            return continuation(handler_call_details)
        logger.info("%s denied: %s", handler_call_details.method, denied[1])
        handler = continuation(handler_call_details)
        return _denying_handler(handler, *denied)


def _denying_handler(handler, code: grpc.StatusCode, message: str):
    """A handler of the same shape as `handler` that only rejects the call."""

    def deny(request, context):
        context.abort(code, message)

    if handler is None:
        return None
    kwargs = {"request_deserializer": handler.request_deserializer,
              "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny, **kwargs)
    return grpc.unary_unary_rpc_method_handler(deny, **kwargs)
