"""Retrieval metrics as pure functions of score matrices (METHOD.md "Evaluation protocol").

Shapes: Q queries, N gallery images; ``scores`` [Q, N] (higher is better). Recall figures are percentages,
as the field reports them. **Tie rule** (stated in every metrics.json): candidates with equal scores are
ordered by gallery index, earlier first, i.e. a stable descending sort. ``target_ranks`` and ``top_k`` use
the same rule, so metrics computed from ranks equal metrics scored from the top-k lists (submission files).
Excluded candidates (``exclude`` [Q, N] bool) are removed from the query's ranking altogether.
"""

from __future__ import annotations

import torch

CIRR_KS = (1, 5, 10, 50)
CIRR_SUBSET_KS = (1, 2, 3)
FASHIONIQ_KS = (10, 50)
TIE_RULE = "equal scores are ordered by gallery index (stable descending sort); excluded candidates are removed"


def target_ranks(scores: torch.Tensor, targets: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """0-based rank [Q] of each query's target among its non-excluded candidates (tie rule above).

    targets: [Q] gallery indices. A target that is itself excluded is an error (the protocol never does that).
    """
    scores = scores.float()
    rows = torch.arange(scores.shape[0])
    target_score = scores[rows, targets].unsqueeze(1)  # [Q, 1]
    index = torch.arange(scores.shape[1]).unsqueeze(0)  # [1, N]
    ahead = (scores > target_score) | ((scores == target_score) & (index < targets.unsqueeze(1)))
    if exclude is not None:
        if exclude[rows, targets].any():
            raise ValueError("a query's target is excluded from its own ranking")
        ahead &= ~exclude
    return ahead.sum(dim=1)


def top_k(scores: torch.Tensor, k: int, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Gallery indices [Q, k] of the best k non-excluded candidates per query, best first (tie rule above).

    Every query must keep at least k candidates after exclusion.
    """
    scores = scores.float()
    if exclude is not None:
        kept = (~exclude).sum(dim=1)
        if (kept < k).any():
            raise ValueError(f"a query keeps only {int(kept.min())} candidates, fewer than k={k}")
        scores = scores.masked_fill(exclude, float("-inf"))
    elif scores.shape[1] < k:
        raise ValueError(f"the gallery holds {scores.shape[1]} images, fewer than k={k}")
    return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]


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
    metrics = recall_at_k(target_ranks(scores, targets, is_reference), CIRR_KS)
    metrics.update(recall_at_k(target_ranks(scores, targets, ~subset | is_reference), CIRR_SUBSET_KS, prefix="Rs"))
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
