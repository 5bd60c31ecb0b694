"""What an image file's header may claim before anything is decoded or resized.

The pixel limit alone does not bound an image's cost:
- the processor scales the short side up to the model's input, so a 600000x1 image (1.8 KB of
  PNG, 1.2% of the pixel limit) becomes 224x134,400,000 pixels: the aspect ratio is bounded;
- some PIL plugins decode while opening, before the size can be checked: ICO loads its largest
  entry (an embedded PNG of any size), WebP allocates its whole canvas. Their sizes are read
  here from the bytes first, and only the formats listed in ``FORMATS`` may be opened at all;
- each scan of a progressive JPEG is a pass over the whole image, and nothing in libjpeg
  bounds their number: scans are counted from the markers first, and bounded alone and times
  the image's pixels.
"""

from __future__ import annotations

import math
import struct
import sys
from dataclasses import dataclass

from ..utils.config import ServerConfig
from ..utils.errors import ErrorKind, ItemError

# The PIL plugins an image may be opened with: the formats of the web and of photo collections
# (JPEG includes MPO, which its plugin opens).
# The others (Ghostscript EPS, FITS, SPIDER, ...) are more code reachable by a caller's bytes.
FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "DIB", "TIFF", "ICO", "PPM")

_JPEG_MAGIC = b"\xff\xd8\xff"
_JPEG_SOS = b"\xff\xda"  # never inside entropy-coded data (0xFF is stuffed there): one per scan
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_ICO_ENTRY = struct.Struct("<BBBBHHII")  # width, height, colours, reserved, planes, bits, size, offset


@dataclass(frozen=True)
class ImageLimits:
    """The header checks beside the pixel limit: a server's come from its config (``of``);
    these defaults bound nothing (the decode functions called by a tool or a test)."""

    max_aspect_ratio: float = math.inf
    max_jpeg_scans: int = sys.maxsize
    # A scan is a pass over every pixel: at most this many passes over an image at the pixel limit.
    max_jpeg_scan_passes: float = math.inf

    @classmethod
    def of(cls, config: ServerConfig) -> ImageLimits:
        return cls(config.max_image_aspect_ratio, config.max_jpeg_scans, config.max_jpeg_scan_passes)


DEFAULT_LIMITS = ImageLimits()


def refuse(name: str, message: str) -> ItemError:
    return ItemError(ErrorKind.INVALID_INPUT, f"{name}: {message}")


def check_size(width: int, height: int, *, max_pixels: int, limits: ImageLimits, name: str) -> None:
    """The pixel limit and the aspect-ratio limit, for an image of ``width`` x ``height``."""
    if width * height > max_pixels:
        raise refuse(name, f"{width}x{height} is {width * height} pixels, over the {max_pixels}-pixel limit")
    short, long = min(width, height), max(width, height)
    if short < 1 or long / short > limits.max_aspect_ratio:
        raise refuse(
            name,
            (
                f"{width}x{height} has an aspect ratio of {long / max(short, 1):g}, "
                f"over the {limits.max_aspect_ratio:g}:1 limit (--max-image-aspect-ratio)"
            ),
        )


def check_jpeg_work(data: bytes, width: int, height: int, *, max_pixels: int, limits: ImageLimits, name: str) -> None:
    """A JPEG's scans times its pixels, within ``max_jpeg_scan_passes`` images at the pixel
    limit: within the scan limit a 7000x7000 JPEG of 100 scans would still decode for ~9 s."""
    scans = data.count(_JPEG_SOS)
    passes = scans * width * height / max_pixels
    if passes > limits.max_jpeg_scan_passes:
        raise refuse(
            name,
            (
                f"the JPEG's {scans} scans of {width}x{height} pixels are "
                f"{passes:.0f} passes over an image at the {max_pixels}-pixel limit, "
                f"over the {limits.max_jpeg_scan_passes:g}-pass limit (--max-jpeg-scan-passes)"
            ),
        )


def check_before_open(data: bytes, *, max_pixels: int, limits: ImageLimits, name: str) -> None:
    """What must hold before PIL sees ``data``: the sizes that its WebP and ICO plugins would
    act on while opening, and a JPEG's number of scans."""
    if data.startswith(_JPEG_MAGIC):
        scans = data.count(_JPEG_SOS)
        if scans > limits.max_jpeg_scans:
            raise refuse(
                name, f"the JPEG has {scans} scans, over the {limits.max_jpeg_scans}-scan limit (--max-jpeg-scans)"
            )
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        size = _webp_size(data)
        if size is not None:
            check_size(*size, max_pixels=max_pixels, limits=limits, name=name)
    elif data[:4] in (b"\0\0\1\0", b"\0\0\2\0"):  # ICO, CUR
        for size in _ico_sizes(data):
            check_size(*size, max_pixels=max_pixels, limits=limits, name=name)


def _webp_size(data: bytes) -> tuple[int, int] | None:
    """The canvas (VP8X) or frame (VP8, VP8L) size of a WebP file; None if it is too short to say."""
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:
        return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
    if chunk == b"VP8 " and len(data) >= 30:
        width, height = struct.unpack_from("<HH", data, 26)
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25:
        bits = int.from_bytes(data[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    return None


def _ico_sizes(data: bytes) -> list[tuple[int, int]]:
    """The size of each entry of an ICO/CUR file as its embedded PNG or BMP header says (the
    directory's own byte-sized fields say at most 256x256, whatever the entry holds)."""
    count = int.from_bytes(data[4:6], "little")
    sizes = []
    for index in range(count):
        start = 6 + index * _ICO_ENTRY.size
        if start + _ICO_ENTRY.size > len(data):
            break
        offset = _ICO_ENTRY.unpack_from(data, start)[7]
        if data[offset : offset + 8] == _PNG_MAGIC and offset + 24 <= len(data):
            sizes.append(struct.unpack_from(">II", data, offset + 16))
        elif offset + 12 <= len(data):  # a BMP info header: its height counts the mask too
            width, height = struct.unpack_from("<ii", data, offset + 4)
            sizes.append((abs(width), abs(height) // 2 or 1))
    return sizes
