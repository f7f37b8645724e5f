"""Per-query outcomes (``library.eval.outcomes``) of a model on a prepared CIRR split, computed in process from the
prepared parquet (read with Ray's tensor type registered), saved beside the run and reused for the same model."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from detailfusion.library.errors import DataError
from detailfusion.library.eval.outcomes import METRICS, Outcomes, per_query
from detailfusion.platform.eval.validate import ValidationSplit


def cirr_outcomes(prepared_dir: str | Path, model, tokenizer, variants: list[str],
                  targets: dict[str, str] | None = None) -> Outcomes:
    """``model`` (eval mode) on a prepared split whose protocol ranks img_set subsets (CIRR's); ``targets`` supplies
    held-apart targets (synthetic test1)."""
    split = ValidationSplit(prepared_dir, targets)
    features, ranks = split.ranks(model, tokenizer, variants)
    if ranks.subset is None:
        raise DataError(f"{prepared_dir}: per-query outcomes need subset ranks (Rs@k, CIRR's protocol); this split is "
                        f"{split.dataset}")
    values = {variant: per_query(ranks.gallery[variant], ranks.subset[variant]) for variant in variants}
    return Outcomes(features.sample_ids, values, features.weights.numpy())


def model_outcomes(path: str | Path, model_dir: str | Path, prepared: str | Path, targets: dict[str, str] | None,
                   variants: list[str]) -> Outcomes:
    """``cirr_outcomes`` of an exported model, saved to ``path`` (npz) and reused when made by the same model
    (fingerprint) for these variants."""
    import time

    from detailfusion.library.model import load_model, model_fingerprint

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
