"""Decode slots shared fairly between callers.

A FIFO of decode slots lets one caller that sends slow images (each within every limit, but
seconds to decode) queue ahead of everyone: two such images held both workers of a 2-core box
and another caller's 40x40 PNG waited 31-36 s. Here a freed slot goes to the waiting caller
with the fewest slots in use, so another caller waits for at most the first slot to free up
(--decode-timeout-s at most, in worker processes), never behind the slow caller's queue. A
caller alone still gets every slot: an honest stream runs as fast as before.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator

from ..utils.callers import CALLER


class FairShare:
    """``capacity`` slots; ``async with share.slot():`` holds one for the current caller."""

    def __init__(self, capacity: int) -> None:
        self._free = capacity
        self._in_use: collections.Counter[str] = collections.Counter()
        self._waiting: dict[str, collections.deque[asyncio.Future]] = {}

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        caller = CALLER.get()
        await self._acquire(caller)
        try:
            yield
        finally:
            self._release(caller)

    def in_use(self, caller: str) -> int:
        return self._in_use[caller]

    async def _acquire(self, caller: str) -> None:
        if self._free > 0 and not self._waiting:
            self._free -= 1
            self._in_use[caller] += 1
            return
        granted = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(caller, collections.deque()).append(granted)
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():  # handed a slot as it was cancelled
                self._release(caller)
            else:
                queue = self._waiting.get(caller)
                if queue is not None and granted in queue:
                    queue.remove(granted)
                    if not queue:
                        del self._waiting[caller]
            raise

    def _release(self, caller: str) -> None:
        self._in_use[caller] -= 1
        if self._in_use[caller] <= 0:
            del self._in_use[caller]
        while self._waiting:
            chosen = min(self._waiting, key=self._in_use.__getitem__)
            queue = self._waiting[chosen]
            granted = queue.popleft()
            if not queue:
                del self._waiting[chosen]
            if granted.done():  # its caller was cancelled meanwhile
                continue
            self._in_use[chosen] += 1
            granted.set_result(None)
            return
        self._free += 1
