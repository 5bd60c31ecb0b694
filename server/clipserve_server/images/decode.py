"""Decoding image files into RGB pixels, exactly as the reference adapter does.

The reference is PIL (open, first frame, convert to RGB). For the common files, 8-bit RGB
JPEGs and PNGs without transparency, ``decode_rgb_tensor`` has torchvision's libjpeg-turbo and
libpng decode straight into a tensor instead: the same pixels (checked once per process on
probe files, or not used), ~15% less CPU per photo, no PIL image to copy out through
``tobytes``, and the GIL let go for the whole decode.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import warnings
from collections.abc import Iterator
from typing import Any

from PIL import Image, UnidentifiedImageError

from ..utils.errors import ErrorKind, ItemError
from .geometry import DEFAULT_LIMITS, FORMATS, ImageLimits, check_before_open, check_jpeg_work, check_size

# Our own pixel limit applies (checked from the header); PIL's global one would only warn. Set
# once here: warnings.catch_warnings() per image would be slower and is not thread-safe.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

# torchvision 0.29 warns, at every call, that its decoders will move to TorchCodec. When they are
# gone, the import below fails and every image is decoded with PIL, as before.
warnings.filterwarnings(
    "ignore",
    message="The image decoding and encoding capabilities of TorchVision are deprecated",
    category=DeprecationWarning,
)

log = logging.getLogger(__name__)

Image.init()  # every plugin registered now: Image.open(formats=...) looks them up by name

_PNG_BIT_DEPTH = 24  # offset of IHDR's bit depth: 8-byte signature, chunk length and type, width, height


def decode_image(
    data: bytes,
    *,
    max_pixels: int,
    name: str,
    draft_size: tuple[int, int] | None = None,
    limits: ImageLimits = DEFAULT_LIMITS,
) -> Image.Image:
    """Open ``data``, take its first frame and convert it to RGB.

    Raises ItemError (INVALID_INPUT) for bytes that are not an image, truncated or corrupt
    files, and images over ``max_pixels`` or ``limits`` (checked from the header, before
    decoding, so a decompression bomb costs nothing: geometry.py).

    ``draft_size`` (width, height), JPEG only, is the opt-in inexact fast path: libjpeg decodes
    at 1/2, 1/4 or 1/8 scale (DCT scaling), the smallest scale that keeps both sides at or above
    ``draft_size``, so that the processor's resize still only ever shrinks the image.
    """
    with _decode_errors(name, max_pixels):
        image = open_image(data, max_pixels=max_pixels, name=name, limits=limits)
        if draft_size is not None and image.format == "JPEG":
            image.draft(None, draft_size)
        image.seek(0)  # animated / multi-frame files: the first frame
        image.load()
        # The reference adapter converts exactly like this (palette, CMYK, 16-bit, L, LA, RGBA...).
        return image if image.mode == "RGB" else image.convert("RGB")


def open_image(data: bytes, *, max_pixels: int, name: str, limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """Read only the header of ``data``: format, mode and size, with the limits checked (the
    sizes that some plugins act on while opening are checked before PIL sees the bytes)."""
    if not data:
        raise ItemError(ErrorKind.INVALID_INPUT, f"{name}: the image is empty (0 bytes)")
    check_before_open(data, max_pixels=max_pixels, limits=limits, name=name)
    with _decode_errors(name, max_pixels):
        image = Image.open(io.BytesIO(data), formats=FORMATS)
        check_size(*image.size, max_pixels=max_pixels, limits=limits, name=name)
        if image.format in ("JPEG", "MPO"):
            check_jpeg_work(data, *image.size, max_pixels=max_pixels, limits=limits, name=name)
        return image


@contextlib.contextmanager
def _decode_errors(name: str, max_pixels: int) -> Iterator[None]:
    """PIL's exceptions, as the caller's INVALID_INPUT with the image's name."""
    try:
        yield
    except ItemError:
        raise
    except UnidentifiedImageError:
        raise ItemError(
            ErrorKind.INVALID_INPUT, f"{name}: not a recognised image format (accepted: {', '.join(FORMATS)})"
        ) from None
    except Image.DecompressionBombError as exc:  # PIL's own, coarser guard fired first
        raise ItemError(ErrorKind.INVALID_INPUT, f"{name}: over the {max_pixels}-pixel limit ({exc})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ItemError(ErrorKind.INVALID_INPUT, f"{name}: corrupt or truncated image: {exc}") from None


def decode_rgb_tensor(data: bytes, *, max_pixels: int, name: str, limits: ImageLimits = DEFAULT_LIMITS) -> Any | None:
    """A plain 8-bit RGB JPEG or PNG's pixels as a uint8 (3, H, W) tensor, channels-last in
    memory, decoded by torchvision; None for any other file, or one torchvision refuses (PIL
    then decodes it, or says what is wrong with it). The header and the pixel limit are checked
    first, as in ``decode_image``."""
    header = open_image(data, max_pixels=max_pixels, name=name, limits=limits)
    plain_jpeg = header.format == "JPEG" and header.mode == "RGB"
    plain_png = (
        header.format == "PNG"
        and header.mode == "RGB"
        and "transparency" not in header.info
        and data[_PNG_BIT_DEPTH] == 8
    )
    if not (plain_jpeg or plain_png) or not torchvision_decodes_exactly():
        return None
    try:
        return _torchvision_rgb(data, jpeg=plain_jpeg)
    except RuntimeError:  # truncated, corrupt, or a JPEG coding torchvision's libjpeg lacks
        return None


def _torchvision_rgb(data: bytes, *, jpeg: bool) -> Any:
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg, decode_png

    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return (decode_jpeg if jpeg else decode_png)(encoded, mode=ImageReadMode.RGB)


@functools.lru_cache(maxsize=None)
def torchvision_decodes_exactly() -> bool:
    """Whether this process's torchvision decodes probe JPEGs (every chroma subsampling,
    progressive, odd sizes) and PNGs to exactly PIL's pixels: its libjpeg-turbo and libpng are
    not PIL's own copies."""
    try:
        import numpy as np
        from torchvision.io import decode_jpeg, decode_png  # noqa: F401 (present, or PIL does it all)
    except ImportError:
        return False
    rng = np.random.default_rng(0)
    probes = []
    for width, height in ((1, 1), (301, 199), (640, 480), (17, 1000)):
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
        for options in (
            {"format": "JPEG", "quality": 90},
            {"format": "JPEG", "quality": 95, "subsampling": 0},
            {"format": "JPEG", "subsampling": 1},
            {"format": "JPEG", "progressive": True},
            {"format": "PNG"},
        ):
            buffer = io.BytesIO()
            image.save(buffer, **options)
            probes.append((buffer.getvalue(), options["format"] == "JPEG"))
    for data, jpeg in probes:
        expected = np.asarray(decode_image(data, max_pixels=10**7, name="probe"))
        got = _torchvision_rgb(data, jpeg=jpeg).permute(1, 2, 0).numpy()
        if got.shape != expected.shape or not np.array_equal(got, expected):
            log.warning("torchvision decodes images differently from PIL here: decoding every image with PIL")
            return False
    return True

