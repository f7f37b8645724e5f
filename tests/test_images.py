"""Image decoding refuses what it cannot use, with a reason; the transform keeps aspect ratio within 1.25."""

import io
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from detailfusion.library.data.images import BadImage, decode_image, load_pixels
from detailfusion.library.data.schema import pixel_type, pixels_from_bytes, pixels_to_arrow
from detailfusion.library.data.transforms import preprocess, resize_crop, target_pad
from detailfusion.library.pixels import CLIP_MEAN, normalize_pixels


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


def test_stored_pixel_bytes_round_trip_to_exactly_the_loaded_pixels(tmp_path):
    """One fixed-size binary value per image, through a parquet file (two row groups) and back: the same uint8
    [S, S, 3] arrays ``load_pixels`` produced, from the Arrow column and from a Ray Data numpy batch (bytes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    sources = [Image.fromarray(rng.integers(0, 256, (30 + 7 * i, 50, 3), dtype=np.uint8)) for i in range(5)]
    encoded = []
    for image in sources:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    loaded = np.stack([load_pixels(data, 24) for data in encoded])
    column = pixels_to_arrow(list(loaded), 24)
    assert column.type == pixel_type(24) == pa.binary(24 * 24 * 3) and column[2].as_py() == loaded[2].tobytes()
    pq.write_table(pa.table({"pixels": column}), tmp_path / "p.parquet", row_group_size=2, compression="lz4")
    stored = pq.read_table(tmp_path / "p.parquet").column("pixels")
    assert stored.num_chunks == 3  # decoded across chunks, then from a sliced chunk
    cases = [(stored, loaded), (stored.chunk(1), loaded[2:4]), (stored[1:4], loaded[1:4]),
             (stored.chunk(2).slice(0), loaded[4:]), (np.array(stored.to_pylist(), dtype=object), loaded)]
    for values, expected in cases:
        decoded = pixels_from_bytes(values)
        assert decoded.dtype == np.uint8 and decoded.shape == expected.shape and np.array_equal(decoded, expected)
    assert pixels_from_bytes(pixels_to_arrow([], 24)).shape == (0, 24, 24, 3)
    with pytest.raises(ValueError, match="expected uint8 pixels"):
        pixels_to_arrow([loaded[0][:, :20]], 24)
    with pytest.raises(ValueError, match="older schema version"):
        pixels_from_bytes(pa.array([[1, 2, 3]], pa.list_(pa.uint8())))


def test_prepare_workers_import_no_torch():
    """Ray Data workers import the modules of prepare's batch functions; torch would cost seconds per worker."""
    code = "import sys, detailfusion.platform.data.prepare, detailfusion.library.data.ipr2pr; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
