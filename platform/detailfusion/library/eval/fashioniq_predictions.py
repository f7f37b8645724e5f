"""FashionIQ predictions for a split without targets (the test split): one file per category,
``fashioniq_<split>_<category>.json``, a JSON list in the order of the category's caption file
(``captions/cap.<category>.<split>.json``), each item the annotation record's own keys plus its answer:

    {"candidate": "<image id>", "captions": ["...", "..."], "ranking": [50 image ids of the category, best first]}

FashionIQ names a query by its record (candidate and captions) and position in that file, so the files keep both.
``check_predictions`` is run before anything is written: every record of the caption file must be answered.
"""

from __future__ import annotations

import json
from pathlib import Path

from detailfusion.library.eval.submission import SubmissionError, _short

LIST_LENGTH = 50


def file_name(split: str, category: str) -> str:
    return f"fashioniq_{split}_{category}.json"


def predictions(records: list[dict], rankings: dict[int, list[str]]) -> list[dict]:
    """The file's list: each caption record (its candidate and captions) with the ranking of its position."""
    return [{"candidate": record.get("candidate"), "captions": record.get("captions"), "ranking": rankings.get(i)}
            for i, record in enumerate(records)]


def check_predictions(data: list, records: list[dict], gallery: set[str], where: str = "predictions") -> None:
    """Raise ``SubmissionError`` listing everything wrong with ``data`` as the predictions for ``records`` (one
    category's caption file) over that category's ``gallery`` of image ids."""
    if not isinstance(data, list):
        raise SubmissionError(where, [f"top level is a {type(data).__name__}, expected a JSON list"])
    problems = []
    if len(data) != len(records):
        problems.append(f"{len(data)} predictions for {len(records)} caption records")
    length = min(LIST_LENGTH, len(gallery))
    unanswered = []
    for i, (item, record) in enumerate(zip(data, records)):
        if not isinstance(item, dict) or item.get("candidate") != record.get("candidate") \
                or item.get("captions") != record.get("captions"):
            problems.append(f"#{i}: does not repeat caption record #{i} (candidate and captions)")
            continue
        ranking = item.get("ranking")
        if ranking is None:
            unanswered.append(f"#{i}")
            continue
        if not isinstance(ranking, list) or len(ranking) != length or len(set(ranking)) != length:
            problems.append(f"#{i}: ranking must hold {length} distinct image ids")
        elif not set(ranking) <= gallery:
            problems.append(f"#{i}: ids outside the category's gallery: {_short(sorted(set(ranking) - gallery))}")
    if unanswered:
        problems.append(f"{len(unanswered)} caption record(s) unanswered (quarantined by prepare?): {_short(unanswered)}")
    if problems:
        raise SubmissionError(where, problems)


def write_predictions(folder: str | Path, split: str, by_category: dict[str, list[dict]]) -> dict[str, str]:
    """Write each category's checked predictions; returns {category: path}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for category, items in by_category.items():
        path = folder / file_name(split, category)
        path.write_text(json.dumps(items))
        paths[category] = str(path)
    return paths
