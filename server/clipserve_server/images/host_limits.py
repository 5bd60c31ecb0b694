"""Politeness towards image hosts: a cap on simultaneous requests per host, lowered for a host
that answers 429.

A small host (a university web server, a Python ``http.server`` with its listen backlog of 5)
drops connections when a server with many downloads in flight sends them all its way, so each
host gets at most ``cap`` requests at a time from this process; the other hosts keep their own
pace. A 429 halves that host's allowance (down to one request at a time) and every success
gives one back (additive increase, multiplicative decrease, as TCP does with its window).

Across processes the cap is shared out, not coordinated: each decode worker process that
downloads gets ``cap // workers`` (at least 1) of it, so their sum stays within the cap
without a lock between processes (``FetchSettings.share``).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field


@dataclass
class _Host:
    limit: int
    active: int = 0
    waiters: deque[asyncio.Future] = field(default_factory=deque)


class HostGate:
    def __init__(self, cap: int) -> None:
        self._cap = cap
        self._hosts: dict[str, _Host] = {}

    def limit(self, host: str) -> int:
        """How many requests ``host`` may have in flight from here now."""
        state = self._hosts.get(host)
        return state.limit if state is not None else self._cap

    @asynccontextmanager
    async def slot(self, host: str) -> AsyncIterator[None]:
        """Hold one of ``host``'s request slots, waiting (in arrival order) for one if needed."""
        state = self._hosts.get(host)
        if state is None:
            state = self._hosts[host] = _Host(self._cap)
        if state.active >= state.limit or state.waiters:
            waiter = asyncio.get_running_loop().create_future()
            state.waiters.append(waiter)
            try:
                await waiter  # release() counts us in before waking us
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():  # woken and cancelled at once: pass the slot on
                    state.active -= 1
                    self._wake(host, state)
                elif waiter in state.waiters:
                    state.waiters.remove(waiter)
                raise
        else:
            state.active += 1
        try:
            yield
        finally:
            state.active -= 1
            self._wake(host, state)

    def slow_down(self, host: str) -> None:
        """``host`` answered 429: halve its allowance."""
        state = self._hosts.setdefault(host, _Host(self._cap))
        state.limit = max(1, state.limit // 2)

    def succeeded(self, host: str) -> None:
        """``host`` answered: give back one slot of a lowered allowance."""
        state = self._hosts.get(host)
        if state is not None and state.limit < self._cap:
            state.limit += 1
            self._wake(host, state)

    def _wake(self, host: str, state: _Host) -> None:
        while state.waiters and state.active < state.limit:
            waiter = state.waiters.popleft()
            if not waiter.done():
                state.active += 1
                waiter.set_result(None)
        if not state.active and not state.waiters and state.limit == self._cap:
            self._hosts.pop(host, None)  # nothing to remember: many distinct hosts cost nothing
