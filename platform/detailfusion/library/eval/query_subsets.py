"""Every variant's metrics on subsets of a labelled split's queries, each under the split's own protocol
(``protocols.SplitRanks``): the queries of each tag value (edit family, direction) and the unimodal-hard queries,
those that neither the image-only nor the text-only baseline solves. The field has measured why the latter matters:
32-84 % of the queries of the standard CIR benchmarks are solvable from one modality (arXiv 2605.14787)."""

from __future__ import annotations

import torch

from detailfusion.library.eval.protocols import SplitRanks

UNIMODAL = ("image_only", "text_only")
SOLVED_K = 10


def unimodal_hard_definition(k: int = SOLVED_K) -> str:
    return (f"the queries whose target is in the top {k} of neither image_only (the reference image alone) nor "
            "text_only (the text alone), each ranked under the split's protocol; every variant's metrics on them, "
            "same protocol")


def by_tag(ranks: SplitRanks, variants: list[str], labels: list[str | None]) -> tuple[dict, dict]:
    """({label: {variant: metrics}}, {label: query count}) over the queries of each label, labels sorted;
    queries labelled None are left out. labels: [Q], in the ranks' query order."""
    groups: dict[str, list[int]] = {}
    for q, label in enumerate(labels):
        if label is not None:
            groups.setdefault(label, []).append(q)
    groups = dict(sorted(groups.items()))
    metrics = {label: {v: ranks.metrics(v, torch.tensor(rows)) for v in variants} for label, rows in groups.items()}
    return metrics, {label: len(rows) for label, rows in groups.items()}


def unimodal_hard(ranks: SplitRanks, variants: list[str], k: int = SOLVED_K) -> dict:
    """{"definition", "k", "queries": count, "solved_by": {image_only, text_only, either: counts out of all
    queries}, "variants": {variant: metrics on the hard queries} ({} when there are none)}."""
    absent = [v for v in UNIMODAL if v not in ranks.gallery]
    if absent:
        raise ValueError(f"unimodal-hard queries need the {' and '.join(absent)} variant's ranks")
    image, text = (ranks.solved(v, k) for v in UNIMODAL)
    rows = torch.nonzero(~(image | text)).flatten()
    return {"definition": unimodal_hard_definition(k), "k": k, "queries": len(rows),
            "solved_by": {"image_only": int(image.sum()), "text_only": int(text.sum()),
                          "either": int((image | text).sum())},
            "variants": {v: ranks.metrics(v, rows) for v in variants} if len(rows) else {}}
