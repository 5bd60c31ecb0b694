"""Embedding caches: LRU bounds, shared in-flight work, failures and cancellation."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from clipserve_server.inference.cache import EmbeddingCache
from clipserve_server.inference.promises import awaited


class Counter:
    def __init__(self, delay: float = 0.0, fail: Exception | None = None) -> None:
        self.calls: list[str] = []
        self.delay = delay
        self.fail = fail

    def compute(self, key: str):
        async def run() -> np.ndarray:
            self.calls.append(key)
            await asyncio.sleep(self.delay)
            if self.fail is not None:
                raise self.fail
            return np.array([len(key)], dtype=np.float32)

        return run


async def get(cache: EmbeddingCache, key: str, compute):
    """What a caller does: take the cached embedding, or wait for it."""
    return await awaited(cache.lookup(key, compute))


def test_a_hit_skips_the_computation():
    async def main():
        cache, counter = EmbeddingCache(10), Counter()
        await get(cache, "a", counter.compute("a"))
        await get(cache, "a", counter.compute("a"))
        return cache.stats(), counter.calls

    stats, calls = asyncio.run(main())
    assert calls == ["a"]
    assert (stats.entries, stats.hits, stats.misses, stats.hit_rate) == (1, 1, 1, 0.5)


def test_least_recently_used_entries_are_evicted_first():
    async def main():
        cache, counter = EmbeddingCache(2), Counter()
        for key in ("a", "b", "a", "c", "a", "b"):
            await get(cache, key, counter.compute(key))
        return counter.calls

    assert asyncio.run(main()) == ["a", "b", "c", "b"]  # "b" was evicted by "c", "a" stayed warm


def test_concurrent_lookups_share_one_computation_even_without_a_cache():
    async def main():
        cache, counter = EmbeddingCache(0), Counter(delay=0.05)
        results = await asyncio.gather(*(get(cache, "k", counter.compute("k")) for _ in range(10)))
        return cache.stats(), counter.calls, results

    stats, calls, results = asyncio.run(main())
    assert calls == ["k"] and len(results) == 10 and stats.entries == 0


def test_failures_reach_every_waiter_and_are_not_cached():
    async def main():
        cache, failing = EmbeddingCache(10), Counter(delay=0.01, fail=ValueError("boom"))
        outcomes = await asyncio.gather(
            *(get(cache, "k", failing.compute("k")) for _ in range(3)), return_exceptions=True
        )
        later = await get(cache, "k", Counter().compute("k"))
        return failing.calls, outcomes, later

    calls, outcomes, later = asyncio.run(main())
    assert calls == ["k"]
    assert all(isinstance(o, ValueError) for o in outcomes)
    assert float(later[0]) == 1.0


def test_the_computation_is_cancelled_only_when_every_waiter_has_gone():
    async def main():
        cache = EmbeddingCache(10)
        started, finished = asyncio.Event(), []

        async def slow() -> np.ndarray:
            started.set()
            await asyncio.sleep(0.2)
            finished.append(True)
            return np.zeros(1, dtype=np.float32)

        first = asyncio.ensure_future(get(cache, "k", slow))
        second = asyncio.ensure_future(get(cache, "k", slow))
        await started.wait()
        first.cancel()
        await second  # the remaining waiter still gets its result
        third = asyncio.ensure_future(get(cache, "j", slow))
        await asyncio.sleep(0.01)
        third.cancel()
        with pytest.raises(asyncio.CancelledError):
            await third
        await asyncio.sleep(0.3)
        return finished

    assert asyncio.run(main()) == [True]  # "k" finished for its last waiter; "j" was abandoned
