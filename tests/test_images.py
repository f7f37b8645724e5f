"""Image decoding refuses what it cannot use, with a reason; the transform keeps aspect ratio within 1.25."""

import io
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from detailfusion.data.images import BadImage, decode_image, load_pixels
from detailfusion.data.transforms import CLIP_MEAN, normalize_pixels, preprocess, resize_crop, target_pad


def png(size=(40, 20), colour=(255, 0, 0)):
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_good_image_is_padded_resized_and_cropped():
    pixels = load_pixels(png((40, 20)), 16)
    assert pixels.shape == (16, 16, 3) and pixels.dtype == np.uint8
    padded = target_pad(Image.new("RGB", (40, 20)))
    assert padded.size == (40, 32)  # 40 / 32 = 1.25
    assert target_pad(Image.new("RGB", (30, 25))).size == (30, 25)  # already within the ratio


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file"),
        (b"hello, not an image", "not an image"),
        (png()[:50], "corrupt or truncated"),
    ],
)
def test_bad_bytes_are_refused_with_a_reason(data, reason):
    with pytest.raises(BadImage, match=reason):
        decode_image(data)


def test_oversized_images_are_refused_from_the_header():
    with pytest.raises(BadImage, match="decompression bomb / absurd size: 40x20 pixels exceeds"):
        decode_image(png((40, 20)), max_pixels=100)


def test_normalize_matches_the_numpy_transform():
    image = Image.new("RGB", (20, 20), (10, 200, 30))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8))[None]
    assert torch.allclose(normalize_pixels(pixels)[0], torch.from_numpy(preprocess(image, 20)), atol=1e-6)
    black = normalize_pixels(torch.zeros(1, 2, 2, 3, dtype=torch.uint8))
    assert torch.allclose(black[0, :, 0, 0], torch.from_numpy(-CLIP_MEAN / np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
def test_pixels_equal_the_plain_pil_transform_bit_for_bit(mode):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    expected = np.asarray(resize_crop(target_pad(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")), 16))
    assert np.array_equal(load_pixels(buffer.getvalue(), 16), expected)


def test_prepare_workers_import_no_torch():
    """Ray Data workers import the modules of prepare's batch functions; torch would cost seconds per worker."""
    code = "import sys, detailfusion.data.prepare, detailfusion.data.ipr2pr; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
