"""Preprocessing: bit-for-bit the stock processor's pixel_values, for every kind of image, cheaper."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipserve_server.images.decode import decode_image, decode_rgb_tensor
from clipserve_server.images.decode_protocol import DecodeJob
from clipserve_server.images.preprocess import StockPipeline, TorchvisionPipeline, build_pipeline

pytestmark = pytest.mark.cost(11)  # its CPU cost among the files (tests/conftest.py)


@pytest.fixture(scope="module")
def checkpoint_224(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model at CLIP's real input size, so that photos are really resized and cropped."""
    from clipserve_server.models.synthetic import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("tiny-224"), arch="tiny", image_size=224)


@pytest.fixture(scope="module")
def processor(checkpoint_224: Path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(checkpoint_224).image_processor


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    smooth = np.stack(
        [x * 255 / max(width, 1), y * 255 / max(height, 1), (x + y) * 127 / max(width + height, 1)], axis=-1
    )
    return Image.fromarray(np.clip(smooth + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8), "RGB")


def palette_with_transparency() -> bytes:
    image = photo(64, 48).convert("P")
    return encode(image, "PNG", transparency=0)


def rgb_with_transparent_colour() -> bytes:
    image = photo(50, 40)
    image.paste((10, 20, 30), (0, 0, 25, 40))
    return encode(image, "PNG", transparency=(10, 20, 30))


RGB = photo(300, 200)
FILES = {
    "jpeg-photo": encode(photo(640, 480), "JPEG", quality=90),
    "progressive-jpeg": encode(photo(333, 251, seed=6), "JPEG", quality=90, progressive=True),
    "jpeg-444": encode(photo(257, 129, seed=7), "JPEG", quality=95, subsampling=0),
    "jpeg-422": encode(photo(129, 257, seed=8), "JPEG", quality=95, subsampling=1),
    "grayscale-jpeg": encode(RGB.convert("L"), "JPEG"),
    "large-jpeg": encode(photo(1600, 1200, seed=3), "JPEG", quality=85),
    "png-photo": encode(photo(500, 500, seed=1), "PNG"),
    "palette-png": encode(RGB.convert("P"), "PNG"),
    "palette-png-transparent": palette_with_transparency(),
    "rgb-png-transparent-colour": rgb_with_transparent_colour(),
    "cmyk-jpeg": encode(RGB.convert("CMYK"), "JPEG"),
    "grayscale-png": encode(RGB.convert("L"), "PNG"),
    "gray-alpha-png": encode(RGB.convert("LA"), "PNG"),
    "rgba-png": encode(RGB.convert("RGBA"), "PNG"),
    "16-bit-png": encode(Image.fromarray((np.arange(300 * 200, dtype=np.uint16).reshape(200, 300) * 3)), "PNG"),
    "1x1-png": encode(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG"),
    "very-wide-jpeg": encode(photo(2000, 3, seed=4), "JPEG"),
    "very-tall-png": encode(photo(5, 900, seed=5), "PNG"),
    "gif": encode(RGB.convert("P"), "GIF"),
    "webp": encode(RGB, "WEBP"),
}


def stock_pixel_values(processor, data: bytes) -> torch.Tensor:
    """The reference adapter's way: PIL decode + convert, then the processor on the PIL image."""
    image = Image.open(io.BytesIO(data))
    if image.mode != "RGB":
        image = image.convert("RGB")
    return processor(images=image, return_tensors="pt")["pixel_values"][0]


def served_pixel_values(pipeline, data: bytes) -> torch.Tensor:
    """The server's way: a decode worker's job on the file's bytes, normalize in the batch."""
    pixels = DecodeJob(pipeline, max_pixels=10_000_000)(data, "test")
    return pipeline.normalize(torch.from_numpy(pixels).unsqueeze(0))[0]


def test_clip_processors_get_the_fast_pipeline(processor):
    assert isinstance(build_pipeline(processor), TorchvisionPipeline)


@pytest.mark.parametrize("name", sorted(FILES))
def test_pixel_values_are_bit_identical_to_the_stock_processor(processor, name):
    expected = stock_pixel_values(processor, FILES[name])
    got = served_pixel_values(build_pipeline(processor), FILES[name])
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert torch.equal(got, expected)


# Decoded by torchvision straight into a tensor (checked against PIL once per process); every
# other file by PIL, as the reference adapter decodes it. Both give the pixel values above.
DECODED_TO_A_TENSOR = {
    "jpeg-photo",
    "progressive-jpeg",
    "jpeg-444",
    "jpeg-422",
    "large-jpeg",
    "png-photo",
    "1x1-png",
    "very-wide-jpeg",
    "very-tall-png",
}


@pytest.mark.parametrize("name", sorted(FILES))
def test_plain_8_bit_rgb_jpegs_and_pngs_skip_pil(name):
    chw = decode_rgb_tensor(FILES[name], max_pixels=10_000_000, name=name)
    assert (chw is not None) == (name in DECODED_TO_A_TENSOR)
    if chw is not None:
        assert (
            chw.dtype == torch.uint8 and chw.permute(1, 2, 0).is_contiguous()
        )  # channels-last: the fast resize layout
        assert torch.equal(
            chw.permute(1, 2, 0),
            torch.from_numpy(np.array(decode_image(FILES[name], max_pixels=10_000_000, name=name))),
        )


def test_a_truncated_file_fails_as_pil_says(processor):
    from clipserve_server.utils.errors import ItemError

    for name in ("jpeg-photo", "png-photo"):
        with pytest.raises(ItemError, match="corrupt or truncated"):
            DecodeJob(build_pipeline(processor), max_pixels=10_000_000)(FILES[name][: len(FILES[name]) // 2], name)


def test_images_travel_as_uint8_crops_a_quarter_of_the_float_size(processor):
    pixels = build_pipeline(processor)(photo(640, 480))
    assert isinstance(pixels, np.ndarray) and pixels.dtype == np.uint8 and pixels.shape == (3, 224, 224)


def test_decode_size_is_the_resize_target(processor):
    assert build_pipeline(processor).decode_size == (224, 224)


def test_a_processor_with_its_own_preprocessing_is_used_the_stock_way(processor):
    class Custom(type(processor)):
        def _preprocess(self, images, **kwargs):
            return super()._preprocess(images, **kwargs)

    custom = Custom(**processor.to_dict())
    pipeline = build_pipeline(custom)
    assert type(pipeline) is StockPipeline
    assert torch.equal(
        served_pixel_values(pipeline, FILES["jpeg-photo"]), stock_pixel_values(processor, FILES["jpeg-photo"])
    )


def test_a_fast_pipeline_that_would_differ_is_not_used(processor, monkeypatch):
    """Say a transformers release changes the processor's steps: the self-check at load notices."""
    original = TorchvisionPipeline.resize_and_crop
    monkeypatch.setattr(TorchvisionPipeline, "resize_and_crop", lambda self, chw: original(self, chw) // 2 * 2)
    assert type(build_pipeline(processor)) is StockPipeline


def test_resizing_on_a_device_tensor_matches_the_decode_worker(processor):
    """--gpu-decode hands the pipeline a CHW tensor from nvJPEG; on the same pixels the result
    is the decode worker's (here on the CPU; gpu_check.sh measures the GPU's drift)."""
    pipeline = build_pipeline(processor)
    image = photo(640, 480, seed=9)
    chw = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).contiguous()
    assert torch.equal(pipeline.on_device(chw), torch.from_numpy(pipeline(image)))


def test_jpeg_draft_decodes_at_the_smallest_scale_that_keeps_the_input_size():
    big = FILES["large-jpeg"]  # 1600x1200: 1/4 scale is 400x300, 1/8 would be 200x150 < 224
    assert decode_image(big, max_pixels=10**8, name="x", draft_size=(224, 224)).size == (400, 300)
    assert decode_image(FILES["jpeg-photo"], max_pixels=10**8, name="x", draft_size=(224, 224)).size == (320, 240)
    assert decode_image(FILES["png-photo"], max_pixels=10**8, name="x", draft_size=(224, 224)).size == (
        500,
        500,
    )  # not a JPEG
    assert decode_image(big, max_pixels=10**8, name="x").size == (1600, 1200)  # off by default


def test_jpeg_draft_still_gives_the_model_its_full_input(processor):
    pipeline = build_pipeline(processor)
    drafted = pipeline(decode_image(FILES["large-jpeg"], max_pixels=10**8, name="x", draft_size=pipeline.decode_size))
    exact = pipeline(decode_image(FILES["large-jpeg"], max_pixels=10**8, name="x"))
    assert drafted.shape == exact.shape == (3, 224, 224)
    assert np.abs(drafted.astype(int) - exact.astype(int)).mean() < 8  # close, not equal: the documented drift


def test_torch_is_handed_only_writable_arrays(processor, monkeypatch):
    """A tensor over read-only memory (np.asarray of a PIL image) is undefined behaviour once
    written to; torch warns once per process, so the arrays are checked, not the warning."""
    handed, from_numpy = [], torch.from_numpy
    monkeypatch.setattr(torch, "from_numpy", lambda array: handed.append(array.flags.writeable) or from_numpy(array))
    pipeline = build_pipeline(processor)
    pipeline(photo(64, 48))
    assert handed and all(handed)
