"""Embedding caches: LRU-bounded, with concurrent requests for one key sharing one encode.

All state is touched only from the event loop thread, so no lock is needed.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable
from dataclasses import dataclass


from .domain import CacheStats
from .model import Embedding


@dataclass
class _Flight:
    task: asyncio.Task
    waiters: int = 0


class EmbeddingCache:
    """Maps a key (a query string, an image URL or content hash) to its embedding.

    ``capacity=0`` keeps nothing between calls, but concurrent lookups of one key still share
    one computation. When every caller waiting on a computation has gone (cancelled), the
    computation is cancelled too, so abandoned work never reaches the model.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: collections.OrderedDict[str, Embedding] = collections.OrderedDict()
        self._flights: dict[str, _Flight] = {}
        self.hits = 0
        self.misses = 0

    def stats(self) -> CacheStats:
        return CacheStats(capacity=self.capacity, entries=len(self._entries), hits=self.hits, misses=self.misses)

    async def get(self, key: str, compute: Callable[[], Awaitable[Embedding]]) -> Embedding:
        cached = self._hit(key)
        if cached is not None:
            return cached
        flight = self._flights.get(key)
        if flight is None:
            self.misses += 1
            flight = _Flight(asyncio.ensure_future(compute()))
            self._flights[key] = flight
            flight.task.add_done_callback(lambda task: self._landed(key, flight, task))
        else:
            self.hits += 1  # joined an encode already under way: no extra model work
        return await self._wait(key, flight)

    def peek(self, key: str) -> Embedding | None:
        """The embedding if it is cached (a hit), else None; never starts or joins work."""
        return self._hit(key)

    async def join(self, key: str) -> Embedding | None:
        """The embedding if it is cached or being computed; None (and no work) otherwise."""
        cached = self._hit(key)
        if cached is not None:
            return cached
        flight = self._flights.get(key)
        if flight is None:
            return None
        self.hits += 1
        return await self._wait(key, flight)

    def _hit(self, key: str) -> Embedding | None:
        cached = self._entries.get(key)
        if cached is not None:
            self._entries.move_to_end(key)
            self.hits += 1
        return cached

    async def _wait(self, key: str, flight: _Flight) -> Embedding:
        flight.waiters += 1
        try:
            return await asyncio.shield(flight.task)
        finally:
            flight.waiters -= 1
            if flight.waiters == 0 and not flight.task.done():
                # Everyone who wanted this is gone; forget it at once so that a new caller
                # starts afresh instead of joining a cancelled computation.
                if self._flights.get(key) is flight:
                    del self._flights[key]
                flight.task.cancel()

    def _landed(self, key: str, flight: _Flight, task: asyncio.Task) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        if task.cancelled() or task.exception() is not None or self.capacity == 0:
            return  # failures are not cached: the next request tries again
        self._entries[key] = task.result()
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
