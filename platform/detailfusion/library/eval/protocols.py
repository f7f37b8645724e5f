"""The field's protocols over variant scores (METHOD.md "Evaluation protocol"): CIRR (val metrics and test1
submission rankings) and FashionIQ (per-category galleries). Inputs are canonical triplet rows, the gallery
index and ``{variant: queries}``; outputs are flat metric dicts and name rankings.

A ``Protocol`` is what a dataset's registration (``library/datasets.py``) names for its evaluation: the per-query
target ranks of a labelled split (``split_ranks``), the prediction files of any split (``write_predictions``) and
the caption files those are checked against (``caption_files``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import torch

from detailfusion.library.eval import fashioniq_predictions
from detailfusion.library.eval.metrics import cirr_rank_metrics, fashioniq_metrics, target_ranks, top_k
from detailfusion.library.eval.submission import FILE_NAMES, LIST_LENGTH, check_submission, submission
from detailfusion.library.eval.variants import variant_scores
from detailfusion.library.index.exact import GalleryIndex

CIRR_PROTOCOL = ("CIRR: the whole split gallery is ranked with the query's reference removed (R@1/5/10/50); subset "
                 "recall Rs@1/2/3 ranks the query's img_set.members minus the reference; Avg = (R@5 + Rs@1) / 2")
FASHIONIQ_PROTOCOL = ("FashionIQ: each category's queries rank that category's split gallery, nothing removed; "
                      "R@10/R@50 per category, their means, Avg = mean of R@10 and R@50")


@dataclass
class SplitRanks:
    """Every variant's 0-based target rank per query [Q] under a labelled split's protocol, and the protocol's
    metrics of any subset of its queries. ``gallery``: {variant: [Q]} ranks over what the protocol ranks (CIRR: the
    split gallery without the query's reference; FashionIQ: the query's category gallery); ``subset`` (CIRR only):
    {variant: [Q]} ranks over the img_set members without the reference; ``categories`` (FashionIQ only): each
    query's category."""

    gallery: dict[str, torch.Tensor]
    subset: dict[str, torch.Tensor] | None = None
    categories: list[str] | None = None

    def metrics(self, variant: str, rows: torch.Tensor | None = None) -> dict[str, float]:
        """The protocol's metrics of ``variant`` over the queries ``rows`` (indices; all when None)."""
        ranks = self.gallery[variant] if rows is None else self.gallery[variant][rows]
        if self.subset is not None:
            return cirr_rank_metrics(ranks, self.subset[variant] if rows is None else self.subset[variant][rows])
        categories = self.categories if rows is None else [self.categories[q] for q in rows.tolist()]
        return fashioniq_metrics({c: ranks[torch.tensor([x == c for x in categories])]
                                  for c in dict.fromkeys(categories)})

    def solved(self, variant: str, k: int) -> torch.Tensor:
        """[Q] bool: the target is within ``variant``'s top ``k`` under the protocol."""
        return self.gallery[variant] < k


class CirrQueries:
    """Gallery positions of each query's reference, target (None for test1) and subset members."""

    def __init__(self, triplets: pa.Table, index: GalleryIndex):
        rows = triplets.to_pylist()
        self.pairids = [r["sample_id"].rsplit("/", 1)[-1] for r in rows]
        self.references = torch.tensor([index.position[r["reference_id"]] for r in rows])
        labelled = [r["target_id"] is not None for r in rows]
        if any(labelled) and not all(labelled):
            raise ValueError("the split mixes labelled and unlabelled triplets")
        self.targets = torch.tensor([index.position[r["target_id"]] for r in rows]) if all(labelled) else None
        self.subset = torch.zeros(len(rows), len(index), dtype=torch.bool)
        for q, r in enumerate(rows):
            self.subset[q, [index.position[m] for m in r["subset_ids"]]] = True
        self.is_reference = torch.zeros_like(self.subset)
        self.is_reference[torch.arange(len(rows)), self.references] = True

    def ranks(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """0-based target ranks [Q] over the gallery without the reference, and over the subset without it."""
        return (target_ranks(scores, self.targets, self.is_reference),
                target_ranks(scores, self.targets, ~self.subset | self.is_reference))

    def rankings(self, scores: torch.Tensor, names: list[str]) -> tuple[dict, dict]:
        """The two submission rankings {pairid: names best first}: top 50 without the reference, and the top 3
        of the subset without the reference."""
        recall = top_k(scores, min(LIST_LENGTH["recall"], scores.shape[1] - 1), self.is_reference)
        subset = [top_k(scores[q:q + 1], min(LIST_LENGTH["recall_subset"], int(keep.sum())), ~keep[None])[0]
                  for q, keep in enumerate(self.subset & ~self.is_reference)]
        as_names = lambda rows: {p: [names[i] for i in row.tolist()] for p, row in zip(self.pairids, rows)}  # noqa: E731
        return as_names(recall), as_names(subset)


def category_galleries(gallery: pa.Table, index: GalleryIndex) -> dict[str, torch.Tensor]:
    """{category: index rows of its split gallery}; ``gallery`` holds (image_id, category) rows."""
    galleries: dict[str, list[int]] = {}
    for image_id, category in zip(gallery.column("image_id").to_pylist(), gallery.column("category").to_pylist()):
        galleries.setdefault(category, []).append(index.position[image_id])
    return {category: torch.tensor(rows) for category, rows in galleries.items()}


def fashioniq_rankings(triplets: pa.Table, gallery: pa.Table, index: GalleryIndex, queries: dict[str, torch.Tensor],
                       variant: str, seed: int = 0, length: int = 50) -> dict[str, dict[int, list[str]]]:
    """{category: {record number in the category's caption file: the best ``length`` image ids of the category's
    gallery, best first}} of one variant (FashionIQ's protocol: nothing removed)."""
    categories = triplets.column("category").to_pylist()
    records = [int(s.rsplit("/", 1)[-1]) for s in triplets.column("sample_id").to_pylist()]
    rankings: dict[str, dict[int, list[str]]] = {}
    for category, rows in category_galleries(gallery, index).items():
        members = torch.tensor([q for q, c in enumerate(categories) if c == category], dtype=torch.long)
        if not len(members):
            continue
        scores = variant_scores(variant, {k: v[members] for k, v in queries.items()}, index, rows, seed)
        best = top_k(scores, min(length, len(rows)))
        rankings[category] = {records[q]: [index.image_ids[rows[j]] for j in row.tolist()]
                              for q, row in zip(members.tolist(), best)}
    return rankings


def fashioniq_split_ranks(triplets: pa.Table, gallery: pa.Table, index: GalleryIndex,
                          queries: dict[str, torch.Tensor], variants: list[str], seed: int = 0) -> SplitRanks:
    """Every variant's target ranks within each query's category gallery; ``gallery`` holds (image_id, category)
    rows of the split's galleries."""
    categories = triplets.column("category").to_pylist()
    targets = triplets.column("target_id").to_pylist()
    galleries = category_galleries(gallery, index)
    ranks = {variant: torch.zeros(len(categories), dtype=torch.long) for variant in variants}
    for category in dict.fromkeys(categories):
        members = torch.tensor([q for q, c in enumerate(categories) if c == category])
        rows = galleries[category]
        column = {int(r): j for j, r in enumerate(rows)}
        target_columns = torch.tensor([column[index.position[targets[q]]] for q in members.tolist()])
        for variant in variants:
            scores = variant_scores(variant, {k: v[members] for k, v in queries.items()}, index, rows, seed)
            ranks[variant][members] = target_ranks(scores, target_columns)
    return SplitRanks(ranks, categories=categories)


class Protocol:
    """One evaluation protocol. ``gallery``: the split's (image_id, category) rows; ``queries``: {variant: unified
    queries}; ``annotations``: {key: records} of ``caption_files``."""

    description: str
    predictions_key: str  # metrics.json's key of the written prediction files

    def caption_files(self, split: str, categories: list[str]) -> dict[str | None, str]:
        """{key: path relative to the dataset root} of the caption files predictions must answer in full."""
        raise NotImplementedError

    def split_ranks(self, triplets: pa.Table, gallery: pa.Table, index: GalleryIndex, queries: dict,
                    variants: list[str], seed: int = 0) -> SplitRanks:
        raise NotImplementedError

    def write_predictions(self, out: Path, split: str, triplets: pa.Table, gallery: pa.Table, index: GalleryIndex,
                          queries: dict, variants: list[str], annotations: dict, main: str, labelled: bool,
                          seed: int = 0) -> dict | None:
        """{variant: written paths} (checked against ``annotations`` first; ``main``'s also into ``out``), or None
        when the protocol writes none for this split."""
        raise NotImplementedError


class CirrProtocol(Protocol):
    description = CIRR_PROTOCOL
    predictions_key = "submissions"

    def caption_files(self, split, categories):
        return {None: f"captions/cap.rc2.{split}.json"}

    def split_ranks(self, triplets, gallery, index, queries, variants, seed=0):
        cirr = CirrQueries(triplets, index)
        ranks = SplitRanks({}, {})
        for variant in variants:
            ranks.gallery[variant], ranks.subset[variant] = cirr.ranks(variant_scores(variant, queries, index,
                                                                                      seed=seed))
        return ranks

    def write_predictions(self, out, split, triplets, gallery, index, queries, variants, annotations, main, labelled,
                          seed=0):
        cirr, written = CirrQueries(triplets, index), {}
        for variant in variants:
            recall, subset = cirr.rankings(variant_scores(variant, queries, index, seed=seed), index.image_ids)
            for metric, rankings in (("recall", recall), ("recall_subset", subset)):
                check_submission(submission(metric, rankings), metric, annotations[None],
                                 f"{variant} {metric} rankings of {split}", gallery_size=len(index))
            written[variant] = _write_rankings(out, split, variant, recall, subset, main=variant == main)
        return written


class FashionIQProtocol(Protocol):
    description = FASHIONIQ_PROTOCOL
    predictions_key = "predictions"

    def caption_files(self, split, categories):
        return {category: f"captions/cap.{category}.{split}.json" for category in categories}

    def split_ranks(self, triplets, gallery, index, queries, variants, seed=0):
        return fashioniq_split_ranks(triplets, gallery, index, queries, variants, seed)

    def write_predictions(self, out, split, triplets, gallery, index, queries, variants, annotations, main, labelled,
                          seed=0):
        if labelled:  # the val split is scored, not submitted
            return None
        members: dict[str, set[str]] = {}  # each category's gallery ids, what a ranking may name
        for image_id, category in zip(gallery.column("image_id").to_pylist(), gallery.column("category").to_pylist()):
            members.setdefault(category, set()).add(image_id)
        return {variant: _write_fashioniq_predictions(
            out, split, variant, fashioniq_rankings(triplets, gallery, index, queries, variant, seed), annotations,
            members, main=variant == main) for variant in variants}


def _write_rankings(out: Path, split: str, variant: str, recall: dict, subset: dict, main: bool) -> dict[str, str]:
    paths = {}
    folders = [out / "submissions" / variant] + ([out] if main else [])
    for metric, rankings in (("recall", recall), ("recall_subset", subset)):
        name = FILE_NAMES[metric].replace("test1", split)
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(json.dumps(submission(metric, rankings)))
        paths[metric] = str(folders[-1] / name)
    return paths


def _write_fashioniq_predictions(out: Path, split: str, variant: str, rankings: dict[str, dict[int, list[str]]],
                                 annotations: dict[str, list[dict]], members: dict[str, set[str]],
                                 main: bool) -> dict[str, str]:
    """Check one variant's rankings against every caption record, then write them (also to ``out`` if ``main``)."""
    by_category = {}
    for category, records in annotations.items():
        by_category[category] = fashioniq_predictions.predictions(records, rankings.get(category, {}))
        fashioniq_predictions.check_predictions(by_category[category], records, members.get(category, set()),
                                                f"{variant} predictions of {category} {split}")
    paths = fashioniq_predictions.write_predictions(out / "submissions" / variant, split, by_category)
    if main:
        paths = fashioniq_predictions.write_predictions(out, split, by_category)
    return paths
