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

The same split applies to open_clip's eval transform (a torchvision ``Compose`` of PIL resize and
crop, then ``ToTensor`` and ``Normalize``): ``build_transform_pipeline``. NaFlex processors
(SigLIP2's ``Siglip2ImageProcessor``) resize each image to its own patch grid and hand back
patches, their mask and the grid (``NaFlexPipeline``), run the stock way.

Every pipeline turns a batch of its per-image results into the keyword arguments of the
model's image features call (``inputs``).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

# np.asarray(image) is read-only (PIL hands numpy a bytes object), and a tensor made from it
# with torch.from_numpy would be writable memory that is not: what reaches torch here is a
# writable copy (np.array), one memcpy of the decoded image (~23 us for 640x480, against
# ~400 us for PIL's own tobytes behind np.asarray, measured on the 2-core box under load 14).

# (width, height): wide, tall, tiny, exact-size and odd-sized images, where rounding differs.
_PROBE_SIZES = ((1, 1), (640, 480), (479, 641), (224, 224), (1000, 3), (3, 1000), (301, 199))


class StockPipeline:
    """The image processor called the stock way; ``pixel_values`` come out ready (float32)."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, image: Image.Image) -> np.ndarray:
        return self.processor(images=[image], return_tensors="pt")["pixel_values"][0].numpy()

    def from_array(self, pixels: np.ndarray) -> Any:
        """The processor on a float32 (H, W, 3) array of values 0..255, as it is (the processor
        rescales and resizes floats as floats: not the same as on the rounded 8-bit image).
        Channels last, always: the processor would guess channels first for an image 1 or 3
        pixels high."""
        return self.processor(images=[pixels], return_tensors="pt", input_data_format="channels_last")["pixel_values"][
            0
        ].numpy()

    def on_device(self, chw: Any) -> Any:
        return self.processor(images=[chw], return_tensors="pt", device=chw.device)["pixel_values"][0]

    def normalize(self, batch: Any) -> Any:
        return batch

    def inputs(self, images: list[Any], device: Any) -> dict[str, Any]:
        """A batch of this pipeline's results (numpy arrays, or tensors already on ``device``)
        as the keyword arguments of the model's image features call."""
        return {"pixel_values": self.normalize(_stacked(images, device))}

    @property
    def decode_size(self) -> tuple[int, int] | None:
        return _decode_size(self.processor)


class NaFlexPipeline(StockPipeline):
    """SigLIP2 NaFlex: each image resized to its own grid of at most ``max_num_patches`` patches,
    padded to that many. Per image the processor's outputs (patches, their mask, the grid) come
    out with the same shapes whatever the image, so a batch simply stacks them."""

    def __call__(self, image: Image.Image) -> dict[str, np.ndarray]:  # type: ignore[override]
        return self._outputs(self.processor(images=[image], return_tensors="pt"))

    def from_array(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        return self._outputs(self.processor(images=[pixels], return_tensors="pt", input_data_format="channels_last"))

    def _outputs(self, out: Any) -> dict[str, np.ndarray]:
        return {name: out[name][0].numpy() for name in self.processor.model_input_names}

    def inputs(self, images: list[Any], device: Any) -> dict[str, Any]:
        return {name: _stacked([image[name] for image in images], device) for name in images[0]}

    @property
    def decode_size(self) -> tuple[int, int] | None:
        return None  # each image gets its own size: none is safe to decode below


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
            chw = torch.from_numpy(np.array(image)).permute(2, 0, 1)
        return self.from_chw(chw)

    def from_chw(self, chw: Any) -> np.ndarray:
        """The same, from an RGB image already decoded into a uint8 (3, H, W) tensor."""
        return self.resize_and_crop(chw).numpy()

    def from_array(self, pixels: np.ndarray) -> np.ndarray:
        """A float32 (H, W, 3) array resized and cropped as floats, which is what the processor
        does with one; the result is float32, and ``normalize`` treats a batch that mixes it
        with uint8 crops (stacked as float32) exactly as it treats each alone."""
        import torch

        return self.from_chw(torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)).permute(2, 0, 1))

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
    if "pixel_attention_mask" in getattr(processor, "model_input_names", ()):
        return NaFlexPipeline(processor)
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


class TransformPipeline:
    """A torchvision transform (open_clip's eval preprocessing) called the stock way: float32
    ``pixel_values`` (C, H, W) per image. ``size``: the transform's output (height, width)."""

    def __init__(self, transform: Any, size: tuple[int, int]) -> None:
        self.transform = transform
        self.size = size

    def __call__(self, image: Image.Image) -> np.ndarray:
        return self.transform(image).numpy()

    def from_array(self, pixels: np.ndarray) -> Any:
        # open_clip's transforms take PIL images: the array is rounded to 8 bits first.
        return self(pil_image(pixels))

    def normalize(self, batch: Any) -> Any:
        return batch

    def inputs(self, images: list[Any], device: Any) -> dict[str, Any]:
        return {"pixel_values": self.normalize(_stacked(images, device))}

    @property
    def decode_size(self) -> tuple[int, int] | None:
        # Resized so that the shortest (or longest) side, or both, reach the output size: an
        # image at least that large on both sides is only ever shrunk.
        return self.size[1], self.size[0]


class SplitTransformPipeline(TransformPipeline):
    """The transform's PIL steps (resize, crop) per image, giving uint8 (H, W, C); its
    ``ToTensor`` scaling and ``Normalize`` per batch, on the model's device, with the same
    elementwise operations in the same order (so the same float32 results)."""

    def __init__(self, transform: Any, size: tuple[int, int]) -> None:
        from torchvision.transforms import Compose

        super().__init__(transform, size)
        self.pil_steps = Compose(transform.transforms[:-2])
        self.normalize_step = transform.transforms[-1]

    def __call__(self, image: Image.Image) -> np.ndarray:
        return np.array(self.pil_steps(image))  # writable: see the note on np.asarray above

    def normalize(self, batch: Any) -> Any:
        """uint8 (N, H, W, C) on any device -> float32 (N, C, H, W), as ToTensor + Normalize."""
        import torch

        return self.normalize_step(batch.permute(0, 3, 1, 2).to(torch.float32).div(255))


def build_transform_pipeline(transform: Any, size: tuple[int, int]) -> TransformPipeline:
    """The split pipeline for a ``Compose(PIL steps..., ToTensor, Normalize)`` that passes the
    self-check, else the transform called the stock way."""
    from torchvision.transforms import Compose, Normalize, ToTensor

    stock = TransformPipeline(transform, size)
    steps = getattr(transform, "transforms", None)
    if not (
        isinstance(transform, Compose)
        and len(steps) > 2
        and isinstance(steps[-2], ToTensor)
        and isinstance(steps[-1], Normalize)
    ):
        log.info("the image transform is not PIL steps + ToTensor + Normalize: using it the stock way")
        return stock
    fast = SplitTransformPipeline(transform, size)
    try:
        mismatch = _first_mismatch(fast, stock)
    except Exception as exc:  # a PIL step that yields something other than an RGB image, say
        mismatch = f"{type(exc).__name__}: {exc}"
    if mismatch:
        log.warning("the fast image pipeline differs from the stock transform (%s): using it the stock way", mismatch)
        return stock
    return fast


def pil_image(pixels: np.ndarray) -> Image.Image:
    """A float (H, W, 3) array of RGB values 0..255 as an 8-bit PIL image (rounded, clipped)."""
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


def _stacked(arrays: list[Any], device: Any) -> Any:
    import torch

    if all(isinstance(array, np.ndarray) for array in arrays):
        # Stacked here, then one copy to the device: not one small host-to-GPU copy per image.
        return torch.from_numpy(np.stack(arrays)).to(device)
    return torch.stack(
        [torch.as_tensor(array, device=device) for array in arrays]
    )  # some already on the device (--gpu-decode)


def _first_mismatch(fast: Any, stock: Any) -> str:
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
