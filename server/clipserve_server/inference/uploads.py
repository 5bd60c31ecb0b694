"""Uploads under a claimed hash, while their bytes are being checked.

An upload's ``image_sha256`` is the caller's claim. The engine hashes the bytes first and only
then lets the upload join, or become, the cache's entry for the hash they have: a liar's junk
under another image's hash fails that upload alone and never stands for the image (keyed by the
claim, it had failed every honest upload of that image arriving meanwhile, with an error that
described the liar's upload). A large upload is hashed off the event loop; a reference by that
hash alone arriving meanwhile waits here for the checks of that hash under way: it joins the
entry once one of them proves the hash, and is asked for the bytes if none does.

Event-loop thread only, like the caches.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class _Checks:
    running: int = 0
    waiters: list[asyncio.Future] = field(default_factory=list)


class UploadChecks:
    def __init__(self) -> None:
        self._by_key: dict[str, _Checks] = {}

    def pending(self, key: str) -> bool:
        """Whether an upload claiming ``key`` is being checked now."""
        return key in self._by_key

    @contextmanager
    def checking(self, key: str | None) -> Iterator[None]:
        """Around one upload's check under the claimed ``key`` (None: no claim), which ends
        having joined the entry for its hash, or having failed."""
        if key is None:
            yield
            return
        checks = self._by_key.setdefault(key, _Checks())
        checks.running += 1
        try:
            yield
        finally:
            checks.running -= 1
            waiters, checks.waiters = checks.waiters, []
            if not checks.running:
                del self._by_key[key]
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def one_ends(self, key: str) -> None:
        """Until one check under ``key`` ends (at once if none is running)."""
        checks = self._by_key.get(key)
        if checks is None:
            return
        waiter = asyncio.get_running_loop().create_future()
        checks.waiters.append(waiter)
        await waiter
