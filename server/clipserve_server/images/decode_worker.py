"""A decode worker process: downloads images (when handed a URL), decodes and preprocesses them.

``python -m clipserve_server.images.decode_worker IMAGES_FD RESULTS_FD IMAGE_SLOT_BYTES SLOTS``, started by
``decode_pool.ProcessDecoder``, which owns the other side; what both sides agree on (headers,
memory layout, the job) is in ``decode_protocol``.

Each worker shares two memory files with the server (memfd: no /dev/shm, whose 64 MiB in a
default container would not do): one with the bytes of each uploaded image in flight, one with
each item's result, plus a status word naming the item being decoded. Only small headers cross
the worker's stdin and stdout, so the server spends a memcpy of an upload and of a result per item
instead of pushing them through pipes (measured: ~0.8 ms of its CPU per photo with pipes).

A URL comes alone: the worker downloads it itself, with the server's own ``ImageFetcher``
(address guard, redirects, size cap, budget, retries, its share of each host's connections), so
the server's event loop spends nothing on the download. Downloads run concurrently on the
worker's event loop; decoding runs on it one image at a time, so a slow download holds only its
own slot, never the decoder.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import pickle
import sys
from collections.abc import Sequence
from typing import IO, Any

import numpy as np

from ..utils.errors import ErrorKind, ItemError
from ..utils.threads import single_threaded_torch
from .decode_protocol import (
    READY,
    REPLY,
    REQUEST,
    RESULT_SLOT_BYTES,
    SIZE,
    STATUS,
    UPLOAD_SLOTS,
    DecodeJob,
    results_size,
)
from .fetch import FetchError, FetchSettings, ImageFetcher
from .fetch_events import FetchTally

class _Worker:
    def __init__(
        self,
        jobs: Sequence[DecodeJob],
        fetch: FetchSettings,
        replies: IO[bytes],
        images: mmap.mmap,
        image_slot_bytes: int,
        results: mmap.mmap,
        slots: int,
    ) -> None:
        self._jobs = jobs
        self._tally = FetchTally()
        self._fetcher = ImageFetcher(fetch, events=self._tally)
        self._replies = replies
        self._images = images
        self._image_slot_bytes = image_slot_bytes
        self._results = results
        self._status = slots * RESULT_SLOT_BYTES
        self._downloads: set[asyncio.Task] = set()
        self._begun = 0

    async def serve(self, requests: asyncio.StreamReader) -> None:
        """Answer every request until the server closes the pipe."""
        await self._fetcher.start()
        self._replies.write(READY)
        self._replies.flush()
        try:
            while True:
                try:
                    slot, job, url_size, size, name_size = REQUEST.unpack(await requests.readexactly(REQUEST.size))
                    url = (await requests.readexactly(url_size)).decode("utf-8")
                    name = (await requests.readexactly(name_size)).decode("utf-8")
                except asyncio.IncompleteReadError:
                    return
                if url:
                    task = asyncio.ensure_future(self._download_and_decode(slot, job, url, name))
                    self._downloads.add(task)
                    task.add_done_callback(self._downloads.discard)
                else:
                    start = slot * self._image_slot_bytes
                    self._decode(slot, job, self._images[start : start + size], name)
        finally:
            for task in list(self._downloads):
                task.cancel()
            await self._fetcher.close()

    async def _download_and_decode(self, slot: int, job: int, url: str, name: str) -> None:
        try:
            data = await self._fetcher.fetch(url)
        except ItemError as exc:
            self._reply(slot, False, (exc.kind.name, exc.message, isinstance(exc, FetchError)))
        except Exception as exc:  # a bug: this image fails, the worker goes on
            self._reply(
                slot,
                False,
                (ErrorKind.INTERNAL.name, f"{name}: downloading failed: {type(exc).__name__}: {exc}", False),
            )
        else:
            self._decode(slot, job, data, name)

    def _decode(self, slot: int, job: int, data: bytes, name: str) -> None:
        self._begun += 1
        self._results[self._status : self._status + STATUS.size] = STATUS.pack(slot + 1, self._begun)
        try:
            ok, value = True, self._jobs[job](data, name)
        except ItemError as exc:
            ok, value = False, (exc.kind.name, exc.message, False)
        except Exception as exc:  # a bug: this image fails, the worker goes on
            ok, value = False, (ErrorKind.INTERNAL.name, f"{name}: decoding failed: {type(exc).__name__}: {exc}", False)
        # Cleared before the reply: once the server has it, it may reuse the slot.
        self._results[self._status : self._status + STATUS.size] = STATUS.pack(0, self._begun)
        self._reply(slot, ok, value)

    def _reply(self, slot: int, ok: bool, value: Any) -> None:
        if isinstance(value, np.ndarray):
            value = np.ascontiguousarray(value)  # a strided view would be pickled in-band
        buffers: list[pickle.PickleBuffer] = []
        reply = (ok, value, self._tally.drain())
        payload = pickle.dumps(reply, protocol=5, buffer_callback=buffers.append)
        raw = [buffer.raw() for buffer in buffers]
        if sum(view.nbytes for view in raw) > RESULT_SLOT_BYTES:
            payload, raw = pickle.dumps(reply, protocol=5), []
        offset = slot * RESULT_SLOT_BYTES
        for view in raw:
            self._results[offset : offset + view.nbytes] = view
            offset += view.nbytes
        self._replies.write(
            REPLY.pack(slot, len(payload), len(raw)) + b"".join(SIZE.pack(view.nbytes) for view in raw) + payload
        )
        self._replies.flush()


async def _serve(replies: IO[bytes], images: mmap.mmap, image_slot_bytes: int, results: mmap.mmap, slots: int) -> None:
    requests = asyncio.StreamReader()
    await asyncio.get_running_loop().connect_read_pipe(lambda: asyncio.StreamReaderProtocol(requests), sys.stdin.buffer)
    jobs, fetch = pickle.loads(await requests.readexactly(SIZE.unpack(await requests.readexactly(SIZE.size))[0]))
    single_threaded_torch()
    for job in jobs:
        job.warm()
    await _Worker(jobs, fetch, replies, images, image_slot_bytes, results, slots).serve(requests)


def main() -> None:
    # Replies go out on a private copy of stdout; fd 1 itself now points at stderr, so that a
    # stray print (from Python or a C library) lands in the log instead of corrupting a reply.
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    images_fd, results_fd, image_slot_bytes, slots = (int(arg) for arg in sys.argv[1:5])
    images = mmap.mmap(images_fd, UPLOAD_SLOTS * image_slot_bytes)
    results = mmap.mmap(results_fd, results_size(slots))
    asyncio.run(_serve(replies, images, image_slot_bytes, results, slots))


if __name__ == "__main__":
    main()
