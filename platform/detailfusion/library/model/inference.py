"""The model's inference, for every caller (evaluation's encoders, training's validation, the server, the index):
gallery images to their unified embeddings, queries to both branches' composed features and the fused query.

Shapes: pixels are uint8 [B, S, S, 3] (S: the model's ``image_size``); D: a branch's embedding width; Nq: query
tokens. The fused score over these embeddings is ``fusion.py``'s (METHOD.md's per-branch max-sim by default).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from detailfusion.library.pixels import normalize_pixels


def image_size(model_dir: str | Path) -> int:
    """The side in pixels an exported model's ViT takes (its config.json), without loading the weights."""
    path = Path(model_dir) / "config.json"
    try:
        return int(json.loads(path.read_text())["vision_config"]["image_size"])
    except FileNotFoundError:
        raise FileNotFoundError(f"{model_dir}: no exported model there (config.json missing)") from None


@torch.no_grad()
def embed_gallery(model, pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels [B, S, S, 3] (on the model's device) -> unified gallery embeddings [B, Nq, 2D]."""
    targets = model.encode_targets(model.encode_image(normalize_pixels(pixels)))
    return model.gallery_embedding(targets["gm"], targets["di"])


@torch.no_grad()
def embed_queries(model, tokenizer, pixels: torch.Tensor, texts: list[str]) -> dict[str, torch.Tensor]:
    """Reference pixels uint8 [B, S, S, 3] + texts -> {q_gm, q_di, text_gm [B, D], unified [B, 2D], weights [B, 2]
    (NaN when the compositor has none)}, float32 on the CPU."""
    device = pixels.device
    tokens = tokenizer(texts, padding="max_length", truncation=True, max_length=model.config.max_text_length,
                       return_tensors="pt").to(device)
    queries = model.encode_queries(model.encode_image(normalize_pixels(pixels)), tokens["input_ids"],
                                   tokens["attention_mask"])
    fused = model.compose(queries["gm"], queries["di"])
    weights = fused.weights if fused.weights is not None else torch.full((len(texts), 2), float("nan"))
    text = model.gm_branch.encode_text(tokens["input_ids"], tokens["attention_mask"])
    out = {"q_gm": queries["gm"].feature, "q_di": queries["di"].feature, "text_gm": text, "unified": fused.query,
           "weights": weights}
    return {name: value.float().cpu() for name, value in out.items()}


@dataclass
class QueryFeatures:
    """Per query (rows in ``sample_ids`` order): q_gm, q_di, text_gm [Q, D]; unified [Q, 2D]; weights [Q, 2]."""

    sample_ids: list[str]
    q_gm: torch.Tensor
    q_di: torch.Tensor
    text_gm: torch.Tensor
    unified: torch.Tensor
    weights: torch.Tensor
