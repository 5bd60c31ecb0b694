"""A decode worker process: downloads images (when handed a URL), decodes and preprocesses them.

``python -m clipserve_server.images.decode_worker IMAGES_FD RESULTS_FD IMAGE_SLOT_BYTES SLOTS``, started by
``decode_pool.ProcessDecoder``, which owns the other side of everything defined here.

Each worker shares two memory files with the server (memfd: no /dev/shm, whose 64 MiB in a
default container would not do): one with the bytes of each uploaded image in flight, one with
each item's result, plus a status word naming the item being decoded. Only small headers cross
the worker's stdin and stdout, so the server spends a memcpy of an upload and of a result per item
instead of pushing them through pipes (measured: ~0.8 ms of its CPU per photo with pipes).

A URL comes alone: the worker downloads it itself, with the server's own ``ImageFetcher``
(address guard, redirects, size cap, budget, retries, its share of each host's connections), so
the server's event loop spends nothing on the download. Downloads run concurrently on the worker's event loop; decoding runs on it one image
at a time, so a slow download holds only its own slot, never the decoder.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import pickle
import struct
import sys
from collections.abc import Sequence
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from ..utils.errors import ErrorKind, ItemError
from ..utils.threads import single_threaded_torch
from .fetch import FetchError, FetchSettings
from .fetch_events import FetchTally

if TYPE_CHECKING:
    from .decode_pool import DecodeJob

# server -> worker, once: the size of the pickled (jobs, fetch settings), then the pickle.
# Then, per item: slot, job, URL bytes (0: an upload in the slot's image memory), upload bytes,
# name bytes; then the URL and the name.
REQUEST = struct.Struct("<IIIII")
# worker -> server, per item: slot, pickle bytes, out-of-band buffers; then their sizes, then the
# pickle of (ok, value, fetch events). value: the result, or (ErrorKind name, message, whether a
# download failed); fetch events: what the worker's downloads did since its last reply
# (``FetchTally.drain``), for the server's metrics.
REPLY = struct.Struct("<III")
SIZE = struct.Struct("<Q")
# 1 + the slot being decoded (0 while none is: who is to blame for a crash), and the count of
# decodes begun (the server's budget watch tells one decode from the next in the same slot).
STATUS = struct.Struct("<II")
UPLOAD_SLOTS = 2  # slots 0 and 1 carry uploads: one being decoded, the next waiting
RESULT_SLOT_BYTES = 32 << 20  # float32 pixel_values up to 3x1600x1600; larger results go in the pipe
READY = b"R"


def results_size(slots: int) -> int:
    """The results file: one result area per slot, then the status word."""
    return slots * RESULT_SLOT_BYTES + STATUS.size


class _Worker:
    def __init__(self, jobs: Sequence[DecodeJob], fetch: FetchSettings | None, replies: IO[bytes], images: mmap.mmap, image_slot_bytes: int, results: mmap.mmap, slots: int) -> None:
        self._jobs = jobs
        self._tally = FetchTally()
        self._fetcher = fetch.fetcher(self._tally) if fetch is not None else None
        self._replies = replies
        self._images = images
        self._image_slot_bytes = image_slot_bytes
        self._results = results
        self._status = slots * RESULT_SLOT_BYTES
        self._downloads: set[asyncio.Task] = set()
        self._begun = 0

    async def serve(self, requests: asyncio.StreamReader) -> None:
        """Answer every request until the server closes the pipe."""
        if self._fetcher is not None:
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
            if self._fetcher is not None:
                await self._fetcher.close()

    async def _download_and_decode(self, slot: int, job: int, url: str, name: str) -> None:
        try:
            if self._fetcher is None:
                raise ItemError(ErrorKind.INTERNAL, f"{name}: this decode worker was started without download settings")
            data = await self._fetcher.fetch(url)
        except ItemError as exc:
            self._reply(slot, False, (exc.kind.name, exc.message, isinstance(exc, FetchError)))
        except Exception as exc:  # a bug: this image fails, the worker goes on
            self._reply(slot, False, (ErrorKind.INTERNAL.name, f"{name}: downloading failed: {type(exc).__name__}: {exc}", False))
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
        self._replies.write(REPLY.pack(slot, len(payload), len(raw)) + b"".join(SIZE.pack(view.nbytes) for view in raw) + payload)
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
