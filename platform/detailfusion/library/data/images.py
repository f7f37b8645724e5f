"""Safe image decoding: every failure is a ``BadImage`` with a reason, and oversized images are refused
from their header, before any pixel is decoded (decompression bombs); then the PIL half of the transform
(targetpad, bicubic resize, centre crop). Imports no torch: Ray Data workers of ``prepare`` import this module."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

MAX_PIXELS = 50_000_000  # a 7071 x 7071 image; far above any CIR dataset
MAX_SIDE = 16_384


class BadImage(ValueError):
    """An image that cannot be used; the message is the quarantine reason."""


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Bytes -> fully decoded RGB image, or ``BadImage`` (not an image, truncated, corrupt, too large)."""
    if not data:
        raise BadImage("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels or max(width, height) > MAX_SIDE or min(width, height) < 1:
                raise BadImage(
                    f"refused as a decompression bomb / absurd size: {width}x{height} pixels exceeds the limit "
                    f"({max_pixels} pixels, side {MAX_SIDE})"
                )
            image.load()
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage("not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImage(f"refused as a decompression bomb / absurd size: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data
        raise BadImage(f"corrupt or truncated image: {exc}") from None
    return image if image.mode == "RGB" else image.convert("RGB")


def target_pad(image: Image.Image, max_ratio: float = 1.25) -> Image.Image:
    """Pad the short side with black so that long/short <= ``max_ratio`` (centred), as in CLIP4Cir / SPRC."""
    width, height = image.size
    long, short = max(width, height), min(width, height)
    if long / short <= max_ratio:
        return image
    target_short = int(round(long / max_ratio))
    new_size = (width, target_short) if width > height else (target_short, height)
    canvas = Image.new("RGB", new_size, (0, 0, 0))
    canvas.paste(image, ((new_size[0] - width) // 2, (new_size[1] - height) // 2))
    return canvas


def resize_crop(image: Image.Image, size: int) -> Image.Image:
    """Bicubic resize of the short side to ``size``, then a centre crop to ``size`` x ``size``."""
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def model_pixels(image: Image.Image, size: int) -> np.ndarray:
    """The one preprocessing path (prepare, search requests, a gallery reference's thumbnail): targetpad + bicubic
    resize + centre crop -> uint8 [size, size, 3] (normalised later, on the device: ``pixels.normalize_pixels``)."""
    return np.asarray(resize_crop(target_pad(image.convert("RGB")), size), dtype=np.uint8)


def load_pixels(data: bytes, size: int) -> np.ndarray:
    """Image bytes -> ``model_pixels`` (BadImage when they do not decode)."""
    return model_pixels(decode_image(data), size)


def jpeg_thumbnail(pixels: np.ndarray, quality: int = 90) -> bytes:
    """uint8 [S, S, 3] -> JPEG bytes (the gallery thumbnails a server shows and takes as references)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
