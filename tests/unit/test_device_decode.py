"""``--gpu-decode`` in batches, as far as a CPU can tell: the decode pool's one-image requests
become batched calls, and torchvision's list decode (the same call nvJPEG gets on CUDA) gives
what one-by-one decoding gives, a bad file costing only itself."""

from __future__ import annotations

import asyncio
import io
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from PIL import Image

from clipserve_server.images.decode_pool import ThreadDecoder
from clipserve_server.images.decode_protocol import DecodeJob
from clipserve_server.images.device_decode import DeviceBatches, jpeg_batch_decoder

from ..helpers import make_image


def jpeg(width: int = 64, height: int = 48, seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(make_image(width, height, seed=seed))).convert("RGB").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


class HeldDevice:
    """A batched decode whose first call waits for ``release``, so that a test can queue
    images while one batch runs; answers each file with its length."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.calls: list[int] = []

    def __call__(self, files: list[bytes]) -> list[object]:
        self.calls.append(len(files))
        self.started.set()
        assert self.release.wait(20)
        return [len(f) for f in files]


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 60))


def test_images_that_arrive_while_a_batch_decodes_make_up_the_next_batches_each_answered_with_its_own():
    """One image starts a batch at once; nine queued behind it go as batches of at most four
    (the cap), and every caller gets the result for its own file."""
    device = HeldDevice()

    async def main():
        with ThreadPoolExecutor(1) as pool:
            batches = DeviceBatches(device, pool, max_batch=4)
            first = asyncio.ensure_future(batches.decode(b"x"))
            await asyncio.get_running_loop().run_in_executor(None, device.started.wait, 20)
            rest = [asyncio.ensure_future(batches.decode(b"y" * n)) for n in range(2, 11)]
            await asyncio.sleep(0)  # one turn of the loop: each new task queues its file
            assert len(batches._waiting) == len(rest)
            device.release.set()
            return await first, await asyncio.gather(*rest), batches.batches

    first, rest, sizes = run(main())
    assert first == 1 and rest == list(range(2, 11))
    assert sizes == device.calls == [1, 4, 4, 1]


def test_the_list_decode_equals_one_by_one_and_a_bad_file_costs_only_itself():
    """torchvision's list form of decode_jpeg (on CPU here; nvJPEG on CUDA): a corrupt file in
    the list makes the batched call fail, then each file is decoded on its own and the bad one
    comes back refused (the pool decodes it on the CPU, or fails it there)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    files = [jpeg(seed=1), b"\xff\xd8\xff" + b"not a jpeg at all", jpeg(80, 60, seed=2)]
    resized = jpeg_batch_decoder(lambda chw: chw[:, :16, :16], "cpu")(files)
    assert isinstance(resized[1], RuntimeError)
    for data, got in zip([files[0], files[2]], [resized[0], resized[2]]):
        alone = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        assert torch.equal(got, alone[:, :16, :16])
    good = jpeg_batch_decoder(lambda chw: chw, "cpu")([files[0], files[2]])
    assert [tuple(t.shape) for t in good] == [(3, 48, 64), (3, 60, 80)]


def test_a_jpeg_the_batch_refuses_goes_to_the_cpu_and_the_others_stay_on_the_device():
    """Through the decode pool: the refused file is decoded exactly on the CPU, the rest come
    from the device, in one batched call."""
    seen: list[int] = []

    def device(files: list[bytes]) -> list[object]:
        seen.append(len(files))
        return [RuntimeError("nvjpeg: unsupported") if data == refused else "on the device" for data in files]

    refused = jpeg(seed=9)
    files = [jpeg(seed=i) for i in range(3)] + [refused]

    async def main():
        decoder = ThreadDecoder(
            [DecodeJob(lambda image: "on the CPU", max_pixels=10**6)], 1, on_device=[device], max_device_batch=64
        )
        try:
            return await asyncio.gather(*(decoder.decode(data, f"img{i}") for i, data in enumerate(files)))
        finally:
            await decoder.close()

    assert run(main()) == ["on the device"] * 3 + ["on the CPU"]
    assert sum(seen) == 4


@pytest.mark.parametrize("broken", [True, False], ids=["device fails", "device answers"])
def test_a_device_that_fails_as_a_whole_leaves_every_image_to_the_cpu(broken):
    def device(files: list[bytes]) -> list[object]:
        if broken:
            raise OSError("the device is gone")
        return ["on the device"] * len(files)

    async def main():
        decoder = ThreadDecoder(
            [DecodeJob(lambda image: "on the CPU", max_pixels=10**6)], 1, on_device=[device], max_device_batch=64
        )
        try:
            return await asyncio.gather(*(decoder.decode(jpeg(seed=i), f"img{i}") for i in range(3)))
        finally:
            await decoder.close()

    assert run(main()) == ["on the CPU" if broken else "on the device"] * 3
