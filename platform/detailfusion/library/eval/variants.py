"""The ablation variants of one checkpoint, all searched in the same gallery index (METHOD.md, AFC).

Learned: ``gm`` (a = 1, 0), ``di`` (0, 1), ``static`` (.5, .5) and the model's own compositor (``afc`` or
``concat_linear``) when it is not static. Baselines: ``image_only`` (the reference's own unified embedding,
token-averaged), ``text_only`` (the GM branch's text feature against the GM half of the index: BLIP-2's
text-to-image similarity) and ``random`` (seeded random scores).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from detailfusion.library.errors import DataError
from detailfusion.library.index.exact import GalleryIndex
from detailfusion.library.model.fusion import fused_query
from detailfusion.library.model.inference import QueryFeatures

FIXED_WEIGHTS = {"gm": (1.0, 0.0), "di": (0.0, 1.0), "static": (0.5, 0.5)}
BASELINES = ("image_only", "text_only", "random")


def variant_names(compositor: str) -> list[str]:
    learned = list(FIXED_WEIGHTS) + ([compositor] if compositor not in FIXED_WEIGHTS else [])
    return learned + list(BASELINES)


def variant_queries(features: QueryFeatures, index: GalleryIndex, reference_ids: list[str],
                    compositor: str) -> dict[str, torch.Tensor]:
    """{variant: unified queries [Q, 2D]} for every variant but ``random`` (which has no query)."""
    queries = {}
    for name, weights in FIXED_WEIGHTS.items():
        w = torch.tensor(weights).expand(len(features.sample_ids), -1)
        queries[name] = fused_query(features.q_gm, features.q_di, w, index.fusion_score)
    if compositor not in FIXED_WEIGHTS:
        queries[compositor] = features.unified
    missing = [r for r in reference_ids if r not in index.position]
    if missing:
        raise DataError(f"{len(missing)} reference image(s) are not in the gallery index, e.g. {missing[0]}")
    references = index.embeddings[[index.position[r] for r in reference_ids]]  # [Q, Nq, 2D]
    queries["image_only"] = F.normalize(references.mean(dim=1), dim=-1)
    queries["text_only"] = torch.cat([features.text_gm, torch.zeros_like(features.text_gm)], dim=-1)
    return queries


def variant_scores(name: str, queries: dict[str, torch.Tensor], index: GalleryIndex,
                   rows: torch.Tensor | None = None, seed: int = 0) -> torch.Tensor:
    """Scores [Q, N] (or [Q, len(rows)]) of one variant."""
    if name == "random":
        count = len(next(iter(queries.values())))
        width = len(index) if rows is None else len(rows)
        return torch.rand(count, width, generator=torch.Generator().manual_seed(seed))
    return index.scores(queries[name], rows=rows)
