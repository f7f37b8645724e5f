"""The model's input normalisation: uint8 pixels -> CLIP mean/std float tensors, on whatever device they are.

The one place the CLIP statistics live; the training input, the feature cache, inference and ``data.transforms``
(the PIL half of the preprocessing path) all finish with ``normalize_pixels``. Imports nothing of the package, so
both ``model`` and ``data`` can use it without depending on each other.
"""

from __future__ import annotations

import numpy as np
import torch

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def normalize_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [B, S, S, 3] -> CLIP-normalised float32 [B, 3, S, S], computed on ``pixels``' device."""
    mean = torch.as_tensor(CLIP_MEAN, device=pixels.device)
    std = torch.as_tensor(CLIP_STD, device=pixels.device)
    return ((pixels.float() / 255.0 - mean) / std).permute(0, 3, 1, 2).contiguous()
