"""The one ranking rule of the library, shared by the gallery index and the metrics: scores [Q, N] (higher is
better) -> ranks and top-k lists. **Tie rule** (stated in every metrics.json): candidates with equal scores are
ordered by gallery index, earlier first, i.e. a stable descending sort. Excluded candidates (``exclude`` [Q, N]
bool) are removed from the query's ranking altogether.
"""

from __future__ import annotations

import torch

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
