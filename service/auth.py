"""Bearer-token authentication as a server interceptor (DESIGN §6).

Three classes of RPC:
- open: health, reflection, ServerLive and ServerReady (probes must work
  without credentials);
- read: predictions and every Get / List / Watch / Wait; they need the read
  token or the full token when a read token is configured, and are open
  otherwise;
- mutating: SubmitTask, Improve and CancelOperation; they need the full token
  whenever one is configured.

Clients send `authorization: Bearer <token>` metadata. Tokens are compared in
constant time.
"""

from __future__ import annotations

import hmac
import logging

import grpc

logger = logging.getLogger(__name__)

EVOLUTION_SERVICE = "evolve.v1.EvolutionService"
INFERENCE_SERVICE = "inference.GRPCInferenceService"

MUTATING_METHODS = frozenset(
    f"/{EVOLUTION_SERVICE}/{name}" for name in ("SubmitTask", "Improve", "CancelOperation")
)
OPEN_METHODS = frozenset(f"/{INFERENCE_SERVICE}/{name}" for name in ("ServerLive", "ServerReady"))
PROTECTED_SERVICES = (f"/{EVOLUTION_SERVICE}/", f"/{INFERENCE_SERVICE}/")

OPEN, READ, MUTATING = "open", "read", "mutating"


def access_class(method: str) -> str:
    """OPEN, READ or MUTATING for a full method name ('/package.Service/Method')."""
    if method in MUTATING_METHODS:
        return MUTATING
    if method in OPEN_METHODS or not method.startswith(PROTECTED_SERVICES):
        return OPEN  # health, reflection, liveness probes
    return READ


def bearer_token(metadata) -> str | None:
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


class AuthInterceptor(grpc.ServerInterceptor):
    """Rejects calls without the token their access class requires."""

    def __init__(self, token: str | None, read_token: str | None = None):
        if read_token and not token:
            raise ValueError("a read token needs a (full) token as well")
        self._token = token or None
        self._read_token = read_token or None

    def check(self, method: str, metadata) -> tuple[grpc.StatusCode, str] | None:
        """None when the call may proceed, else the status code and message."""
        needed = access_class(method)
        if needed == OPEN or self._token is None:
            return None
        if needed == READ and self._read_token is None:
            return None
        given = bearer_token(metadata)
        if _matches(given, self._token):
            return None
        if needed == READ and _matches(given, self._read_token):
            return None
        if needed == MUTATING and _matches(given, self._read_token):
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
    kwargs = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny, **kwargs)
    return grpc.unary_unary_rpc_method_handler(deny, **kwargs)
