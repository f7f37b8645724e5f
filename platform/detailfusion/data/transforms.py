"""Image transform of METHOD.md: "targetpad" to aspect ratio <= 1.25, bicubic resize, centre crop, CLIP mean/std.

``preprocess(image, size)`` -> float32 array [3, size, size]. Prepared shards store the uint8 result of
``target_pad`` + ``resize_crop`` [S, S, 3]; ``normalize_pixels`` finishes the job on the training device.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .images import resize_crop, target_pad  # the PIL half lives with the decoder, which imports no torch

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def preprocess(image: Image.Image, size: int, max_ratio: float = 1.25) -> np.ndarray:
    """PIL image -> normalised float32 [3, size, size]."""
    pixels = np.asarray(resize_crop(target_pad(image.convert("RGB"), max_ratio), size), dtype=np.uint8)
    return normalize_pixels(torch.from_numpy(pixels)[None])[0].numpy()


def normalize_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [B, S, S, 3] -> CLIP-normalised float32 [B, 3, S, S], computed on ``pixels``' device."""
    mean = torch.as_tensor(CLIP_MEAN, device=pixels.device)
    std = torch.as_tensor(CLIP_STD, device=pixels.device)
    return ((pixels.float() / 255.0 - mean) / std).permute(0, 3, 1, 2).contiguous()
