"""When a failed download is tried again, and how long to wait first.

Image hosts answer a busy client with 503, 429 (often with ``Retry-After``) or a dropped
connection, and the same request a moment later usually succeeds. What says nothing will change
(404, 403, a refused address, an oversized body, an image that does not decode) is never retried.
All attempts and all the waiting between them share the item's one fetch budget
(``--fetch-timeout-s``): a retry that could not finish inside it is not started.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

from ..utils.config import FETCH_BACKOFF_CAP_S


@dataclass(frozen=True)
class EqualJitterRetry:
    """``attempts`` in all (the first included); the wait before retry n (1, 2, ...) is drawn
    from [b/2, b] with b = min(``backoff_s`` * 2**(n-1), FETCH_BACKOFF_CAP_S): "equal jitter", so that
    items that failed together do not all come back together, yet each waits at least half its
    step (the SDK's ``clipserve.RetryPolicy`` draws from [0, b], "full jitter", for whole calls)."""

    attempts: int
    backoff_s: float

    def backoff(self, retry: int, rng: random.Random | None = None) -> float:
        ceiling = min(self.backoff_s * 2 ** (retry - 1), FETCH_BACKOFF_CAP_S)
        return ceiling / 2 + (rng or random).uniform(0, ceiling / 2)


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait that a ``Retry-After`` header asks for (delay-seconds or an HTTP date);
    None when absent or unreadable (then the ordinary backoff applies)."""
    if not value:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # HTTP dates are GMT
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - (now or datetime.now(timezone.utc))).total_seconds())
