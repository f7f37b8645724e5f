"""Image transform of METHOD.md: "targetpad" to aspect ratio <= 1.25, bicubic resize, centre crop, CLIP mean/std.

``preprocess(image, size)`` -> float32 array [3, size, size]. Prepared shards store the uint8 result of
``target_pad`` + ``resize_crop`` [S, S, 3]; ``pixels.normalize_pixels`` (the model's input normalisation, shared by
training, the feature cache and inference) finishes the job on the device.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from detailfusion.library.data.images import (  # the PIL half lives with the decoder, which imports no torch
    resize_crop,
    target_pad,
)
from detailfusion.library.pixels import normalize_pixels


def preprocess(image: Image.Image, size: int, max_ratio: float = 1.25) -> np.ndarray:
    """PIL image -> normalised float32 [3, size, size]."""
    pixels = np.asarray(resize_crop(target_pad(image.convert("RGB"), max_ratio), size), dtype=np.uint8)
    return normalize_pixels(torch.from_numpy(pixels)[None])[0].numpy()
