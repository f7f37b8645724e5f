"""How hard a synthetic CIRR root is, without a trained model: scorers read only the files on disk.

* image-only: cosine similarity of box-downsampled pixels (``side`` x ``side`` RGB, each image mean-centred)
  between the reference and every image of the split;
* random: uniform scores (chance: R@K = K / (N - 1), Rs@K = K / 5);
* oracle: the ground-truth scenes (synthetic/scenes.<split>.json) and the caption: an image scores 1 when one
  atomic edit turns the reference's scene into it and the caption names that edit's shapes, colours, cell and size.

CIRR protocol: R@K ranks the split's whole image list minus the reference; Rs@K the img_set members minus the
reference. Ties break at random.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from detailfusion.library.data.synthetic_scenes import CELLS, Edit, Shape

RECALL_AT = (1, 5, 10, 50)
SUBSET_RECALL_AT = (1, 2, 3)


@dataclass(frozen=True)
class Queries:
    """A split's queries as indices into its image list ``gallery`` (N names)."""

    gallery: list[str]
    locations: list[str]  # (N,) paths relative to the root
    reference: np.ndarray  # (Q,) int
    target: np.ndarray  # (Q,) int
    members: np.ndarray  # (Q, M) int, the img_set members
    captions: list[str]  # (Q,)


def load_queries(root: str | Path, split: str = "test1") -> Queries:
    """The split's queries; test1 targets come from synthetic/test1_targets.json (hidden from the captions)."""
    root = Path(root)
    images = json.loads((root / "image_splits" / f"split.rc2.{split}.json").read_text())
    records = json.loads((root / "captions" / f"cap.rc2.{split}.json").read_text())
    hidden = json.loads((root / "synthetic" / "test1_targets.json").read_text()) if split == "test1" else {}
    index = {name: i for i, name in enumerate(images)}
    targets = [rec["target_hard"] if split != "test1" else hidden[str(rec["pairid"])] for rec in records]
    return Queries(
        gallery=list(images),
        locations=list(images.values()),
        reference=np.array([index[rec["reference"]] for rec in records]),
        target=np.array([index[t] for t in targets]),
        members=np.array([[index[m] for m in rec["img_set"]["members"]] for rec in records]),
        captions=[rec["caption"] for rec in records],
    )


def cirr_recall(scores: np.ndarray, queries: Queries) -> dict[str, float]:
    """R@K and Rs@K in percent from ``scores`` (Q, N), higher = better; the reference never counts."""
    rows = np.arange(len(scores))
    scores = scores.astype(np.float64, copy=True)
    scores[rows, queries.reference] = -np.inf
    target = scores[rows, queries.target][:, None]
    rank = (scores > target).sum(axis=1)
    member_scores = np.take_along_axis(scores, queries.members, axis=1)  # the reference's own score is -inf
    subset_rank = (member_scores > target).sum(axis=1)
    metrics = {f"R@{k}": 100 * float((rank < k).mean()) for k in RECALL_AT}
    metrics |= {f"Rs@{k}": 100 * float((subset_rank < k).mean()) for k in SUBSET_RECALL_AT}
    return metrics


def pixel_features(root: str | Path, queries: Queries, side: int = 16) -> np.ndarray:
    """(N, 3 * side * side) float32: box-downsampled RGB, each image mean-centred and L2-normalised."""
    root = Path(root)
    pixels = np.stack([
        np.asarray(Image.open(root / loc).convert("RGB").resize((side, side), Image.BOX), dtype=np.float32).ravel()
        for loc in queries.locations
    ])
    pixels -= pixels.mean(axis=1, keepdims=True)
    return pixels / np.maximum(np.linalg.norm(pixels, axis=1, keepdims=True), 1e-6)


def image_only_scores(root: str | Path, queries: Queries, side: int = 16) -> np.ndarray:
    """(Q, N) pixel cosine similarity of each query's reference to every image."""
    features = pixel_features(root, queries, side)
    return features[queries.reference] @ features.T


def random_scores(queries: Queries, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((len(queries.reference), len(queries.gallery)))


def oracle_scores(root: str | Path, queries: Queries, split: str = "test1", seed: int = 0) -> np.ndarray:
    """(Q, N): 1 where a caption-consistent atomic edit turns the reference's scene into the image, else 0; plus
    tie-break noise in [0, 0.5)."""
    scenes = json.loads((Path(root) / "synthetic" / f"scenes.{split}.json").read_text())
    shapes = [frozenset(Shape(*s) for s in scenes[name]["shapes"]) for name in queries.gallery]
    by_background: dict[tuple, list[int]] = {}
    for g, name in enumerate(queries.gallery):
        by_background.setdefault(tuple(scenes[name]["background"]), []).append(g)
    scores = np.random.default_rng(seed).random((len(queries.reference), len(queries.gallery))) / 2
    for q, (ref, caption) in enumerate(zip(queries.reference, queries.captions)):
        text = caption.lower().rstrip(".")
        for g in by_background[tuple(scenes[queries.gallery[ref]]["background"])]:
            before, after = shapes[ref] - shapes[g], shapes[g] - shapes[ref]
            if len(before) <= 1 and len(after) <= 1 and (before or after):
                scores[q, g] += _caption_names(text, Edit(next(iter(before), None), next(iter(after), None)))
    return scores


def _caption_names(text: str, edit: Edit) -> bool:
    """Whether ``text`` (one of describe()'s phrasings, lower case) names ``edit``, an atomic edit: the shape it
    changes and the new colour, kind, cell or size."""
    b, a, kind = edit.before, edit.after, edit.type
    if b is not None and a is not None and sum(x != y for x, y in zip(vars(b).values(), vars(a).values())) != 1:
        return False  # more than one attribute changed: no atomic edit
    if b is not None and b.name not in text and f"{b.kind} that is {b.colour}" not in text:
        return False
    if kind == "recolour":
        return text.endswith(f" {a.colour}")
    if kind == "reshape":
        return re.search(rf"\ba ({a.colour} )?{a.kind}\b", text) is not None
    if kind == "add":
        other_size = "large" if a.size == "small" else "small"
        return a.name in text and f"{other_size} {a.name}" not in text and _names_cell(text, a.cell)
    if kind == "move":
        return _names_cell(text, a.cell)
    if kind == "resize":
        words = ("bigger", "enlarge") if a.size == "large" else ("smaller", "shrink")
        return any(w in text.split() for w in words)
    return re.search(r"\b(remove|delete|take away|get rid of|no)\b", text) is not None  # remove


def _names_cell(text: str, cell: int) -> bool:
    return re.search(rf"\bthe {CELLS[cell]}( instead)?$", text) is not None


def difficulty(root: str | Path, split: str = "test1", side: int = 16, seed: int = 0) -> dict[str, dict[str, float]]:
    """Recall of the image-only, random and oracle scorers on ``split`` of a synthetic CIRR root."""
    queries = load_queries(root, split)
    return {
        "image-only": cirr_recall(image_only_scores(root, queries, side), queries),
        "random": cirr_recall(random_scores(queries, seed), queries),
        "oracle": cirr_recall(oracle_scores(root, queries, split, seed), queries),
    }
