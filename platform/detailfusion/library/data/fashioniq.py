"""Reader of FashionIQ's on-disk format: ``captions/cap.{category}.{split}.json``,
``image_splits/split.{category}.{split}.json`` and ``images/<name>.png``.

Text: evaluation uses ``"c1 and c2"``; training samples one of ``"c1 and c2"``, ``"c2 and c1"``, ``c1``, ``c2``.
A pair with one empty caption keeps the other one (the field's loaders keep such val queries, so the
protocol's query count holds) and is listed in ``warnings``; with both empty it is quarantined in train and kept
with empty text (the candidate image alone, warned) in val and test, whose every query must be answered. The test
split's records name no ``target`` (``target_id`` is None).
"""

from __future__ import annotations

from pathlib import Path

from detailfusion.library.data.reading import ReadResult, load_json, require_fields
from detailfusion.library.data.schema import Quarantined, normalize_text
from detailfusion.library.errors import ConfigError

CATEGORIES = ("dress", "shirt", "toptee")
SPLITS = ("train", "val", "test")


def read_fashioniq(root: str | Path, split: str, categories=CATEGORIES) -> ReadResult:
    root = Path(root)
    if split not in SPLITS:
        raise ConfigError(f"FashionIQ split must be one of {', '.join(SPLITS)}, got {split!r}")
    unknown = sorted(set(categories) - set(CATEGORIES))
    if unknown:
        raise ConfigError(f"unknown FashionIQ categories {unknown}; known: {', '.join(CATEGORIES)}")
    result = ReadResult()
    for category in categories:
        _read_category(root, split, category, result)
    return result


def _read_category(root: Path, split: str, category: str, result: ReadResult) -> None:
    split_file = root / "image_splits" / f"split.{category}.{split}.json"
    caption_file = root / "captions" / f"cap.{category}.{split}.json"
    names = load_json(split_file, list, result)
    records = load_json(caption_file, list, result)
    if names is None or records is None:
        return
    gallery: set[str] = set()
    for index, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            result.bad.append(Quarantined(str(split_file), f"#{index}", "image name is not a non-empty string", "image"))
        elif name in gallery:
            result.bad.append(Quarantined(str(split_file), f"#{index} ({name})", f"duplicate image name {name}", "image"))
        else:
            gallery.add(name)
            result.gallery.append(
                dict(image_id=name, dataset="fashioniq", split=split, location=f"images/{name}.png", category=category)
            )
    seen: set = set()
    labelled = split != "test"
    for index, rec in enumerate(records):
        problem = require_fields(rec, ("candidate", "captions") + (("target",) if labelled else ()))
        if problem is None and (not isinstance(rec["captions"], list) or not rec["captions"]):
            problem = "captions is not a non-empty list"
        if problem is None:
            target = rec.get("target") if labelled else None
            key = (rec["candidate"], target, tuple(map(str, rec["captions"])))
            if key in seen:
                problem = f"duplicate of an earlier record (candidate {rec['candidate']}, target {target})"
            seen.add(key)
        if problem is None:
            absent = [n for n in (rec["candidate"], target) if n is not None and n not in gallery]
            if absent:
                problem = f"image(s) not in {split_file.name}: {', '.join(absent)}"
        captions = [normalize_text(str(c)) for c in rec["captions"]] if problem is None else []
        kept = [c for c in captions if c]
        if problem is None and not kept and split == "train":
            problem = "empty captions"
        if problem is not None:
            result.bad.append(Quarantined(str(caption_file), f"#{index}", problem))
            continue
        if not kept:
            result.warnings.append(f"{caption_file}#{index}: empty captions, answered from the candidate image alone")
        elif len(kept) < len(captions):
            result.warnings.append(f"{caption_file}#{index}: {len(captions) - len(kept)} empty caption(s), kept the rest")
        text = " and ".join(kept)
        variants = [text] if len(kept) <= 1 else [text, " and ".join(reversed(kept)), *kept]
        result.triplets.append(
            dict(
                sample_id=f"fashioniq/{split}/{category}/{index}",
                dataset="fashioniq",
                split=split,
                reference_id=rec["candidate"],
                target_id=target,
                text=text,
                text_variants=variants,
                subset_ids=[],
                category=category,
            )
        )
