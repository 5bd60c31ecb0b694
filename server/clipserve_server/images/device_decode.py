"""``--gpu-decode``: JPEGs decoded a batch at a time on the model's device.

nvJPEG decodes a list of JPEGs in one call (torchvision's ``decode_jpeg`` on a list, with
``device="cuda"``) much faster than one by one, and leaves the CPU almost nothing per photo:
16 cores decoding ~12 ms per photo top out near 1300 images/s, a third of what ViT-B/32 takes
on an H200. ``DeviceBatches`` turns the decode pool's one-image requests into such calls: the
first JPEG starts a batch at once, and those that arrive while it runs make up the next one
(no delay is added; under load batches grow by themselves). Each image is then resized and
cropped on the device by the model's pipeline (``on_device``); the result stays there for the
forward pass. Not bit-exact: nvJPEG's IDCT and upsampling differ from libjpeg's (the drift is
measured by gpu_check).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

# Decodes a list of JPEG files; for each, its result or the RuntimeError that refused it.
BatchDecodeFn = Callable[[list[bytes]], list[Any]]


def jpeg_batch_decoder(on_device: Callable[[Any], Any], device: Any) -> BatchDecodeFn:
    """A ``BatchDecodeFn`` for ``device`` (CUDA; any device torchvision decodes on, for tests):
    one ``decode_jpeg`` call for the whole list, then ``on_device`` (resize and crop) per image.
    A file that the batched call cannot take makes it fail as a whole: then each is decoded on
    its own, so that one bad file costs only itself (the caller decodes it on the CPU)."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    def one(encoded: Any) -> Any:
        try:
            return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
        except RuntimeError as exc:
            return exc

    def decode(files: list[bytes]) -> list[Any]:
        encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in files]
        try:
            decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            decoded = [one(e) for e in encoded]
        return [chw if isinstance(chw, Exception) else on_device(chw) for chw in decoded]

    return decode


class DeviceBatches:
    """One image at a time in, batched decodes out; one batch runs at a time (torchvision keeps
    one nvJPEG decoder per device and serialises calls to it)."""

    def __init__(self, decode: BatchDecodeFn, executor: Executor, max_batch: int) -> None:
        self._decode = decode
        self._executor = executor
        self._max_batch = max_batch
        self._waiting: collections.deque[tuple[bytes, asyncio.Future]] = collections.deque()
        self._running: asyncio.Task | None = None
        self.batches: list[int] = []  # the size of each batch decoded (tests, benchmarks)

    async def decode(self, data: bytes) -> Any:
        """The decoded, preprocessed image; raises RuntimeError where the device refused it."""
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((data, future))
        if self._running is None or self._running.done():
            self._running = asyncio.ensure_future(self._drain())
        return await future

    def close(self) -> None:
        """Stop; what still waits is refused (the caller's CPU path then answers or fails)."""
        if self._running is not None:
            self._running.cancel()
        while self._waiting:
            _, future = self._waiting.popleft()
            if not future.done():
                future.set_exception(RuntimeError("the decode pool is closing"))

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._waiting:
            batch = [self._waiting.popleft() for _ in range(min(self._max_batch, len(self._waiting)))]
            batch = [(data, future) for data, future in batch if not future.done()]  # callers gone
            if not batch:
                continue
            self.batches.append(len(batch))
            try:
                results = await loop.run_in_executor(self._executor, self._decode, [data for data, _ in batch])
            except Exception as exc:  # the device failed as a whole: the CPU decodes these
                results = [RuntimeError(f"batched device decode failed: {type(exc).__name__}: {exc}")] * len(batch)
            for (_, future), result in zip(batch, results):
                if future.done():
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)
