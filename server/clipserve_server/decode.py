"""Decoding image files into RGB PIL images, exactly as the reference adapter does."""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

from .errors import ErrorKind, ItemError


def decode_image(data: bytes, *, max_pixels: int, name: str) -> Image.Image:
    """Open ``data``, take its first frame and convert it to RGB.

    Raises ItemError (INVALID_INPUT) for bytes that are not an image, truncated or corrupt
    files, and images over ``max_pixels`` (checked from the header, before decoding, so a
    decompression bomb costs nothing).
    """
    if not data:
        raise ItemError(ErrorKind.INVALID_INPUT, f"{name}: the image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Our own pixel limit applies; PIL's global one would only warn or differ.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ItemError(
                    ErrorKind.INVALID_INPUT,
                    f"{name}: {width}x{height} is {width * height} pixels, over the {max_pixels}-pixel limit",
                )
            image.seek(0)  # animated / multi-frame files: the first frame
            image.load()
            # The reference adapter converts exactly like this (palette, CMYK, 16-bit, L, LA, RGBA...).
            return image if image.mode == "RGB" else image.convert("RGB")
    except ItemError:
        raise
    except UnidentifiedImageError:
        raise ItemError(ErrorKind.INVALID_INPUT, f"{name}: not a recognised image format") from None
    except Image.DecompressionBombError as exc:  # PIL's own, coarser guard fired first
        raise ItemError(ErrorKind.INVALID_INPUT, f"{name}: over the {max_pixels}-pixel limit ({exc})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ItemError(ErrorKind.INVALID_INPUT, f"{name}: corrupt or truncated image: {exc}") from None
