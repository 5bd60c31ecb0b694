"""The one place where domain errors become gRPC status codes (and HTTP statuses for the HTTP
face), and the guard every unary RPC answers through."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from clipserve._wire import IMAGE_BYTES_NEEDED

from ..utils.callers import begin_call
from ..utils.errors import ErrorKind, ItemError
from ..utils.metrics import Metrics

log = logging.getLogger(__name__)
T = TypeVar("T")

_CODES: dict[ErrorKind, grpc.StatusCode] = {
    ErrorKind.INVALID_INPUT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.FORBIDDEN: grpc.StatusCode.PERMISSION_DENIED,
    # Not UNAVAILABLE: that code means "this server, try again", and clients retry it. A dead
    # image host is a property of the item, so it gets a code that no client retries.
    ErrorKind.FETCH_FAILED: grpc.StatusCode.FAILED_PRECONDITION,
    # The caller can fix it (send the bytes), so not NOT_FOUND, which means a missing image;
    # the reason below tells the SDK apart from a failed fetch.
    ErrorKind.IMAGE_NEEDED: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorKind.TIMEOUT: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorKind.OVERLOADED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}


# The same kinds over HTTP (serving/http/). A failed image is a 4xx that no client retries
# (the openai client retries 408, 429 and every 5xx), for the reason FETCH_FAILED is not
# UNAVAILABLE above; only the server's own state (overloaded, loading, a bug) is retried.
_HTTP_STATUSES: dict[ErrorKind, int] = {
    ErrorKind.INVALID_INPUT: 400,
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.FORBIDDEN: 403,
    ErrorKind.FETCH_FAILED: 422,
    ErrorKind.IMAGE_NEEDED: 422,
    ErrorKind.TIMEOUT: 422,
    ErrorKind.OVERLOADED: 429,
    ErrorKind.UNAVAILABLE: 503,
    ErrorKind.INTERNAL: 500,
}


# ItemError.reason on the wire, where the code alone is ambiguous.
_REASONS: dict[ErrorKind, str] = {ErrorKind.IMAGE_NEEDED: IMAGE_BYTES_NEEDED}


def grpc_code(kind: ErrorKind) -> grpc.StatusCode:
    return _CODES[kind]


def reason(kind: ErrorKind) -> str:
    return _REASONS.get(kind, "")


def call_id(context: grpc.aio.ServicerContext) -> str:
    """The caller's ``x-request-id``, or a fresh id: ties a call's log lines together."""
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and isinstance(value, str) and value:
            return value[:64]
    return uuid.uuid4().hex[:12]


async def guarded_unary(
    rpc: str,
    context: grpc.aio.ServicerContext,
    metrics: Metrics,
    work: Callable[[], Awaitable[T]],
    *,
    on_done: Callable[[str], None] | None = None,
    log_extra: dict[str, Any] | None = None,
) -> T:
    """``work``'s answer, or the call ended with the status its error maps to: the one guard of
    every unary RPC of both protocols. Each call is counted by its final code (the calls metric,
    and ``on_done`` with the code's name); a refused one is logged; a bug is INTERNAL."""
    started = time.monotonic()
    begin_call()
    code, message = grpc.StatusCode.OK, ""
    try:
        response = await work()
    except ItemError as exc:
        code, message = grpc_code(exc.kind), exc.message
    except Exception as exc:
        log.exception("%s failed unexpectedly", rpc, extra={"call_id": call_id(context)})
        code, message = grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"
    if on_done is not None:
        on_done(code.name)
    metrics.calls.labels(rpc=rpc, code=code.name).inc()
    if code is not grpc.StatusCode.OK:
        extra = {
            "call_id": call_id(context),
            "code": code.name,
            "error": message,
            "peer": context.peer(),
            "seconds": round(time.monotonic() - started, 3),
        }
        log.info("%s refused", rpc, extra={**extra, **(log_extra or {})})
        await context.abort(code, message)
    return response


def http_status(kind: ErrorKind) -> int:
    return _HTTP_STATUSES[kind]
