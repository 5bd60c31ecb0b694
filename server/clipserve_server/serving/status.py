"""The one place where domain errors become gRPC status codes, and HTTP statuses for the HTTP face."""

from __future__ import annotations

import grpc

from ..utils.errors import ErrorKind

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
_REASONS: dict[ErrorKind, str] = {ErrorKind.IMAGE_NEEDED: "IMAGE_BYTES_NEEDED"}


def grpc_code(kind: ErrorKind) -> grpc.StatusCode:
    return _CODES[kind]


def reason(kind: ErrorKind) -> str:
    return _REASONS.get(kind, "")


def http_status(kind: ErrorKind) -> int:
    return _HTTP_STATUSES[kind]
