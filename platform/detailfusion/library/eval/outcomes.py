"""Per-query outcomes of every variant on a labelled CIRR split: the values the
ablation's means, standard deviations and paired bootstrap intervals are made of.

A query's value of a metric is 100 when it is a hit (R@k: target rank < k over the gallery without the reference;
Rs@k: within its img_set members without the reference) and 0 otherwise; Avg is (R@5 + Rs@1) / 2 per query, so
every metric of a variant is the mean of its per-query values, exactly as ``cirr_metrics`` computes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

METRICS = ("R@1", "R@5", "R@10", "Rs@1", "Rs@2", "Avg")


@dataclass
class Outcomes:
    """values: {variant: {metric: [Q] float per-query values}}; weights: [Q, 2] (a_gm, a_di) of the model's
    compositor (NaN when it has none); sample_ids: query order."""

    sample_ids: list[str]
    values: dict[str, dict[str, np.ndarray]]
    weights: np.ndarray

    def means(self) -> dict[str, dict[str, float]]:
        return {v: {m: float(x.mean()) for m, x in metrics.items()} for v, metrics in self.values.items()}

    def family_means(self, families: list[str | None]) -> dict[str, dict[str, dict[str, float]]]:
        """{edit family: {variant: {metric: mean over that family's queries}}}; ``families``: one per query
        (None: untagged, left out)."""
        if len(families) != len(self.sample_ids):
            raise ValueError(f"family_means: {len(families)} families for {len(self.sample_ids)} queries")
        found = {}
        for family in sorted({f for f in families if f}):
            mask = np.array([f == family for f in families])
            found[family] = {v: {m: float(x[mask].mean()) for m, x in metrics.items()}
                             for v, metrics in self.values.items()}
        return found


def per_query(ranks: torch.Tensor, subset_ranks: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-query metric values from 0-based gallery ranks [Q] and subset ranks [Q]."""
    hit = lambda r, k: 100.0 * (r < k).double().numpy()  # noqa: E731
    values = {"R@1": hit(ranks, 1), "R@5": hit(ranks, 5), "R@10": hit(ranks, 10),
              "Rs@1": hit(subset_ranks, 1), "Rs@2": hit(subset_ranks, 2)}
    values["Avg"] = (values["R@5"] + values["Rs@1"]) / 2
    return values
