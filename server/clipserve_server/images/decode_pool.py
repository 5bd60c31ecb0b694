"""Where images are decoded and preprocessed: threads of this process, or worker processes.

Threads start at once and hand their result over without a copy, but they share this process's
GIL with the event loop: every time PIL or torch gives the GIL back and wants it again, a busy
loop can keep it for up to the 5 ms switch interval, and numpy's view of a PIL image is built
while holding it. That is fine for a few cores and stops scaling long before 16 (see
docs/performance/how-it-is-fast.md). Worker processes (``--decode-pool processes``,
``decode_worker``) each have their own GIL and download URLs themselves: this process hands
over a URL, or copies an upload's bytes into memory it shares with the worker, and copies the
preprocessed crop out of it, on the event loop, with no thread hop.

One pool serves every model of the server: each model's preprocessing is a ``DecodeJob``, and
each request names the job (``decoder.for_job(i)`` gives a model its own view).
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import os
import pickle
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from ..utils.config import ServerConfig
from ..utils.errors import ErrorKind, ItemError
from ..utils.threads import decode_thread_setup
from .decode import open_image
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
from .device_decode import BatchDecodeFn, DeviceBatches
from .fetch import FetchError, FetchSettings
from .fairness import FairShare
from .fetch_events import FetchEvents, replay
from .geometry import ImageLimits

log = logging.getLogger(__name__)

# Above this many decode workers, "auto" picks processes. Threads hold the GIL for ~1.9 ms of
# each photo and stall behind a busy event loop: as good as processes on 2 cores (measured),
# a ceiling of a few hundred images/s on many (docs/performance/how-it-is-fast.md, "Decoding on every core").
AUTO_PROCESSES_ABOVE = 4

_JPEG_MAGIC = b"\xff\xd8\xff"


class Decoder(Protocol):
    @property
    def fetches(self) -> bool:
        """Whether ``fetch_and_decode`` downloads URLs itself (else the caller fetches)."""
        ...

    async def start(self) -> None: ...

    async def decode(self, data: bytes, name: str, job: int = 0) -> Any: ...

    async def fetch_and_decode(self, url: str, name: str, job: int = 0) -> Any: ...

    async def close(self) -> None: ...

    def for_job(self, job: int) -> JobDecoder: ...


@dataclass(frozen=True)
class JobDecoder:
    """One model's view of the shared pool: its images, its preprocessing."""

    pool: Decoder
    job: int

    @property
    def fetches(self) -> bool:
        return self.pool.fetches

    async def decode(self, data: bytes, name: str) -> Any:
        return await self.pool.decode(data, name, self.job)

    async def fetch_and_decode(self, url: str, name: str) -> Any:
        return await self.pool.fetch_and_decode(url, name, self.job)


class ImageModel(Protocol):
    """What the pool needs of a model: the model interface (``models.model.EmbeddingModel``)
    provides it, so decoding reads no model code and ``images/`` stays below ``models/``."""

    def image_preprocessor(self) -> Callable[[Image.Image], Any]: ...

    @property
    def decode_size(self) -> tuple[int, int] | None: ...

    def device_jpeg_decoder(self) -> BatchDecodeFn: ...


def build_decoder(models: Sequence[ImageModel], config: ServerConfig, events: FetchEvents) -> Decoder:
    """One pool for ``models``; model i's images go through job i. ``events``: where worker
    processes' downloads are reported."""
    limits = ImageLimits.of(config)
    jobs = [
        DecodeJob(m.image_preprocessor(), config.max_image_pixels, m.decode_size if config.jpeg_draft else None, limits)
        for m in models
    ]
    workers = config.resolved_decode_workers
    if config.gpu_decode:
        # nvJPEG leaves little CPU work per image, and the CUDA context lives in this process.
        return ThreadDecoder(
            jobs, workers, on_device=[m.device_jpeg_decoder() for m in models], max_device_batch=config.max_batch_size
        )
    if config.decode_pool == "processes" or (config.decode_pool == "auto" and workers > AUTO_PROCESSES_ABOVE):
        return ProcessDecoder(
            jobs,
            workers,
            max_image_bytes=config.max_image_bytes,
            fetch=FetchSettings.of(config),
            events=events,
            decode_timeout_s=config.decode_timeout_s,
        )
    return ThreadDecoder(jobs, workers)


class ThreadDecoder:
    """Threads of this process; the event loop downloads what they decode. With ``on_device``
    (``--gpu-decode``: a batch decoder per job), JPEGs go to the model's device in batches
    (device_decode) and everything else, or what the device refuses, to the threads, at most
    ``max_device_batch`` (the server's --max-batch-size) in one device call.

    What threads cannot do: a thread cannot be stopped, so an image has no time budget here
    (the header checks, geometry.py, bound what it may cost; ``--decode-pool processes`` adds
    the budget). The threads are shared fairly between callers (fairness.py)."""

    fetches = False

    def __init__(
        self,
        jobs: Sequence[DecodeJob],
        workers: int,
        *,
        on_device: Sequence[BatchDecodeFn] | None = None,
        max_device_batch: int | None = None,
    ) -> None:
        if on_device is not None and (max_device_batch is None or len(on_device) != len(jobs)):
            raise ValueError("on_device wants one batch decoder per job, and max_device_batch")
        self._jobs = list(jobs)
        self._pool = ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="clipserve-decode", initializer=decode_thread_setup
        )
        self._share = FairShare(workers)
        self._on_device = (
            [DeviceBatches(d, self._pool, max_device_batch) for d in on_device]
            if on_device is not None and max_device_batch
            else [None] * len(self._jobs)
        )

    def for_job(self, job: int) -> JobDecoder:
        return JobDecoder(self, job)

    async def start(self) -> None:
        for job in self._jobs:
            await asyncio.get_running_loop().run_in_executor(self._pool, job.warm)

    async def decode(self, data: bytes, name: str, job: int = 0) -> Any:
        on_device = self._on_device[job]
        if on_device is not None and data.startswith(_JPEG_MAGIC):
            # The header only (no pixels decoded): the limits hold before the device sees it.
            header = open_image(data, max_pixels=self._jobs[job].max_pixels, name=name, limits=self._jobs[job].limits)
            if header.mode in ("RGB", "L"):  # CMYK and friends: the CPU decodes them exactly
                try:
                    return await on_device.decode(data)
                except RuntimeError as exc:  # a JPEG that nvJPEG does not take: the CPU path decodes it
                    log.debug("%s: nvJPEG refused it (%s); decoding on the CPU", name, exc)
        async with self._share.slot():
            return await asyncio.get_running_loop().run_in_executor(self._pool, self._jobs[job], data, name)

    async def fetch_and_decode(self, url: str, name: str, job: int = 0) -> Any:
        raise NotImplementedError("the event loop downloads for decode threads")

    async def close(self) -> None:
        for batches in self._on_device:
            if batches is not None:
                batches.close()
        self._pool.shutdown(wait=False, cancel_futures=True)


# -- worker processes -----------------------------------------------------------------------------

_SERVER_ROOT = str(Path(__file__).resolve().parents[2])  # so that a worker imports this very package
_NO_ROOM_WAIT_S = 0.05  # a worker could not be replaced: the others' slots free up soon


class _Requeue(Exception):
    """The worker died with this item still waiting: give it to another."""


class ProcessDecoder:
    """Worker processes (``decode_worker``), each sent at most two uploads at a time and a
    share of the downloads: they fetch the URLs themselves, and report to ``events``. An image
    that takes longer than ``decode_timeout_s`` to decode kills its worker (which is replaced)
    and fails; slots go to callers fairly (fairness.py)."""

    def __init__(
        self,
        jobs: Sequence[DecodeJob],
        workers: int,
        *,
        max_image_bytes: int,
        fetch: FetchSettings,
        events: FetchEvents,
        decode_timeout_s: float,
    ) -> None:
        # Each worker fetches with its share of each host's connections: together, within the cap.
        self._setup = pickle.dumps((list(jobs), fetch.share(workers)), protocol=pickle.HIGHEST_PROTOCOL)
        self._events = events
        self._size = workers
        self._image_slot_bytes = max_image_bytes
        self._download_slots = -(-fetch.concurrency // workers)
        self._workers: list[_Worker] = []
        self._decode_timeout_s = decode_timeout_s
        self._upload_room = FairShare(workers * UPLOAD_SLOTS)
        self._download_room = FairShare(workers * self._download_slots)
        self._replacing: set[asyncio.Task] = set()
        self._closing = False

    fetches = True

    async def start(self) -> None:
        self._workers = list(await asyncio.gather(*(self._spawn() for _ in range(self._size))))
        log.info("decoding images in %d worker processes, which download them too", self._size)

    def for_job(self, job: int) -> JobDecoder:
        return JobDecoder(self, job)

    async def decode(self, data: bytes, name: str, job: int = 0) -> Any:
        if len(data) > self._image_slot_bytes:  # the engine never sends one; a slot would not hold it
            raise ItemError(ErrorKind.INVALID_INPUT, f"{name}: over the {self._image_slot_bytes}-byte image limit")
        return await self._submit(self._upload_room, False, job, name, data=data)

    async def fetch_and_decode(self, url: str, name: str, job: int = 0) -> Any:
        return await self._submit(self._download_room, True, job, name, url=url)

    async def _submit(self, room: FairShare, download: bool, job: int, name: str, **item: Any) -> Any:
        async with room.slot():  # as many as the workers have slots for: a free slot is (nearly) certain
            while True:
                ready = [worker for worker in self._workers if worker.has_room(download)]
                if not ready:  # fewer workers than the room counts: one died
                    if self._replacing:
                        await asyncio.wait(self._replacing)
                    elif not self._workers:
                        raise ItemError(ErrorKind.UNAVAILABLE, "no image decoder process is running")
                    else:
                        await asyncio.sleep(_NO_ROOM_WAIT_S)
                    continue
                try:
                    return await min(ready, key=_Worker.load).submit(job, name, **item)
                except _Requeue:
                    continue

    async def close(self) -> None:
        self._closing = True
        await asyncio.gather(*self._replacing, return_exceptions=True)  # then they are in _workers
        await asyncio.gather(*(worker.close() for worker in self._workers))

    async def _spawn(self) -> _Worker:
        slots = UPLOAD_SLOTS + self._download_slots
        images = _SharedFile("clipserve-images", UPLOAD_SLOTS * self._image_slot_bytes)
        results = _SharedFile("clipserve-results", results_size(slots))
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, (_SERVER_ROOT, os.environ.get("PYTHONPATH")))),
        }
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "clipserve_server.images.decode_worker",
                str(images.fd),
                str(results.fd),
                str(self._image_slot_bytes),
                str(slots),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                env=env,
                pass_fds=(images.fd, results.fd),
            )
        finally:
            images.close_fd()  # the worker has its own copies; the mappings stay
            results.close_fd()
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(SIZE.pack(len(self._setup)) + self._setup)
        try:
            await proc.stdout.readexactly(len(READY))
        except asyncio.IncompleteReadError:
            raise RuntimeError(
                f"an image decoder process failed to start (exit code {await proc.wait()}); its error is above"
            ) from None
        return _Worker(
            proc,
            images.map,
            self._image_slot_bytes,
            results.map,
            slots,
            self._lost,
            self._events,
            self._decode_timeout_s,
        )

    def _lost(self, worker: _Worker, code: int | None) -> None:
        if worker in self._workers:
            self._workers.remove(worker)
        if not self._closing:
            log.error("an image decoder process exited (code %s); starting another", code)
            task = asyncio.ensure_future(self._replace())
            self._replacing.add(task)
            task.add_done_callback(self._replacing.discard)

    async def _replace(self) -> None:
        try:
            self._workers.append(await self._spawn())
        except Exception:
            log.exception("could not start a replacement image decoder process (%d left)", len(self._workers))


class _SharedFile:
    """An anonymous memory file, mapped here; its pages exist only once written to."""

    def __init__(self, name: str, size: int) -> None:
        self.fd = os.memfd_create(name)
        os.ftruncate(self.fd, size)
        self.map = mmap.mmap(self.fd, size)

    def close_fd(self) -> None:
        os.close(self.fd)


class _Worker:
    """The server's side of one worker process: its slots, and the items in them."""

    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        images: mmap.mmap,
        image_slot_bytes: int,
        results: mmap.mmap,
        slots: int,
        on_exit: Callable[[_Worker, int | None], None],
        events: FetchEvents,
        decode_timeout_s: float,
    ) -> None:
        self._events = events
        self._decode_timeout_s = decode_timeout_s
        self._over_budget = -1  # the slot whose image ran past the budget (its worker was killed)
        self._proc = proc
        self._images = images
        self._image_slot_bytes = image_slot_bytes
        self._results = results
        self._status = slots * RESULT_SLOT_BYTES
        self._on_exit = on_exit
        self._free = {False: list(range(UPLOAD_SLOTS)), True: list(range(UPLOAD_SLOTS, slots))}  # by "is a download"
        self._pending: dict[int, asyncio.Future] = {}
        self._reader = asyncio.ensure_future(self._read())
        self._watch = asyncio.ensure_future(self._watch_budget()) if decode_timeout_s > 0 else None

    def _decoding(self) -> tuple[int, int]:
        """(1 + the slot being decoded or 0, the worker's count of decodes begun)."""
        return STATUS.unpack(self._results[self._status : self._status + STATUS.size])

    async def _watch_budget(self) -> None:
        """Kill the worker when one decode has run past the budget: a process can be stopped
        where a thread cannot (its C decoder never returns to Python), and is replaced."""
        interval = min(0.25, self._decode_timeout_s / 4)
        seen, since = self._decoding(), time.monotonic()
        while self._proc.returncode is None:
            await asyncio.sleep(interval)
            now, current = time.monotonic(), self._decoding()
            if current != seen:
                seen, since = current, now
            elif current[0] and now - since > self._decode_timeout_s:
                self._over_budget = current[0] - 1
                log.warning(
                    "an image took longer than the %gs decode budget: killing its decoder process",
                    self._decode_timeout_s,
                )
                self._proc.kill()
                return

    def load(self) -> int:
        return len(self._pending)

    def has_room(self, download: bool) -> bool:
        return bool(self._free[download])

    async def submit(self, job: int, name: str, *, data: bytes = b"", url: str = "") -> Any:
        assert self._proc.stdin is not None
        if not self._free[bool(url)]:  # only after a requeue: wait for this worker's next reply
            raise _Requeue()
        slot = self._free[bool(url)].pop()
        if not url:
            start = slot * self._image_slot_bytes
            self._images[start : start + len(data)] = data
        encoded_url, encoded_name = url.encode("utf-8", "replace"), name.encode("utf-8", "replace")
        future = asyncio.get_running_loop().create_future()
        self._pending[slot] = future
        self._proc.stdin.write(
            REQUEST.pack(slot, job, len(encoded_url), len(data), len(encoded_name)) + encoded_url + encoded_name
        )
        return await future  # a cancelled caller cancels the future; its reply is dropped

    async def _read(self) -> None:
        stdout = self._proc.stdout
        assert stdout is not None
        try:
            while True:
                slot, size, count = REPLY.unpack(await stdout.readexactly(REPLY.size))
                sizes = [SIZE.unpack(await stdout.readexactly(SIZE.size))[0] for _ in range(count)]
                payload = await stdout.readexactly(size)
                future = self._pending.pop(slot)
                offset = slot * RESULT_SLOT_BYTES
                buffers = []
                with memoryview(self._results) as results:
                    for length in sizes:  # copied out (once): the slot takes the worker's next result
                        buffers.append(bytearray(results[offset : offset + length]))
                        offset += length
                self._free[slot >= UPLOAD_SLOTS].append(slot)
                ok, value, fetched = pickle.loads(payload, buffers=buffers)
                replay(fetched, self._events)
                if future.done():
                    continue
                if ok:
                    future.set_result(value)
                else:
                    kind, message, download_failed = value
                    future.set_exception((FetchError if download_failed else ItemError)(ErrorKind[kind], message))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        code = await self._proc.wait()
        # The item being decoded fails (it may be what killed the worker); the others, waiting
        # or downloading, go to another worker.
        culprit = self._decoding()[0] - 1
        for slot, future in self._pending.items():
            if future.done():
                continue
            if slot == self._over_budget:
                future.set_exception(
                    ItemError(
                        ErrorKind.INVALID_INPUT,
                        (
                            "decoding this image took longer than the "
                            f"{self._decode_timeout_s:g}s budget (--decode-timeout-s)"
                        ),
                    )
                )
            elif slot == culprit:
                future.set_exception(
                    ItemError(
                        ErrorKind.INTERNAL,
                        f"the image decoder process died while decoding this image (exit code {code})",
                    )
                )
            else:
                future.set_exception(_Requeue())
        self._pending.clear()
        self._on_exit(self, code)

    async def close(self) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.close()  # end of input: the worker exits
        try:
            await asyncio.wait_for(self._proc.wait(), 5)
        except asyncio.TimeoutError:
            self._proc.kill()
        await self._reader
        if self._watch is not None:
            self._watch.cancel()
