"""When and how long to wait before trying a failed call again, and when to give up."""

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
    """Jittered exponential backoff ("full jitter") for servers that answer "not now".

    A server that cannot be reached (or stays overloaded) is tried again until ``max_wait``
    seconds have passed without any progress, or ``max_attempts`` attempts in a row made
    none (None: no such limit), or the call's own timeout runs out; then the call fails with
    ``UNAVAILABLE`` naming the address and the connection error. A long batch that keeps
    making progress never runs out of retries.
    """

    max_attempts: int | None = None
    initial_backoff: float = 0.2
    max_backoff: float = 5.0
    multiplier: float = 2.0
    max_wait: float = 30.0

    def backoff(self, attempt: int) -> float:
        """Seconds to sleep after failed attempt number ``attempt`` (1-based)."""
        cap = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))
        return random.uniform(0.0, cap)

    def exhausted(self, attempts: int, waited: float) -> bool:
        """True once ``attempts`` fruitless attempts over ``waited`` seconds are enough."""
        return waited >= self.max_wait or (self.max_attempts is not None and attempts >= self.max_attempts)


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
