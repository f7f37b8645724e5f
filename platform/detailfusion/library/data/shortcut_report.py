"""The shortcut report of a benchmark v2 split, before any training: what scorers that do not compose image and text
reach, per edit family and direction (``synthetic_detail``; CIRR protocol of ``synthetic_difficulty.cirr_recall``).

Scorers (each (Q, N) scores over the split's images; ties break at random):
* random: uniform scores (chance: R@K = K / (N - 1), Rs@K = K / 5);
* pixel NN (image only): cosine of box-downsampled, mean-centred ``side`` x ``side`` RGB (``synthetic_difficulty``);
* text only: a perfect reader of the caption that never sees the reference: 1 where the image's scene shows the
  edit's result as the text states it (the new shape's kind, colour and any cell or size named; a removed shape
  absent; the look attribute's new value, e.g. the orientation a rotation ends at), read from the generator's
  ground truth (so it also knows what "brighter" or "a quarter turn" ends at: an upper bound of reading the text);
* late fusion (image + text, no composition): the text-only score plus the pixel NN's cosine (in [-1, 1]) / 4, i.e.
  the pixel-nearest image among those that satisfy the text;
* oracle: 1 where the image's scene is the reference's scene with the caption's edit applied (ground truth).
A benchmark that needs composition keeps pixel NN, text-only and late fusion well below the oracle.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from detailfusion.library.data.query_tags import DIRECTIONS, FAMILIES, read_query_tags
from detailfusion.library.data.synthetic_detail import DetailScene, LookEdit, apply, edit_from_record, scene_from_record
from detailfusion.library.data.synthetic_difficulty import (
    Queries,
    cirr_recall,
    image_only_scores,
    load_queries,
    random_scores,
)

SCORERS = ("random", "pixel_nn", "text_only", "late_fusion", "oracle")


def shortcut_report(root: str | Path, split: str = "test1", side: int = 16, seed: int = 0) -> dict:
    """{scorer: {"all": metrics, "local/forward": metrics, ...}, "queries": {cell: count}} for a v2 split."""
    root = Path(root)
    queries = load_queries(root, split)
    scenes = json.loads((root / "synthetic" / f"scenes.{split}.json").read_text())
    edits = json.loads((root / "synthetic" / f"edits.{split}.json").read_text())
    records = json.loads((root / "captions" / f"cap.rc2.{split}.json").read_text())
    gallery = [scene_from_record(scenes[name]) for name in queries.gallery]
    query_edits = [edit_from_record(edits[str(r["pairid"])]) for r in records]
    tags = read_query_tags(root, split)
    query_tags = [tags[f"cirr/{split}/{r['pairid']}"] for r in records]
    cells = [f"{t.edit_family}/{t.direction}" for t in query_tags]
    pixels = image_only_scores(root, queries, side).astype(np.float32)
    text = text_only_scores(gallery, query_edits)

    def scores(scorer: str) -> np.ndarray:  # one (Q, N) array at a time: 4,000 x 30,000 floats are 0.5 GB
        noise = random_scores(queries, seed).astype(np.float32)  # ties break at random
        if scorer == "random":
            return noise
        if scorer == "pixel_nn":
            return pixels
        if scorer == "text_only":
            return text + noise * 1e-3
        if scorer == "late_fusion":
            return text + pixels / 4 + noise * 1e-3
        return oracle_scores(gallery, queries, query_edits) + noise * 1e-3

    names = [f"{f}/{d}" for f in FAMILIES for d in DIRECTIONS]
    report = {"queries": {"all": len(records), **{c: cells.count(c) for c in names}}}
    for scorer in SCORERS:
        values = scores(scorer)
        report[scorer] = {"all": cirr_recall(values, queries)}
        for cell in names:
            mask = np.array([c == cell for c in cells])
            if mask.any():
                report[scorer][cell] = cirr_recall(values[mask], _subset(queries, mask))
        del values
    return report


def _subset(queries: Queries, mask: np.ndarray) -> Queries:
    return replace(queries, reference=queries.reference[mask], target=queries.target[mask],
                   members=queries.members[mask], captions=[c for c, m in zip(queries.captions, mask) if m])


def text_only_scores(gallery: list[DetailScene], edits: list) -> np.ndarray:
    """(Q, N): 1 where the image shows what the caption states of the result, without the reference."""
    index: dict[tuple, list[int]] = {}  # every fact an image shows -> the images showing it
    for g, scene in enumerate(gallery):
        facts = [("look", name, value) for name, value in vars(scene.look).items()]
        for s in scene.shapes:
            facts += [("shape", s.kind, s.colour), ("cell", s.kind, s.colour, s.cell), ("size", s.kind, s.colour, s.size),
                      ("cell+size", s.kind, s.colour, s.cell, s.size)]
        for fact in facts:
            index.setdefault(fact, []).append(g)
    out = np.zeros((len(edits), len(gallery)), dtype=np.float32)
    for q, edit in enumerate(edits):
        if isinstance(edit, LookEdit):
            fact = ("look", edit.attribute, edit.after)
        elif edit.after is None:  # remove: the named shape is gone
            out[q] = 1
            fact, value = ("shape", edit.before.kind, edit.before.colour), 0
            out[q, index.get(fact, [])] = value
            continue
        else:
            a = edit.after
            fact = {"add": ("cell+size", a.kind, a.colour, a.cell, a.size), "move": ("cell", a.kind, a.colour, a.cell),
                    "resize": ("size", a.kind, a.colour, a.size)}.get(edit.type, ("shape", a.kind, a.colour))
        out[q, index.get(fact, [])] = 1
    return out


def oracle_scores(gallery: list[DetailScene], queries: Queries, edits: list) -> np.ndarray:
    """(Q, N): 1 where the image's scene is the reference's with the query's edit applied."""
    row = {scene.key(): g for g, scene in enumerate(gallery)}
    out = np.zeros((len(edits), len(gallery)), dtype=np.float32)
    for q, (reference, edit) in enumerate(zip(queries.reference, edits)):
        wanted = row.get(apply(edit, gallery[reference]).key())
        if wanted is not None:
            out[q, wanted] = 1
    return out


def shortcut_table(report: dict, metrics: tuple[str, ...] = ("R@1", "R@5", "Rs@1")) -> str:
    """The report as a markdown table: a row per scorer, a column per (cell, metric)."""
    cells = ["all"] + [c for c in report["queries"] if c != "all"]
    head = "| scorer | " + " | ".join(f"{c} {m}" for c in cells for m in metrics) + " |"
    rule = "|---|" + "---:|" * (len(cells) * len(metrics))
    rows = [f"| {scorer} | " + " | ".join(f"{report[scorer][c][m]:.1f}" if c in report[scorer] else "-"
                                          for c in cells for m in metrics) + " |" for scorer in SCORERS]
    counts = ", ".join(f"{c} {n}" for c, n in report["queries"].items())
    return "\n".join([head, rule, *rows, "", f"queries: {counts}"])
