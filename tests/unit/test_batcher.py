"""The dynamic batcher on its own: limits, delays, failures, cancellation, a dying loop."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from clipserve_server.inference.instances import Instance, InstancePool
from clipserve_server.utils.errors import ErrorKind, ItemError
from ..helpers import make_batcher


class Recorder:
    """A forward function that records its batches and returns one-hot-ish rows."""

    def __init__(self, delay: float = 0.0, fail: BaseException | None = None) -> None:
        self.batches: list[tuple[list[str], list[int]]] = []
        self.delay = delay
        self.fail = fail

    def __call__(self, texts, images):
        self.batches.append((list(texts), list(images)))
        if self.delay:
            time.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        text_rows = np.array([[float(len(t))] for t in texts], dtype=np.float32).reshape(len(texts), 1)
        image_rows = np.array([[float(i)] for i in images], dtype=np.float32).reshape(len(images), 1)
        return text_rows, image_rows


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 30))


def test_each_item_gets_its_own_row():
    async def main():
        forward = Recorder()
        batcher = make_batcher(forward, max_batch_size=8, max_delay_s=0.01, max_queue_size=100)
        batcher.start()
        results = await asyncio.gather(
            *(batcher.encode_text("x" * n, wait=True) for n in range(1, 6)),
            *(batcher.encode_image(n, wait=True) for n in range(10, 13)),
        )
        await batcher.stop()
        return forward, results

    forward, results = run(main())
    assert [float(r[0]) for r in results] == [1, 2, 3, 4, 5, 10, 11, 12]
    assert forward.batches == [(["x", "xx", "xxx", "xxxx", "xxxxx"], [10, 11, 12])]


def test_batches_are_capped_at_max_batch_size():
    async def main():
        forward = Recorder()
        batcher = make_batcher(forward, max_batch_size=4, max_delay_s=0.05, max_queue_size=100)
        batcher.start()
        await asyncio.gather(*(batcher.encode_image(n, wait=True) for n in range(10)))
        await batcher.stop()
        return forward

    assert [len(images) for _, images in run(main()).batches] == [4, 4, 2]


def test_a_full_batch_goes_without_waiting_for_the_delay():
    async def main():
        batcher = make_batcher(Recorder(), max_batch_size=2, max_delay_s=30.0, max_queue_size=100)
        batcher.start()
        started = time.monotonic()
        await asyncio.gather(batcher.encode_image(1, wait=True), batcher.encode_image(2, wait=True))
        elapsed = time.monotonic() - started
        await batcher.stop()
        return elapsed

    assert run(main()) < 10.0  # far below the 30 s delay


def test_a_partial_batch_goes_once_the_delay_has_passed():
    async def main():
        batcher = make_batcher(Recorder(), max_batch_size=100, max_delay_s=0.05, max_queue_size=100)
        batcher.start()
        row = await batcher.encode_image(7, wait=True)
        await batcher.stop()
        return row

    assert float(run(main())[0]) == 7.0


def test_a_failing_forward_fails_every_item_of_its_batch_and_the_loop_goes_on():
    async def main():
        forward = Recorder(fail=RuntimeError("CUDA out of memory"))
        batcher = make_batcher(forward, max_batch_size=8, max_delay_s=0.01, max_queue_size=100)
        batcher.start()
        first = await asyncio.gather(*(batcher.encode_image(n, wait=True) for n in range(3)), return_exceptions=True)
        forward.fail = None
        second = await batcher.encode_image(5, wait=True)
        alive = batcher.alive
        await batcher.stop()
        return first, second, alive

    first, second, alive = run(main())
    assert all(isinstance(e, ItemError) and e.kind is ErrorKind.INTERNAL for e in first)
    assert "CUDA out of memory" in first[0].message
    assert float(second[0]) == 5.0 and alive


def test_cancelled_items_never_reach_the_model():
    async def main():
        forward = Recorder(delay=0.2)
        batcher = make_batcher(forward, max_batch_size=1, max_delay_s=0.0, max_queue_size=100)
        batcher.start()
        busy = asyncio.ensure_future(batcher.encode_image(1, wait=True))  # occupies the model
        await asyncio.sleep(0.05)
        doomed = asyncio.ensure_future(batcher.encode_image(2, wait=True))
        await asyncio.sleep(0.01)
        doomed.cancel()
        await busy
        await batcher.encode_image(3, wait=True)
        await batcher.stop()
        return forward

    assert [images for _, images in run(main()).batches] == [[1], [3]]


def test_a_full_queue_rejects_unary_work_and_holds_back_streams():
    async def main():
        batcher = make_batcher(Recorder(delay=0.2), max_batch_size=1, max_delay_s=0.0, max_queue_size=2)
        batcher.start()
        first = asyncio.ensure_future(batcher.encode_image(1, wait=True))
        await asyncio.sleep(0.05)  # the model holds item 1; the queue has room for two
        queued = [asyncio.ensure_future(batcher.encode_image(n, wait=True)) for n in (2, 3)]
        await asyncio.sleep(0.01)
        with pytest.raises(ItemError) as info:
            await batcher.encode_image(4, wait=False)
        waiting = asyncio.ensure_future(batcher.encode_image(5, wait=True))  # a stream item waits for room
        rows = await asyncio.gather(first, *queued, waiting)
        await batcher.stop()
        return info.value, rows

    error, rows = run(main())
    assert error.kind is ErrorKind.OVERLOADED
    assert [float(r[0]) for r in rows] == [1, 2, 3, 5]


def test_a_dead_loop_fails_waiting_items_and_reports_itself():
    deaths: list[BaseException] = []

    async def main():
        batcher = make_batcher(Recorder(), max_batch_size=4, max_delay_s=0.01, max_queue_size=10, on_dead=deaths.append)

        async def broken_next_batch():
            raise RuntimeError("bug in the loop")

        batcher._next_batch = broken_next_batch  # simulate a bug inside the loop itself
        batcher.start()
        with pytest.raises(ItemError) as info:
            await batcher.encode_text("never answered otherwise", wait=True)
        alive = batcher.alive
        await batcher.stop()
        return info.value, alive

    error, alive = run(main())
    assert error.kind is ErrorKind.UNAVAILABLE and "bug in the loop" in error.message
    assert not alive
    assert len(deaths) == 1


def test_stop_fails_what_is_still_queued():
    async def main():
        batcher = make_batcher(Recorder(delay=0.3), max_batch_size=1, max_delay_s=0.0, max_queue_size=10)
        batcher.start()
        items = [asyncio.ensure_future(batcher.encode_image(n, wait=True)) for n in range(3)]
        await asyncio.sleep(0.05)
        await batcher.stop()
        return await asyncio.gather(*items, return_exceptions=True)

    results = run(main())
    assert all(isinstance(r, ItemError) and r.kind is ErrorKind.UNAVAILABLE for r in results)


def test_texts_are_tokenized_on_a_thread_of_their_own_outside_the_forward_timeout():
    """A batch of long queries takes long to tokenize: it holds neither the model's thread nor
    its --forward-timeout-s (the watchdog would call a slow tokenizer a wedged model)."""
    threads: dict[str, str] = {}

    def prepare(texts: list[str]) -> list[str]:
        threads["prepare"] = threading.current_thread().name
        time.sleep(0.5)  # longer than the forward's timeout below
        return [text.upper() for text in texts]

    recorder = Recorder()

    def forward(texts, images):
        threads["forward"] = threading.current_thread().name
        return recorder(texts, images)

    async def main():
        died: list[BaseException] = []
        pool = InstancePool([Instance("", 0, forward, prepare=prepare)])
        batcher = make_batcher(
            pool, max_batch_size=4, max_delay_s=0, max_queue_size=16, forward_timeout_s=0.3, on_dead=died.append
        )
        batcher.start()
        row = await batcher.encode_text("abc", wait=True)
        await batcher.stop()
        return row, died

    row, died = run(main())
    assert float(row[0]) == 3.0 and recorder.batches == [(["ABC"], [])] and not died
    assert threads["prepare"].startswith("clipserve-tokenize") and threads["forward"].startswith("clipserve-model")
