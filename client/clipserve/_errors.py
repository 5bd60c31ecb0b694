"""The one exception type the SDK raises."""

from __future__ import annotations

from typing import Any

import grpc


class ClipServeError(Exception):
    """A call to a clipserve server failed.

    Attributes:
        code: The gRPC status code (``grpc.StatusCode``), e.g. ``NOT_FOUND`` for an image URL
            that answered 404, ``INVALID_ARGUMENT`` for bytes that are not an image,
            ``UNAVAILABLE`` when the server cannot be reached.
        details: The server's (or the SDK's) human-readable explanation.
        results: For a batch call that failed as a whole (its servers could not be reached,
            or refused the call): one result per input, those answered before it failed
            included; the others carry this error. None otherwise.
    """

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.results: list[Any] | None = None

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> "ClipServeError":
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = error.details() if hasattr(error, "details") else str(error)
        return cls(code or grpc.StatusCode.UNKNOWN, details or "")

