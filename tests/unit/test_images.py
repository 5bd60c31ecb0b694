"""Decoding: every image the reference adapter scores decodes the same way; the rest fail clearly."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from clipserve_server.images.decode import decode_image
from clipserve_server.utils.errors import ErrorKind, ItemError
from clipserve_server.images.netguard import is_forbidden, literal_ip

from ..helpers import make_image


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def reference_decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    return image if image.mode == "RGB" else image.convert("RGB")


RGB = Image.fromarray((np.random.default_rng(0).random((20, 30, 3)) * 255).astype("uint8"))

VARIANTS = {
    "jpeg": encode(RGB, "JPEG"),
    "cmyk-jpeg": encode(RGB.convert("CMYK"), "JPEG"),
    "grayscale-png": encode(RGB.convert("L"), "PNG"),
    "gray-alpha-png": encode(RGB.convert("LA"), "PNG"),
    "rgba-png": encode(RGB.convert("RGBA"), "PNG"),
    "palette-png": encode(RGB.convert("P"), "PNG"),
    "16-bit-png": encode(Image.fromarray((np.arange(600, dtype=np.uint16).reshape(20, 30) * 100)), "PNG"),
    "1x1-png": encode(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG"),
    "webp": encode(RGB, "WEBP"),
    "bmp": encode(RGB, "BMP"),
    "tiff": encode(RGB, "TIFF"),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_decodes_like_the_reference_adapter(name):
    data = VARIANTS[name]
    image = decode_image(data, max_pixels=10_000_000, name=name)
    assert image.mode == "RGB"
    assert np.array_equal(np.asarray(image), np.asarray(reference_decode(data)))


def test_animated_images_use_their_first_frame():
    frames = [Image.new("RGB", (8, 8), color) for color in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    image = decode_image(buffer.getvalue(), max_pixels=1000, name="anim.gif")
    assert image.getpixel((4, 4))[0] > 200 and image.getpixel((4, 4))[1] < 50


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"", "empty"),
        (b"hello, world", "not a recognised image format"),
        (make_image(64, 64, fmt="JPEG")[:300], "corrupt or truncated"),
        (make_image(64, 64, fmt="PNG")[:100], "corrupt or truncated"),
    ],
)
def test_broken_files_are_invalid_input(data, words):
    with pytest.raises(ItemError) as info:
        decode_image(data, max_pixels=10_000_000, name="upload")
    assert info.value.kind is ErrorKind.INVALID_INPUT
    assert words in info.value.message and info.value.message.startswith("upload: ")


def test_a_decompression_bomb_is_refused_before_decoding():
    bomb = encode(Image.new("L", (20_000, 20_000)), "PNG")  # 400 Mpx, a few hundred KB
    assert len(bomb) < 2_000_000
    with pytest.raises(ItemError) as info:
        decode_image(bomb, max_pixels=50_000_000, name="bomb.png")
    assert info.value.kind is ErrorKind.INVALID_INPUT and "pixel limit" in info.value.message


@pytest.mark.parametrize(
    ("address", "forbidden"),
    [
        ("127.0.0.1", True), ("10.1.2.3", True), ("172.16.0.1", True), ("192.168.1.1", True),
        ("169.254.169.254", True), ("100.64.0.1", True), ("0.0.0.0", True), ("::1", True),
        ("fe80::1", True), ("fd00::1", True), ("::ffff:127.0.0.1", True), ("224.0.0.1", True),
        ("8.8.8.8", False), ("2606:4700:4700::1111", False),
    ],
)
def test_only_public_unicast_addresses_may_be_fetched(address, forbidden):
    assert is_forbidden(address) is forbidden


def test_literal_ip_hosts_are_recognised():
    assert literal_ip("[::1]") == "::1" and literal_ip("127.0.0.1") == "127.0.0.1" and literal_ip("example.com") is None
