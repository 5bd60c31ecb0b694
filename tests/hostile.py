"""Hostile inputs, crafted: small to send, costly to take (tests/test_hostile_inputs.py and
benchmarks/bench_hostile.py send them)."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image


def thin_png(width: int, height: int = 1) -> bytes:
    """A ``width`` x ``height`` grey PNG, written by hand: a few KB however wide."""
    row = b"\0" + b"\x80" * (width * 3)
    raw = zlib.compress(row * height, 9)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", raw)
        + chunk(b"IEND", b"")
    )


def many_scans_jpeg(scans: int, size: int = 2048) -> bytes:
    """A progressive JPEG whose last (near-empty: 16 bytes) scan is repeated ``scans`` times:
    libjpeg warns and makes a pass over the whole image for each (~6 ms at 2048x2048)."""
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (120, 130, 140)).save(buffer, "JPEG", progressive=True, quality=90)
    data = buffer.getvalue()
    pos, last = 2, b""
    while data[pos + 1] != 0xD9:
        end = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if data[pos + 1] == 0xDA:  # the scan's entropy-coded data runs to the next marker
            while not (data[end] == 0xFF and data[end + 1] != 0 and not 0xD0 <= data[end + 1] <= 0xD7):
                end += 1
            last = data[pos:end]
        pos = end
    return data[:-2] + last * scans + b"\xff\xd9"


def ico_with_png(width: int, height: int) -> bytes:
    """An ICO whose one entry is a ``width`` x ``height`` PNG (its directory says 256x256):
    PIL's ICO plugin decodes it while opening."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (1, 2, 3)).save(buffer, "PNG")
    png = buffer.getvalue()
    return struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 22) + png


def webp_canvas(width: int, height: int) -> bytes:
    """A WebP whose VP8X header claims a ``width`` x ``height`` canvas around a 16x16 frame:
    PIL's WebP decoder allocates the canvas while opening."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(buffer, "WEBP")
    frame = buffer.getvalue()[12:]  # the VP8/VP8L chunk
    vp8x = (
        b"VP8X"
        + struct.pack("<I", 10)
        + b"\0\0\0\0"
        + (width - 1).to_bytes(3, "little")
        + (height - 1).to_bytes(3, "little")
    )
    body = b"WEBP" + vp8x + frame
    return b"RIFF" + struct.pack("<I", len(body)) + body


def empty_items_chunk(items: int) -> bytes:
    """A ScoreRequestChunk of ``items`` empty items, as bytes: 2 bytes each."""
    return b"\x0a\x00" * items


def malformed_request(fields: int) -> bytes:
    """A ScoreRequest that does not parse (a query that is not UTF-8), then ``fields`` tiny
    unknown varint fields: what the lenient fallback reader walks."""
    return b"\x0a\x02id" + b"\x12\x02\xff\xfe" + b"\x78\x01" * fields
