"""Reader of CIRR's on-disk format: ``captions/cap.rc2.{split}.json`` + ``image_splits/split.rc2.{split}.json``.

Produces canonical triplet and gallery rows (``schema.py``); records that cannot be used go to quarantine with
their file, pairid/index and reason. test1 has no targets (``target_id`` is None).

A query with a blank caption teaches nothing, so train quarantines it; in val and test1 it is a question the
protocol (and the test server) expects an answer to, so it is kept with empty text (the reference image alone)
and listed in ``warnings``.
"""

from __future__ import annotations

from pathlib import Path

from detailfusion.library.data.reading import ReadResult, load_json, require_fields
from detailfusion.library.data.schema import Quarantined, normalize_text
from detailfusion.library.errors import ConfigError

SPLITS = ("train", "val", "test1")


def read_cirr(root: str | Path, split: str) -> ReadResult:
    root = Path(root)
    if split not in SPLITS:
        raise ConfigError(f"CIRR split must be one of {', '.join(SPLITS)}, got {split!r}")
    result = ReadResult()
    split_file = root / "image_splits" / f"split.rc2.{split}.json"
    caption_file = root / "captions" / f"cap.rc2.{split}.json"
    images = load_json(split_file, dict, result)
    records = load_json(caption_file, list, result)
    if images is None or records is None:
        return result
    for name, location in images.items():
        if not isinstance(location, str) or not location.strip():
            result.bad.append(Quarantined(str(split_file), name, "image path is not a non-empty string", "image"))
            continue
        result.gallery.append(dict(image_id=name, dataset="cirr", split=split, location=location, category=None))
    labelled = split != "test1"
    fields = ("pairid", "reference", "caption", "img_set") + (("target_hard",) if labelled else ())
    seen: set = set()
    for index, rec in enumerate(records):
        where = f"#{index}" + (f" (pairid {rec.get('pairid')})" if isinstance(rec, dict) and "pairid" in rec else "")
        problem = require_fields(rec, fields)
        if problem is None and rec["pairid"] in seen:
            problem = f"duplicate pairid {rec['pairid']}"
        if problem is None and split == "train" and not normalize_text(str(rec["caption"])):
            problem = "empty caption"
        if problem is None:
            members = rec["img_set"].get("members") if isinstance(rec["img_set"], dict) else None
            if not isinstance(members, list):
                problem = "img_set.members missing or not a list"
        if problem is None:
            named = [rec["reference"]] + ([rec["target_hard"]] if labelled else []) + members
            absent = [n for n in named if n not in images]
            if absent:
                problem = f"image(s) not in {split_file.name}: {', '.join(sorted(set(absent)))}"
        if problem is not None:
            result.bad.append(Quarantined(str(caption_file), where, problem))
            continue
        seen.add(rec["pairid"])
        text = normalize_text(str(rec["caption"]))
        if not text:
            result.warnings.append(f"{caption_file} pairid {rec['pairid']}: empty caption, answered from the reference "
                                   "image alone")
        result.triplets.append(
            dict(
                sample_id=f"cirr/{split}/{rec['pairid']}",
                dataset="cirr",
                split=split,
                reference_id=rec["reference"],
                target_id=rec["target_hard"] if labelled else None,
                text=text,
                text_variants=[text],
                subset_ids=list(members),
                category=None,
            )
        )
    return result
