"""Where images are decoded and preprocessed: threads of this process, or worker processes.

Threads start at once and hand their result over without a copy, but they share this process's
GIL with the event loop: every time PIL or torch gives the GIL back and wants it again, a busy
loop can keep it for up to the 5 ms switch interval, and numpy's view of a PIL image is built
while holding it. That is fine for a few cores and stops scaling long before 16 (see the
README's "How it is fast"). Worker processes (``--decode-pool processes``) each have their own
GIL; this process only copies the image bytes into memory it shares with the worker and the
preprocessed uint8 crop out of it, on the event loop, with no thread hop.

One pool serves every model of the server: each model's preprocessing is a ``DecodeJob``, and
each request names the job (``decoder.for_job(i)`` gives a model its own view).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import mmap
import os
import pickle
import struct
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from PIL import Image

from .config import ServerConfig
from .decode import decode_image, decode_rgb_tensor, open_image, torchvision_decodes_exactly
from .errors import ErrorKind, ItemError
from .model import EmbeddingModel

log = logging.getLogger(__name__)

# Above this many decode workers, "auto" picks processes. Threads hold the GIL for ~1.9 ms of
# each photo and stall behind a busy event loop: as good as processes on 2 cores (measured),
# a ceiling of a few hundred images/s on many (README, "Decoding on every core").
AUTO_PROCESSES_ABOVE = 4

_JPEG_MAGIC = b"\xff\xd8\xff"


@dataclass(frozen=True)
class DecodeJob:
    """Bytes -> model input, for one image. Picklable: worker processes get it at start."""

    preprocess: Callable[[Image.Image], Any]
    max_pixels: int
    draft_size: tuple[int, int] | None = None  # --jpeg-draft: the model's input size

    @property
    def _decodes_to_tensor(self) -> bool:
        return hasattr(self.preprocess, "from_chw") and self.draft_size is None

    def warm(self) -> None:
        """What the first image would pay for otherwise: checking torchvision's decoders."""
        if self._decodes_to_tensor:
            torchvision_decodes_exactly()

    def __call__(self, data: bytes, name: str) -> Any:
        if self._decodes_to_tensor:  # the exact pipeline takes a decoded tensor: skip PIL
            chw = decode_rgb_tensor(data, max_pixels=self.max_pixels, name=name)
            if chw is not None:
                return self.preprocess.from_chw(chw)  # type: ignore[attr-defined]
        image = decode_image(data, max_pixels=self.max_pixels, name=name, draft_size=self.draft_size)
        try:
            return self.preprocess(image)
        except Exception as exc:
            raise ItemError(ErrorKind.INVALID_INPUT, f"{name}: the model's image processor rejected it: {exc}") from exc


class Decoder(Protocol):
    async def start(self) -> None: ...

    async def decode(self, data: bytes, name: str, job: int = 0) -> Any: ...

    async def close(self) -> None: ...

    def for_job(self, job: int) -> JobDecoder: ...


@dataclass(frozen=True)
class JobDecoder:
    """One model's view of the shared pool: its images, its preprocessing."""

    pool: Decoder
    job: int

    async def decode(self, data: bytes, name: str) -> Any:
        return await self.pool.decode(data, name, self.job)


def build_decoder(models: Sequence[EmbeddingModel], config: ServerConfig) -> Decoder:
    """One pool for ``models``; model i's images go through job i."""
    jobs = [DecodeJob(m.image_preprocessor(), config.max_image_pixels, m.decode_size if config.jpeg_draft else None) for m in models]
    workers = config.resolved_decode_workers
    if config.gpu_decode:
        # nvJPEG leaves little CPU work per image, and the CUDA context lives in this process.
        return ThreadDecoder(jobs, workers, on_device=[m.device_jpeg_decoder() for m in models])
    if config.decode_pool == "processes" or (config.decode_pool == "auto" and workers > AUTO_PROCESSES_ABOVE):
        return ProcessDecoder(jobs, workers, max_image_bytes=config.max_image_bytes)
    return ThreadDecoder(jobs, workers)


def _jobs(jobs: DecodeJob | Sequence[DecodeJob]) -> list[DecodeJob]:
    return [jobs] if isinstance(jobs, DecodeJob) else list(jobs)


def _set_torch_threads(torch: Any, threads: int) -> None:
    """This thread's intra-op threads, for good. Torch sets a thread's count lazily, at its first
    op, from the count the process set last, unless that first look already happened: so look
    first (``get_num_threads``), then set. Otherwise whichever thread set a count between this
    call and this thread's first op would decide it (seen: the model thread's tokenizer running
    while decode threads started, then every forward pass on one core, in some runs only)."""
    torch.get_num_threads()
    torch.set_num_threads(threads)


def name_os_thread(name: str) -> None:
    """Give this thread ``name`` (15 bytes at most) in the OS, as Python before 3.14 does not:
    `top -H`, py-spy and the feed benchmark's CPU split then tell the model thread and the decode
    threads apart. Linux only; elsewhere a no-op."""
    if sys.platform != "linux":
        return
    import ctypes

    try:
        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def _decode_thread_setup() -> None:
    name_os_thread("clipserve-decod")
    _single_threaded_torch()


def _single_threaded_torch() -> None:
    """Torch's per-image ops in a decode worker run on one intra-op thread: N workers times the
    default one thread per core would oversubscribe the cores. Each thread keeps its own count
    (OpenMP), but torch starts every thread created afterwards with the last one set: the model
    thread sets its own back (``model_thread_setup``)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        _set_torch_threads(torch, 1)


def model_thread_setup() -> Callable[[], None]:
    """An initializer for the model thread that gives it the intra-op threads this process has
    now (call it before any decode thread starts). Without it, a model thread started after a
    decode thread would run every forward pass on one core (measured: half the images/s of a
    compiled ViT-B/32 on two cores)."""
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else 0

    def setup() -> None:
        name_os_thread("clipserve-model")
        if torch is not None and threads:
            _set_torch_threads(torch, threads)

    return setup


class ThreadDecoder:
    def __init__(
        self, jobs: DecodeJob | Sequence[DecodeJob], workers: int, *, on_device: Callable[[bytes], Any] | Sequence[Callable[[bytes], Any]] | None = None
    ) -> None:
        self._jobs = _jobs(jobs)
        self._on_device = [on_device] if callable(on_device) else list(on_device or [None] * len(self._jobs))
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="clipserve-decode", initializer=_decode_thread_setup)

    def for_job(self, job: int) -> JobDecoder:
        return JobDecoder(self, job)

    async def start(self) -> None:
        for job in self._jobs:
            await asyncio.get_running_loop().run_in_executor(self._pool, job.warm)

    async def decode(self, data: bytes, name: str, job: int = 0) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._decode, data, name, job)

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _decode(self, data: bytes, name: str, job: int) -> Any:
        on_device = self._on_device[job]
        if on_device is not None and data.startswith(_JPEG_MAGIC):
            header = open_image(data, max_pixels=self._jobs[job].max_pixels, name=name)  # the limits hold here too
            if header.mode in ("RGB", "L"):  # CMYK and friends: the CPU decodes them exactly
                try:
                    return on_device(data)
                except RuntimeError as exc:  # a JPEG that nvJPEG does not take: the CPU path decodes it
                    log.debug("%s: nvJPEG refused it (%s); decoding on the CPU", name, exc)
        return self._jobs[job](data, name)


# -- worker processes -----------------------------------------------------------------------------
#
# Each worker shares two memory files with this process (memfd: no /dev/shm, whose 64 MiB in a
# default container would not do): one holding the image bytes of each of its in-flight items,
# one for each item's result. Only small headers cross the worker's stdin and stdout, so this
# process spends a memcpy of the image and of the result per item instead of pushing them
# through pipes (measured: ~0.8 ms of this process's CPU per photo with pipes).

_REQUEST = struct.Struct("<IIII")  # slot, job, image bytes, name bytes; then the name
_REPLY = struct.Struct("<II")  # pickle bytes, out-of-band buffers; then their sizes, then the pickle
_BUFFER = struct.Struct("<Q")  # the size of each out-of-band buffer, in the slot one after another
_IN_FLIGHT_PER_WORKER = 2  # one being decoded, the next already waiting: never idle between two
_RESULT_SLOT_BYTES = 32 << 20  # float32 pixel_values up to 3x1600x1600; larger results go in the pipe
_SERVER_ROOT = str(Path(__file__).resolve().parent.parent)  # so that a worker imports this very package


class _Requeue(Exception):
    """The worker died with this item still waiting: give it to another."""


class ProcessDecoder:
    def __init__(self, jobs: DecodeJob | Sequence[DecodeJob], workers: int, *, max_image_bytes: int) -> None:
        self._jobs = pickle.dumps(_jobs(jobs), protocol=pickle.HIGHEST_PROTOCOL)
        self._size = workers
        self._image_slot_bytes = max_image_bytes
        self._workers: list[_Worker] = []
        self._room = asyncio.Semaphore(workers * _IN_FLIGHT_PER_WORKER)
        self._replacing: set[asyncio.Task] = set()
        self._closing = False

    async def start(self) -> None:
        self._workers = list(await asyncio.gather(*(self._spawn() for _ in range(self._size))))
        log.info("decoding images in %d worker processes", self._size)

    def for_job(self, job: int) -> JobDecoder:
        return JobDecoder(self, job)

    async def decode(self, data: bytes, name: str, job: int = 0) -> Any:
        if len(data) > self._image_slot_bytes:  # the engine never sends one; a slot would not hold it
            raise ItemError(ErrorKind.INVALID_INPUT, f"{name}: over the {self._image_slot_bytes}-byte image limit")
        async with self._room:
            while True:
                if not self._workers and self._replacing:
                    await asyncio.wait(self._replacing)
                if not self._workers:
                    raise ItemError(ErrorKind.UNAVAILABLE, "no image decoder process is running")
                worker = min(self._workers, key=_Worker.load)
                try:
                    return await worker.submit(data, name, job)
                except _Requeue:
                    continue

    async def close(self) -> None:
        self._closing = True
        await asyncio.gather(*self._replacing, return_exceptions=True)  # then they are in _workers
        await asyncio.gather(*(worker.close() for worker in self._workers))

    async def _spawn(self) -> _Worker:
        images = _SharedFile("clipserve-images", _IN_FLIGHT_PER_WORKER * self._image_slot_bytes)
        results = _SharedFile("clipserve-results", _IN_FLIGHT_PER_WORKER * _RESULT_SLOT_BYTES)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, (_SERVER_ROOT, os.environ.get("PYTHONPATH"))))}
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", __name__, str(images.fd), str(self._image_slot_bytes), str(results.fd), str(_RESULT_SLOT_BYTES),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env, pass_fds=(images.fd, results.fd),
            )
        finally:
            images.close_fd()  # the worker has its own copies; the mappings stay
            results.close_fd()
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(_BUFFER.pack(len(self._jobs)) + self._jobs)
        try:
            await proc.stdout.readexactly(1)  # ready
        except asyncio.IncompleteReadError:
            raise RuntimeError(f"an image decoder process failed to start (exit code {await proc.wait()}); its error is above") from None
        return _Worker(proc, images.map, self._image_slot_bytes, results.map, self._lost)

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
    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        images: mmap.mmap,
        image_slot_bytes: int,
        results: mmap.mmap,
        on_exit: Callable[[_Worker, int | None], None],
    ) -> None:
        self._proc = proc
        self._images = images
        self._image_slot_bytes = image_slot_bytes
        self._results = results
        self._on_exit = on_exit
        self._free_slots = list(range(_IN_FLIGHT_PER_WORKER))
        self._pending: collections.deque[tuple[int, asyncio.Future]] = collections.deque()  # in the order sent
        self._reader = asyncio.ensure_future(self._read())

    def load(self) -> int:
        return len(self._pending)

    async def submit(self, data: bytes, name: str, job: int) -> Any:
        assert self._proc.stdin is not None
        if not self._free_slots:  # only after a requeue: wait for this worker's next reply
            raise _Requeue()
        slot = self._free_slots.pop()
        start = slot * self._image_slot_bytes
        self._images[start : start + len(data)] = data
        encoded_name = name.encode("utf-8", "replace")
        future = asyncio.get_running_loop().create_future()
        self._pending.append((slot, future))
        self._proc.stdin.write(_REQUEST.pack(slot, job, len(data), len(encoded_name)) + encoded_name)
        return await future  # a cancelled caller cancels the future; its reply is dropped

    async def _read(self) -> None:
        stdout = self._proc.stdout
        assert stdout is not None
        try:
            while True:
                size, count = _REPLY.unpack(await stdout.readexactly(_REPLY.size))
                sizes = [_BUFFER.unpack(await stdout.readexactly(_BUFFER.size))[0] for _ in range(count)]
                payload = await stdout.readexactly(size)
                slot, future = self._pending.popleft()
                offset = slot * _RESULT_SLOT_BYTES
                buffers = []
                for length in sizes:  # copied out: the slot takes the worker's next result
                    buffers.append(bytearray(self._results[offset : offset + length]))
                    offset += length
                self._free_slots.append(slot)
                if future.done():
                    continue
                ok, value = pickle.loads(payload, buffers=buffers)
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(ItemError(ErrorKind[value[0]], value[1]))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        code = await self._proc.wait()
        if self._pending:  # the first was being decoded; the others only waited
            _, first = self._pending.popleft()
            if not first.done():
                first.set_exception(ItemError(ErrorKind.INTERNAL, f"the image decoder process died while decoding this image (exit code {code})"))
        for _, future in self._pending:
            if not future.done():
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


def _serve(requests: BinaryIO, replies: BinaryIO, images: mmap.mmap, image_slot_bytes: int, results: mmap.mmap, result_slot_bytes: int) -> None:
    """A worker process's loop: one image in, one reply out, until the server closes the pipe."""
    import numpy as np

    def read(size: int) -> bytes:
        data = requests.read(size)
        if len(data) != size:
            raise EOFError
        return data

    def reply(slot: int, ok: bool, value: Any) -> None:
        if isinstance(value, np.ndarray):
            value = np.ascontiguousarray(value)  # a strided view would be pickled in-band
        buffers: list[pickle.PickleBuffer] = []
        payload = pickle.dumps((ok, value), protocol=5, buffer_callback=buffers.append)
        raw = [buffer.raw() for buffer in buffers]
        if sum(view.nbytes for view in raw) > result_slot_bytes:
            payload, raw = pickle.dumps((ok, value), protocol=5), []
        offset = slot * result_slot_bytes
        for view in raw:
            results[offset : offset + view.nbytes] = view
            offset += view.nbytes
        replies.write(_REPLY.pack(len(payload), len(raw)) + b"".join(_BUFFER.pack(view.nbytes) for view in raw) + payload)
        replies.flush()

    jobs: list[DecodeJob] = pickle.loads(read(_BUFFER.unpack(read(_BUFFER.size))[0]))
    _single_threaded_torch()
    for job in jobs:
        job.warm()
    replies.write(b"R")  # ready
    replies.flush()
    try:
        while True:
            slot, job, size, name_size = _REQUEST.unpack(read(_REQUEST.size))
            name = read(name_size).decode("utf-8")
            start = slot * image_slot_bytes
            data = images[start : start + size]
            try:
                reply(slot, True, jobs[job](data, name))
            except ItemError as exc:
                reply(slot, False, (exc.kind.name, exc.message))
            except Exception as exc:  # a bug: this image fails, the worker goes on
                reply(slot, False, (ErrorKind.INTERNAL.name, f"{name}: decoding failed: {type(exc).__name__}: {exc}"))
    except EOFError:
        return


def main() -> None:
    """``python -m clipserve_server.decode_pool IMAGES_FD IMAGE_SLOT_BYTES RESULTS_FD RESULT_SLOT_BYTES``"""
    # Replies go out on a private copy of stdout; fd 1 itself now points at stderr, so that a
    # stray print (from Python or a C library) lands in the log instead of corrupting a reply.
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    images_fd, image_slot_bytes, results_fd, result_slot_bytes = (int(arg) for arg in sys.argv[1:5])
    images = mmap.mmap(images_fd, _IN_FLIGHT_PER_WORKER * image_slot_bytes)
    results = mmap.mmap(results_fd, _IN_FLIGHT_PER_WORKER * result_slot_bytes)
    _serve(sys.stdin.buffer, replies, images, image_slot_bytes, results, result_slot_bytes)


if __name__ == "__main__":
    main()
