"""Why an item could not be scored, in domain terms (the servicer maps these to gRPC codes)."""

from __future__ import annotations

import enum


class ErrorKind(enum.Enum):
    INVALID_INPUT = "invalid input"  # the caller's data is unusable: not an image, empty query
    NOT_FOUND = "not found"  # the image URL answered 404/410
    FORBIDDEN = "forbidden"  # the URL points where the server may not fetch from
    FETCH_FAILED = "fetch failed"  # the image host is unreachable or answered an error
    IMAGE_NEEDED = "image needed"  # named by hash alone, but not held here: send the bytes
    TIMEOUT = "timeout"  # a fetch (or the call's deadline) ran out
    OVERLOADED = "overloaded"  # the queue is full: try again later
    UNAVAILABLE = "unavailable"  # the server is starting, stopping or its worker died
    INTERNAL = "internal"  # a bug or a model failure: not the caller's fault


class ItemError(Exception):
    """One pair could not be scored; ``message`` names the offending input."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message

    def __repr__(self) -> str:
        return f"ItemError({self.kind.name}, {self.message!r})"
