"""Embedding caches: LRU-bounded, with concurrent requests for one key sharing one encode.

All state is touched only from the event loop thread, so no lock is needed. Besides entries,
a cache may be bounded by bytes (``max_bytes``: keys and embeddings counted), so that long keys
(queries of thousands of characters) cannot hold more memory than was meant.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from ..models.model import Embedding
from ..utils.domain import CacheStats
from .promises import Later, Soon, outcome

# What an entry costs beyond its key's characters and its vector, estimated generously: the str
# and array headers, the Embedding, the OrderedDict's node.
_ENTRY_OVERHEAD_BYTES = 256


def entry_bytes(key: str, value: Embedding) -> int:
    return len(key) + value.raw.nbytes + _ENTRY_OVERHEAD_BYTES


@dataclass
class _Flight:
    """One computation under way, and the callers waiting for it."""

    task: asyncio.Task
    followers: list[Later[Embedding]] = field(default_factory=list)
    waiters: int = 0


class EmbeddingCache:
    """Maps a key (a query string, an image URL or content hash) to its embedding.

    ``capacity=0`` keeps nothing between calls, but concurrent lookups of one key still share
    one computation. When every caller waiting on a computation has gone (cancelled its
    ``Later``), the computation is cancelled too, so abandoned work never reaches the model.
    A caller waits on a ``Later`` of its own (no task, no shield, no event-loop callback):
    thousands of pairs can wait for one image at the cost of a plain call each when it lands.
    """

    def __init__(self, capacity: int, *, max_bytes: int = 0) -> None:
        """``capacity``: most entries; ``max_bytes``: most bytes (0: no bound but entries)."""
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: collections.OrderedDict[str, Embedding] = collections.OrderedDict()
        self._flights: dict[str, _Flight] = {}
        self.hits = 0
        self.misses = 0

    def stats(self) -> CacheStats:
        return CacheStats(capacity=self.capacity, entries=len(self._entries), hits=self.hits, misses=self.misses)

    def lookup(self, key: str, compute: Callable[[], Awaitable[Embedding]]) -> Soon[Embedding]:
        """The embedding if it is cached, else a ``Later`` of it: joining the computation under
        way, or starting ``compute()``. Cancelling the ``Later`` withdraws this caller."""
        found = self.find(key)
        if found is not None:
            return found
        self.misses += 1
        flight = _Flight(asyncio.ensure_future(compute()))
        self._flights[key] = flight
        flight.task.add_done_callback(lambda task: self._landed(key, flight, task))
        return self._follow(key, flight)

    def _hit(self, key: str) -> Embedding | None:
        """The embedding if it is cached (a hit), else None; never starts or joins work."""
        cached = self._entries.get(key)
        if cached is not None:
            self._entries.move_to_end(key)
            self.hits += 1
        return cached

    def find(self, key: str) -> Soon[Embedding] | None:
        """The embedding if it is cached, a ``Later`` of it if it is being computed, else None
        (and no work)."""
        cached = self._hit(key)
        if cached is not None:
            return cached
        flight = self._flights.get(key)
        if flight is None:
            return None
        self.hits += 1  # joined an encode already under way: no extra model work
        return self._follow(key, flight)

    def _follow(self, key: str, flight: _Flight) -> Later[Embedding]:
        def withdrawn() -> None:
            flight.waiters -= 1
            if flight.waiters == 0 and not flight.task.done():
                # Everyone who wanted this is gone; forget it at once so that a new caller
                # starts afresh instead of joining a cancelled computation.
                if self._flights.get(key) is flight:
                    del self._flights[key]
                flight.task.cancel()

        follower: Later[Embedding] = Later(on_cancel=withdrawn)
        flight.followers.append(follower)
        flight.waiters += 1
        return follower

    def _store(self, key: str, value: Embedding) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        if self.max_bytes:  # counted only where bounded
            self.bytes += entry_bytes(key, value)
        while len(self._entries) > self.capacity or (self.max_bytes and self.bytes > self.max_bytes):
            old_key, old_value = self._entries.popitem(last=False)
            if self.max_bytes:
                self.bytes -= entry_bytes(old_key, old_value)

    def _landed(self, key: str, flight: _Flight, task: asyncio.Task) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        value, error = outcome(task)  # cancelled: every follower withdrew, or the server is stopping
        if error is None and self.capacity > 0:  # failures are not cached: the next request tries again
            self._store(key, value)
        for follower in flight.followers:  # each runs its waiters' callbacks, in one go
            if error is None:
                follower.set_result(value)
            else:
                follower.set_error(error)
