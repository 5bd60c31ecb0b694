"""What the fetcher reports about its attempts, wherever it runs.

On the event loop it reports straight to the server's metrics (``utils.metrics.Metrics`` has
these methods). A decode worker process has no metrics of its own: it keeps a ``FetchTally`` and
sends what it holds with each reply, and the server replays that into its metrics.
"""

from __future__ import annotations

from typing import Protocol


class FetchEvents(Protocol):
    def fetch_attempt(self, host: str, outcome: str) -> None:
        """One attempt at a URL of ``host`` ended: ``ok`` or why not (``http_503``, ``reset``...)."""

    def fetch_retry(self, host: str, wait_s: float, retry_after: bool) -> None:
        """A retry is coming after ``wait_s`` seconds, as the host's ``Retry-After`` asked or not."""


class FetchTally:
    """Events kept until ``drain``: a worker process's record between two replies."""

    def __init__(self) -> None:
        self._events: list[tuple[str, str, object, object]] = []

    def fetch_attempt(self, host: str, outcome: str) -> None:
        self._events.append(("attempt", host, outcome, None))

    def fetch_retry(self, host: str, wait_s: float, retry_after: bool) -> None:
        self._events.append(("retry", host, wait_s, retry_after))

    def drain(self) -> list[tuple[str, str, object, object]]:
        events, self._events = self._events, []
        return events


def replay(events: list[tuple[str, str, object, object]], into: FetchEvents) -> None:
    """Report ``events`` (from ``FetchTally.drain``) to ``into``."""
    for kind, host, a, b in events:
        if kind == "attempt":
            into.fetch_attempt(host, str(a))
        else:
            into.fetch_retry(host, float(a), bool(b))  # type: ignore[arg-type]
