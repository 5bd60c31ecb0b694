"""Image preprocessing that gives bit-for-bit the stock processor's ``pixel_values``, cheaper.

The stock way (``processor(images=[pil_image])``) spends more CPU than decoding the image: the
torchvision-backed processor copies an RGB image that is already RGB, builds a numpy array
through ``tobytes``, makes it contiguous channels-first (a strided copy), and resizes that
layout, which torch's uint8 kernels handle at half the speed of channels-last. Here the decoded
image goes in as a zero-copy channels-last view and the processor's own ``resize`` and
``center_crop`` run on it: ~2 ms instead of ~9.5 ms per photo. The result is the cropped image
in uint8 (a quarter of the float32 bytes to queue, ship between processes and copy to the
GPU); ``normalize`` turns a batch of them into ``pixel_values`` on the model's device, with the
processor's own ``rescale_and_normalize``.

That split mirrors ``TorchvisionBackend._preprocess`` (resize, crop, then rescale+normalize), so
it is used only for processors that keep that method, and only once a self-check on probe
images of awkward sizes has shown it bit-identical to the stock call; any other processor runs
the stock way (``StockPipeline``).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

# np.asarray(image) is read-only (PIL hands numpy a bytes object) and torch.from_numpy warns
# about it once per process; nothing here ever writes to that tensor.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)

# (width, height): wide, tall, tiny, exact-size and odd-sized images, where rounding differs.
_PROBE_SIZES = ((1, 1), (640, 480), (479, 641), (224, 224), (1000, 3), (3, 1000), (301, 199))


class StockPipeline:
    """The image processor called the stock way; ``pixel_values`` come out ready (float32)."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, image: Image.Image) -> np.ndarray:
        return self.processor(images=[image], return_tensors="pt")["pixel_values"][0].numpy()

    def on_device(self, chw: Any) -> Any:
        return self.processor(images=[chw], return_tensors="pt", device=chw.device)["pixel_values"][0]

    def normalize(self, batch: Any) -> Any:
        return batch

    @property
    def decode_size(self) -> tuple[int, int] | None:
        return _decode_size(self.processor)


class TorchvisionPipeline(StockPipeline):
    """Resize and crop in uint8 on a channels-last view; normalize later, per batch."""

    def __call__(self, image: Image.Image) -> np.ndarray:
        import torch

        if image.info.get("transparency") is not None or image.mode != "RGB":
            # Transparency info survives convert("RGB") (palette and tRNS PNGs, GIFs), and how
            # it is treated depends on the transformers version: the processor's own conversion
            # decides. (Rare: a contiguous copy and a slower resize.)
            chw = self.processor.process_image(image, do_convert_rgb=self.processor.do_convert_rgb)
        else:
            chw = torch.from_numpy(np.asarray(image)).permute(2, 0, 1)
        return self.resize_and_crop(chw).numpy()

    def on_device(self, chw: Any) -> Any:
        return self.resize_and_crop(chw)

    def resize_and_crop(self, chw: Any) -> Any:
        p = self.processor
        if p.do_resize:
            chw = p.resize(chw, size=p.size, resample=p.resample)
        if p.do_center_crop:
            chw = p.center_crop(chw, p.crop_size)
        return chw

    def normalize(self, batch: Any) -> Any:
        """uint8 (N, 3, H, W) on any device -> the processor's float32 ``pixel_values``."""
        p = self.processor
        return p.rescale_and_normalize(batch, p.do_rescale, p.rescale_factor, p.do_normalize, p.image_mean, p.image_std)


def build_pipeline(processor: Any) -> StockPipeline:
    """The fastest pipeline that reproduces ``processor`` exactly (see the module docstring)."""
    try:
        from transformers.image_processing_backends import TorchvisionBackend
    except ImportError:  # transformers without the backend split: the stock way
        return StockPipeline(processor)
    kind = type(processor)
    standard = (
        isinstance(processor, TorchvisionBackend)
        and kind._preprocess is TorchvisionBackend._preprocess
        and kind.process_image is TorchvisionBackend.process_image
        and not getattr(processor, "do_pad", False)
    )
    if not standard:
        log.info("%s has its own preprocessing: using it the stock way", kind.__name__)
        return StockPipeline(processor)
    fast = TorchvisionPipeline(processor)
    try:
        mismatch = _first_mismatch(fast, StockPipeline(processor))
    except Exception as exc:  # an API this version lacks, say
        mismatch = f"{type(exc).__name__}: {exc}"
    if mismatch:
        log.warning("the fast image pipeline differs from %s (%s): using it the stock way", kind.__name__, mismatch)
        return StockPipeline(processor)
    return fast


def _first_mismatch(fast: TorchvisionPipeline, stock: StockPipeline) -> str:
    import torch

    rng = np.random.default_rng(0)
    for width, height in _PROBE_SIZES:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
        expected = torch.from_numpy(stock(image))
        got = fast.normalize(torch.from_numpy(fast(image)).unsqueeze(0))[0]
        if got.shape != expected.shape or not torch.equal(got, expected):
            return f"probe image {width}x{height}"
    return ""


def _decode_size(processor: Any) -> tuple[int, int] | None:
    """(width, height) that a decoded image must keep so that the processor still resizes it
    down to its target: the target on both sides. None where the processor does not say."""
    size = processor.size if getattr(processor, "do_resize", False) else None
    if not size:
        return None
    if size.get("shortest_edge"):
        return int(size["shortest_edge"]), int(size["shortest_edge"])
    if size.get("height") and size.get("width"):
        return int(size["width"]), int(size["height"])
    return None
