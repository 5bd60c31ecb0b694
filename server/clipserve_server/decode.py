"""Decoding image files into RGB PIL images, exactly as the reference adapter does."""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator

from PIL import Image, UnidentifiedImageError

from .errors import ErrorKind, ItemError

# Our own pixel limit applies (checked from the header); PIL's global one would only warn. Set
# once here: warnings.catch_warnings() per image would be slower and is not thread-safe.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def decode_image(data: bytes, *, max_pixels: int, name: str, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Open ``data``, take its first frame and convert it to RGB.

    Raises ItemError (INVALID_INPUT) for bytes that are not an image, truncated or corrupt
    files, and images over ``max_pixels`` (checked from the header, before decoding, so a
    decompression bomb costs nothing).

    ``draft_size`` (width, height), JPEG only, is the opt-in inexact fast path: libjpeg decodes
    at 1/2, 1/4 or 1/8 scale (DCT scaling), the smallest scale that keeps both sides at or above
    ``draft_size``, so that the processor's resize still only ever shrinks the image.
    """
    with _decode_errors(name, max_pixels):
        image = open_image(data, max_pixels=max_pixels, name=name)
        if draft_size is not None and image.format == "JPEG":
            image.draft(None, draft_size)
        image.seek(0)  # animated / multi-frame files: the first frame
        image.load()
        # The reference adapter converts exactly like this (palette, CMYK, 16-bit, L, LA, RGBA...).
        return image if image.mode == "RGB" else image.convert("RGB")


def open_image(data: bytes, *, max_pixels: int, name: str) -> Image.Image:
    """Read only the header of ``data``: format, mode and size, with the pixel limit checked."""
    if not data:
        raise ItemError(ErrorKind.INVALID_INPUT, f"{name}: the image is empty (0 bytes)")
    with _decode_errors(name, max_pixels):
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > max_pixels:
            raise ItemError(
                ErrorKind.INVALID_INPUT,
                f"{name}: {width}x{height} is {width * height} pixels, over the {max_pixels}-pixel limit",
            )
        return image


@contextlib.contextmanager
def _decode_errors(name: str, max_pixels: int) -> Iterator[None]:
    """PIL's exceptions, as the caller's INVALID_INPUT with the image's name."""
    try:
        yield
    except ItemError:
        raise
    except UnidentifiedImageError:
        raise ItemError(ErrorKind.INVALID_INPUT, f"{name}: not a recognised image format") from None
    except Image.DecompressionBombError as exc:  # PIL's own, coarser guard fired first
        raise ItemError(ErrorKind.INVALID_INPUT, f"{name}: over the {max_pixels}-pixel limit ({exc})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ItemError(ErrorKind.INVALID_INPUT, f"{name}: corrupt or truncated image: {exc}") from None
