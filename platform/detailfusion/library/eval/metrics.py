"""Retrieval metrics as pure functions of score matrices (METHOD.md "Evaluation protocol").

Shapes: Q queries, N gallery images; ``scores`` [Q, N] (higher is better). Recall figures are percentages,
as the field reports them. Ranks and top-k lists follow ``ranking.py``'s one tie rule (stated in every
metrics.json), so metrics computed from ranks equal metrics scored from the top-k lists (submission files).
"""

from __future__ import annotations

import torch

from detailfusion.library.ranking import TIE_RULE, target_ranks, top_k  # noqa: F401  (the one ranking rule, shared with the index)

CIRR_KS = (1, 5, 10, 50)
CIRR_SUBSET_KS = (1, 2, 3)
FASHIONIQ_KS = (10, 50)


def recall_at_k(ranks: torch.Tensor, ks: tuple[int, ...], prefix: str = "R") -> dict[str, float]:
    """``{"R@k": % of queries whose target rank is < k}`` from 0-based ranks [Q]."""
    if ranks.numel() == 0:
        raise ValueError("no queries to score")
    return {f"{prefix}@{k}": 100.0 * (ranks < k).double().mean().item() for k in ks}


def cirr_metrics(scores: torch.Tensor, targets: torch.Tensor, references: torch.Tensor,
                 subset: torch.Tensor) -> dict[str, float]:
    """CIRR val: R@1/5/10/50 over the gallery without the query's reference; Rs@1/2/3 over the query's
    ``img_set.members`` minus the reference; Avg = (R@5 + Rs@1) / 2.

    targets, references: [Q] gallery indices; subset: [Q, N] bool, True for the query's set members.
    """
    rows = torch.arange(scores.shape[0])
    is_reference = torch.zeros_like(subset)
    is_reference[rows, references] = True
    return cirr_rank_metrics(target_ranks(scores, targets, is_reference),
                             target_ranks(scores, targets, ~subset | is_reference))


def cirr_rank_metrics(ranks: torch.Tensor, subset_ranks: torch.Tensor) -> dict[str, float]:
    """CIRR's metrics from 0-based target ranks [Q] over the gallery without the reference (R@k) and over the
    img_set members without the reference (Rs@k); Avg = (R@5 + Rs@1) / 2. Each is a mean over queries, so the
    metrics of a split are the count-weighted means of those of any partition of its queries."""
    metrics = recall_at_k(ranks, CIRR_KS)
    metrics.update(recall_at_k(subset_ranks, CIRR_SUBSET_KS, prefix="Rs"))
    metrics["Avg"] = (metrics["R@5"] + metrics["Rs@1"]) / 2
    return metrics


def fashioniq_metrics(ranks_by_category: dict[str, torch.Tensor]) -> dict[str, float]:
    """FashionIQ val: ``<category>/R@10``, ``<category>/R@50`` per category (ranks over that category's
    gallery, nothing removed), ``R@10`` / ``R@50`` averaged over categories, and ``Avg`` the mean of all."""
    metrics: dict[str, float] = {}
    for category, ranks in ranks_by_category.items():
        metrics.update({f"{category}/{k}": v for k, v in recall_at_k(ranks, FASHIONIQ_KS).items()})
    for k in FASHIONIQ_KS:
        metrics[f"R@{k}"] = sum(metrics[f"{c}/R@{k}"] for c in ranks_by_category) / len(ranks_by_category)
    metrics["Avg"] = sum(metrics[f"R@{k}"] for k in FASHIONIQ_KS) / len(FASHIONIQ_KS)
    return metrics
