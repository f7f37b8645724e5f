"""Per-query outcomes of every variant on a labelled CIRR split, computed in process (no Ray): the values the
ablation's means, standard deviations and paired bootstrap intervals are made of.

A query's value of a metric is 100 when it is a hit (R@k: target rank < k over the gallery without the reference;
Rs@k: within its img_set members without the reference) and 0 otherwise; Avg is (R@5 + Rs@1) / 2 per query, so
every metric of a variant is the mean of its per-query values, exactly as ``cirr_metrics`` computes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .metrics import target_ranks
from .protocols import CirrQueries
from .validate import ValidationSplit
from .variants import variant_scores

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


def cirr_outcomes(prepared_dir: str | Path, model, tokenizer, variants: list[str],
                  targets: dict[str, str] | None = None) -> Outcomes:
    """``model`` (eval mode) on a prepared CIRR split; ``targets`` supplies held-apart targets (synthetic test1)."""
    split = ValidationSplit(prepared_dir, targets)
    if split.dataset != "cirr":
        raise DataError(f"{prepared_dir}: per-query outcomes follow the CIRR protocol; this split is {split.dataset}")
    features, index, queries = split.encode(model, tokenizer)
    cirr = CirrQueries(split.triplets, index)
    values = {}
    for variant in variants:
        scores = variant_scores(variant, queries, index)
        values[variant] = per_query(target_ranks(scores, cirr.targets, cirr.is_reference),
                                    target_ranks(scores, cirr.targets, ~cirr.subset | cirr.is_reference))
    return Outcomes(features.sample_ids, values, features.weights.numpy())


def model_outcomes(path: str | Path, model_dir: str | Path, prepared: str | Path, targets: dict[str, str] | None,
                   variants: list[str]) -> Outcomes:
    """``cirr_outcomes`` of an exported model, saved to ``path`` (npz) and reused when made by the same model
    (fingerprint) for these variants."""
    import time

    from ..model import load_model, model_fingerprint

    path, fingerprint = Path(path), model_fingerprint(model_dir)
    if path.is_file():
        with np.load(path, allow_pickle=False) as saved:
            if str(saved["fingerprint"]) == fingerprint and set(variants) <= {str(v) for v in saved["variants"]}:
                values = {v: {m: saved[f"{v}/{m}"] for m in METRICS} for v in variants}
                return Outcomes([str(s) for s in saved["sample_ids"]], values, saved["weights"])
    started = time.perf_counter()
    model, tokenizer = load_model(model_dir)
    found = cirr_outcomes(prepared, model.eval(), tokenizer, variants, targets)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, fingerprint=fingerprint, variants=np.array(variants), sample_ids=np.array(found.sample_ids),
             weights=found.weights, **{f"{v}/{m}": x for v, ms in found.values.items() for m, x in ms.items()})
    means = found.means()
    print(f"scored {len(found.sample_ids)} queries of {Path(prepared).name} in {time.perf_counter() - started:.1f} s: "
          + ", ".join(f"{v} Avg {means[v]['Avg']:.1f} Rs@1 {means[v]['Rs@1']:.1f}" for v in variants), flush=True)
    return found
