"""The one place where domain errors become gRPC status codes."""

from __future__ import annotations

import grpc
from clipserve._wire import IMAGE_BYTES_NEEDED

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


# ItemError.reason on the wire, where the code alone is ambiguous.
_REASONS: dict[ErrorKind, str] = {ErrorKind.IMAGE_NEEDED: IMAGE_BYTES_NEEDED}


def grpc_code(kind: ErrorKind) -> grpc.StatusCode:
    return _CODES[kind]


def reason(kind: ErrorKind) -> str:
    return _REASONS.get(kind, "")
