"""Decode pools: threads or worker processes, the same pixels either way; the GPU path's routing."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import torch

import clipserve
from clipserve_server.utils.config import ServerConfig
from clipserve_server.images.decode_pool import ProcessDecoder, ThreadDecoder, build_decoder
from clipserve_server.images.decode_protocol import DecodeJob
from clipserve_server.utils.errors import ErrorKind, ItemError
from clipserve_server.models.fake_model import FakeModel
from clipserve_server.images.fetch import FetchError, FetchSettings
from clipserve_server.images.fetch_events import FetchTally
from clipserve_server.utils.threads import model_thread_setup

from ..conftest import ServerProcess
from ..helpers import make_batcher, make_image

pytestmark = pytest.mark.cost(17)  # its CPU cost among the files (tests/conftest.py)


def run(coroutine):
    # A safety net against a hang, not a speed claim: starting three decoder processes took
    # over 120 s with two copies of the suite on this busy 2-core machine.
    return asyncio.run(asyncio.wait_for(coroutine, 280))


def jpeg(width: int = 64, height: int = 48, mode: str = "RGB") -> bytes:
    return make_image(width, height, seed=width, fmt="JPEG", mode=mode)


def test_decode_threads_run_torch_on_one_thread_each_and_leave_the_model_thread_alone():
    job = DecodeJob(lambda image: torch.get_num_threads(), max_pixels=10**6)
    threads_before = torch.get_num_threads()
    setup = model_thread_setup()  # as the server does, before any decode thread runs

    async def main():
        decoder = ThreadDecoder([job], 2)
        try:
            decoded = await asyncio.gather(*(decoder.decode(jpeg(), f"img{i}") for i in range(4)))
            # The model thread starts only now (its first batch), after the decode threads:
            # torch would start it with their one thread, had it not its own setup.
            batcher = make_batcher(
                lambda texts, images: (np.zeros((0, 1)), np.full((len(images), 1), torch.get_num_threads())),
                max_batch_size=1,
                max_delay_s=0.0,
                max_queue_size=1,
                thread_setup=setup,
            )
            batcher.start()
            try:
                return decoded, int((await batcher.encode_image(b"pixels", wait=True))[0])
            finally:
                await batcher.stop()
        finally:
            await decoder.close()

    decoded, model_threads = run(main())
    assert decoded == [1, 1, 1, 1]
    assert model_threads == threads_before and torch.get_num_threads() == threads_before


def test_a_decode_thread_that_starts_while_the_model_thread_prepares_its_first_batch_leaves_it_its_cores():
    """Torch gives a thread its intra-op count lazily, at its first op, from the count the
    process set last. The model thread is set up, then tokenizes its first batch; a decode
    thread starting just then sets one thread. The model thread keeps its own count all the
    same (before the fix, some benchmark runs did every forward pass on one core)."""
    threads_before = torch.get_num_threads()
    setup = model_thread_setup()
    set_up, decoder_ran = threading.Event(), threading.Event()

    def model_thread_init() -> None:
        setup()
        set_up.set()

    def forward(texts, images):
        decoder_ran.wait(60)  # the first batch is still being prepared: no torch op yet
        return np.zeros((0, 1)), np.full((len(images), 1), torch.get_num_threads())

    async def main():
        loop = asyncio.get_running_loop()
        batcher = make_batcher(
            forward, max_batch_size=1, max_delay_s=0.0, max_queue_size=1, thread_setup=model_thread_init
        )
        decoder = ThreadDecoder([DecodeJob(lambda image: torch.get_num_threads(), max_pixels=10**6)], 1)
        batcher.start()
        try:
            first_batch = asyncio.ensure_future(batcher.encode_image(b"pixels", wait=True))
            await loop.run_in_executor(None, set_up.wait, 60)
            decoded = await decoder.decode(jpeg(), "img")  # a decode thread starts now
            decoder_ran.set()
            return decoded, int((await first_batch)[0])
        finally:
            await batcher.stop()
            await decoder.close()

    assert run(main()) == (1, threads_before)


def test_worker_processes_give_the_same_pixels_and_errors_as_threads(tiny_checkpoint):
    from clipserve_server.models.clip_model import HFClipModel

    model = HFClipModel(str(tiny_checkpoint), device="cpu")
    job = DecodeJob(model.image_preprocessor(), max_pixels=10**6)
    images = [jpeg(64, 48), make_image(33, 77, seed=2), jpeg(300, 200, mode="CMYK")]
    bad = {
        b"not an image at all": "not a recognised image format",
        make_image(2000, 1000): "over the 1000000-pixel limit",
    }

    async def decode_all(decoder):
        await decoder.start()
        try:
            pixels = await asyncio.gather(*(decoder.decode(data, f"img{i}") for i, data in enumerate(images)))
            errors = await asyncio.gather(*(decoder.decode(data, "upload") for data in bad), return_exceptions=True)
            return pixels, errors
        finally:
            await decoder.close()

    by_thread, _ = run(decode_all(ThreadDecoder([job], 2)))
    by_process, errors = run(
        decode_all(
            ProcessDecoder(
                [job], 1, max_image_bytes=16 << 20, fetch=downloads(), events=FetchTally(), decode_timeout_s=0
            )
        )
    )
    for a, b in zip(by_thread, by_process):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    for error, words in zip(errors, bad.values()):
        assert isinstance(error, ItemError) and error.kind is ErrorKind.INVALID_INPUT
        assert error.message.startswith("upload: ") and words in error.message


CRASHY = textwrap.dedent(
    """
    import os

    def preprocess(image):
        if image.size == (1, 1):
            os._exit(3)  # a decoder crashing on one hostile image
        return image.size
    """
)


def test_a_worker_that_dies_fails_only_its_image_and_is_replaced(tmp_path, monkeypatch):
    (tmp_path / "crashy_preprocess.py").write_text(CRASHY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # the worker imports it to unpickle the job
    import crashy_preprocess

    job = DecodeJob(crashy_preprocess.preprocess, max_pixels=10**6)
    hostile, fine = make_image(1, 1), [make_image(10 + i, 10) for i in range(3)]

    async def main():
        decoder = ProcessDecoder(
            [job], 1, max_image_bytes=1 << 20, fetch=downloads(), events=FetchTally(), decode_timeout_s=0
        )
        await decoder.start()
        try:
            # All four go to the one worker: the hostile one first, the others wait behind it.
            results = await asyncio.gather(
                decoder.decode(hostile, "hostile.png"),
                *(decoder.decode(d, f"ok{i}") for i, d in enumerate(fine)),
                return_exceptions=True,
            )
            later = await decoder.decode(fine[0], "later")
            return results, later
        finally:
            await decoder.close()

    results, later = run(main())
    assert isinstance(results[0], ItemError) and results[0].kind is ErrorKind.INTERNAL and "died" in results[0].message
    assert results[1:] == [(10, 10), (11, 10), (12, 10)]
    assert later == (10, 10)


# -- worker processes download what they decode ------------------------------------------------------

def downloads(allow_private_networks: bool = True, concurrency: int = 8) -> FetchSettings:
    """The download settings the server hands its worker processes, from its config."""
    config = ServerConfig(
        fetch_timeout_s=20,
        max_image_bytes=1 << 20,
        max_redirects=3,
        allow_private_networks=allow_private_networks,
        fetch_concurrency=concurrency,
    )
    return FetchSettings.of(config)


def test_worker_processes_download_urls_with_the_servers_own_fetcher(image_host):
    # The stand-in model's preprocessing: what is tested is the download (the transformers
    # pipeline in a worker is the test above's; each worker that unpickles it imports
    # transformers and torchvision, ~7 s of this 2-core machine's CPU).
    job = DecodeJob(FakeModel().image_preprocessor(), max_pixels=10**6)
    names = ["photo0.png", "photo1.jpg", "photo2.jpg"]

    async def main():
        by_thread = ThreadDecoder([job], 1)
        public = ProcessDecoder(
            [job], 1, max_image_bytes=1 << 20, fetch=downloads(), events=FetchTally(), decode_timeout_s=0
        )
        guarded = ProcessDecoder(
            [job], 1, max_image_bytes=1 << 20, fetch=downloads(False), events=FetchTally(), decode_timeout_s=0
        )
        for decoder in (by_thread, public, guarded):
            await decoder.start()
        try:
            expected = [await by_thread.decode(image_host.images[n], n) for n in names]
            got = await asyncio.gather(*(public.fetch_and_decode(image_host.url(f"img/{n}"), n) for n in names))
            redirected = await public.fetch_and_decode(image_host.url("redirect/photo1.jpg"), "redirected")
            failures = await asyncio.gather(
                public.fetch_and_decode(image_host.url("status/404"), "missing"),
                public.fetch_and_decode(image_host.url("img/not-an-image.png"), "text"),
                guarded.fetch_and_decode(
                    image_host.url("img/photo0.png"), "loopback"
                ),  # 127.0.0.1 is no public address
                return_exceptions=True,
            )
            return expected, got, redirected, failures
        finally:
            for decoder in (by_thread, public, guarded):
                await decoder.close()

    expected, got, redirected, (missing, text, loopback) = run(main())
    assert got == expected and redirected == expected[1]  # the same decoded, preprocessed image as a thread gives
    assert (
        isinstance(missing, FetchError) and missing.kind is ErrorKind.NOT_FOUND
    )  # a download's failure, counted as one
    assert type(text) is ItemError and text.kind is ErrorKind.INVALID_INPUT and "not a recognised image" in text.message
    assert (
        isinstance(loopback, FetchError)
        and loopback.kind is ErrorKind.FORBIDDEN
        and "--allow-private-networks" in loopback.message
    )


@contextlib.asynccontextmanager
async def one_downloading_worker(job: DecodeJob, image_host):
    """One worker process that downloads; the image host's /gated/ URLs hang until the gate opens."""
    image_host.gate.clear()
    decoder = ProcessDecoder(
        [job], 1, max_image_bytes=1 << 20, fetch=downloads(concurrency=4), events=FetchTally(), decode_timeout_s=0
    )
    await decoder.start()
    try:
        yield decoder
    finally:
        image_host.gate.set()
        await decoder.close()


async def until_requested(image_host, path: str, before: int) -> None:
    """Until the image host has been asked for ``path`` again: the download is in flight."""
    deadline = time.monotonic() + 60  # a safety net only
    while image_host.hits.get(path, 0) <= before:
        assert time.monotonic() < deadline, f"{path} was never requested"
        await asyncio.sleep(0.01)


def test_a_slow_download_holds_no_decode_slot(image_host):
    """One worker: a download that does not finish leaves it decoding uploads and other URLs."""
    job = DecodeJob(FakeModel().image_preprocessor(), max_pixels=10**6)
    uploads = [make_image(10 + i, 10) for i in range(4)]

    async def main():
        async with one_downloading_worker(job, image_host) as decoder:
            before = image_host.hits.get("/gated/photo3.png", 0)
            stuck = asyncio.ensure_future(decoder.fetch_and_decode(image_host.url("gated/photo3.png"), "stuck"))
            await until_requested(image_host, "/gated/photo3.png", before)
            decoded = await asyncio.gather(*(decoder.decode(data, f"upload{i}") for i, data in enumerate(uploads)))
            fetched = await asyncio.gather(
                *(decoder.fetch_and_decode(image_host.url(f"img/photo{i}.jpg"), f"url{i}") for i in range(3))
            )
            waiting = not stuck.done()
            image_host.gate.set()
            return waiting, decoded, fetched, await stuck

    waiting, decoded, fetched, stuck = run(main())
    assert waiting
    assert decoded == [job(data, "") for data in uploads]
    assert fetched == [job(image_host.images[f"photo{i}.jpg"], "") for i in range(3)]
    assert stuck == job(image_host.images["photo3.png"], "")


def test_downloads_in_flight_when_a_worker_dies_go_to_its_replacement(tmp_path, monkeypatch, image_host):
    (tmp_path / "crashy_preprocess.py").write_text(CRASHY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    import crashy_preprocess

    job = DecodeJob(crashy_preprocess.preprocess, max_pixels=10**6)

    async def main():
        async with one_downloading_worker(job, image_host) as decoder:
            before = image_host.hits.get("/gated/photo2.png", 0)
            downloading = asyncio.ensure_future(
                decoder.fetch_and_decode(image_host.url("gated/photo2.png"), "downloading")
            )
            await until_requested(image_host, "/gated/photo2.png", before)
            hostile = await asyncio.gather(decoder.decode(make_image(1, 1), "hostile.png"), return_exceptions=True)
            image_host.gate.set()
            return hostile[0], await downloading

    hostile, downloaded = run(main())
    assert isinstance(hostile, ItemError) and hostile.kind is ErrorKind.INTERNAL and "died" in hostile.message
    assert downloaded == (54, 40)  # photo2.png, fetched again by the replacement worker


# -- which pool -------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("settings", "kind"),
    [
        ({"decode_workers": 2}, ThreadDecoder),
        ({"decode_workers": 4}, ThreadDecoder),
        ({"decode_workers": 16}, ProcessDecoder),
        ({"decode_workers": 2, "decode_pool": "processes"}, ProcessDecoder),
        ({"decode_workers": 16, "decode_pool": "threads"}, ThreadDecoder),
    ],
)
def test_auto_picks_worker_processes_only_where_threads_stop_scaling(settings, kind):
    async def main():
        return build_decoder([FakeModel()], ServerConfig(**settings), FetchTally())

    assert type(run(main())) is kind


# -- the GPU path, as far as a CPU can tell -------------------------------------------------------------

class FakeDevice:
    """Stands in for nvJPEG's batched decode: records what it was given; can refuse."""

    def __init__(self, refuse: bool = False) -> None:
        self.seen: list[bytes] = []
        self.refuse = refuse

    def __call__(self, files: list[bytes]) -> list[object]:
        self.seen.extend(files)
        return [RuntimeError("nvjpeg: unsupported JPEG") if self.refuse else "decoded on the device" for _ in files]


def decode_with(device: FakeDevice, data: bytes, max_pixels: int = 10**6):
    job = DecodeJob(lambda image: "decoded on the CPU", max_pixels=max_pixels)

    async def main():
        decoder = ThreadDecoder([job], 1, on_device=[device], max_device_batch=64)
        try:
            return await decoder.decode(data, "img")
        finally:
            await decoder.close()

    return run(main())


def test_gpu_decode_takes_rgb_and_grayscale_jpegs():
    device = FakeDevice()
    assert decode_with(device, jpeg()) == "decoded on the device"
    assert decode_with(device, jpeg(mode="L")) == "decoded on the device"
    assert len(device.seen) == 2


@pytest.mark.parametrize("data", [make_image(20, 20), jpeg(mode="CMYK")], ids=["png", "cmyk-jpeg"])
def test_everything_else_is_decoded_exactly_on_the_cpu(data):
    device = FakeDevice()
    assert decode_with(device, data) == "decoded on the CPU"
    assert device.seen == []


def test_a_jpeg_that_nvjpeg_refuses_is_decoded_on_the_cpu():
    assert decode_with(FakeDevice(refuse=True), jpeg()) == "decoded on the CPU"


def test_the_pixel_limit_holds_before_the_gpu_sees_the_file():
    device = FakeDevice()
    with pytest.raises(ItemError) as info:
        decode_with(device, jpeg(400, 300), max_pixels=100_000)
    assert info.value.kind is ErrorKind.INVALID_INPUT and "pixel limit" in info.value.message
    assert device.seen == []


def test_gpu_decode_refuses_clearly_without_cuda(tiny_checkpoint):
    from clipserve_server.models.clip_model import HFClipModel

    with pytest.raises(ValueError, match="needs --device cuda"):
        ServerConfig(gpu_decode=True, device="cpu")
    with pytest.raises(RuntimeError, match="use --device cuda"):
        HFClipModel(str(tiny_checkpoint), device="cpu").device_jpeg_decoder()
    served = subprocess.run(
        [
            sys.executable,
            "-m",
            "clipserve.cli",
            "serve",
            "--model",
            str(tiny_checkpoint),
            "--gpu-decode",
            "--device",
            "cpu",
            "--port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert served.returncode == 2 and "needs --device cuda" in served.stderr


# -- through a real server ----------------------------------------------------------------------------------

def test_a_server_decoding_in_worker_processes_scores_like_the_reference(tiny_checkpoint, image_host, reference):
    server = ServerProcess(
        [
            "--model",
            str(tiny_checkpoint),
            "--allow-private-networks",
            "--decode-pool",
            "processes",
            "--decode-workers",
            "1",
        ]
    )
    try:
        with clipserve.CLIP(server.address, timeout=60) as clip:
            inputs = [
                clipserve.SimilarityInput(q, image_host.url(f"img/photo{j}.{ext}"))
                for q in ("a dog", "a red car")
                for j in range(3)
                for ext in ("png", "jpg")
            ]
            results = clip.score_batch(inputs)
    finally:
        assert server.terminate() == 0, "".join(server.log)
    for x, r in zip(inputs, results):
        assert r.error is None
        assert r.score == pytest.approx(
            reference(x.query, image_host.images[x.image_url.rsplit("/", 1)[1]]), abs=reference.tolerance
        )
