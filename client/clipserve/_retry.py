"""When and how long to wait before trying a failed call again."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import grpc

# Codes that say "not now" rather than "never": the server is restarting, overloaded or
# briefly unreachable. Everything else is final and surfaces at once.
RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


@dataclass(frozen=True)
class RetryPolicy:
    """Jittered exponential backoff ("full jitter"), bounded by attempts and the call's deadline."""

    max_attempts: int = 6
    initial_backoff: float = 0.2
    max_backoff: float = 5.0
    multiplier: float = 2.0

    def backoff(self, attempt: int) -> float:
        """Seconds to sleep after failed attempt number ``attempt`` (1-based)."""
        cap = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))
        return random.uniform(0.0, cap)


class Deadline:
    """A total time budget shared by every attempt of one SDK call."""

    def __init__(self, timeout: float | None) -> None:
        self._end = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        if self._end is None:
            return None
        return max(0.0, self._end - time.monotonic())

    def expired(self) -> bool:
        remaining = self.remaining()
        return remaining is not None and remaining <= 0.0
