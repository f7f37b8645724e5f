"""CIRR test submissions: write the two files the official server takes, check them, and score them against
labelled annotations the way the server does (METHOD.md).

``recall``: ``{"version": "rc2", "metric": "recall", "<pairid>": [50 image names, best first]}`` over the
whole gallery without the reference; ``recall_subset``: the same with ``"recall_subset"`` and the best 3 of
the query's ``img_set.members`` without the reference. The server scores R@K / Rs@K as "the target is among
the first K names". With the split's image list (``image_splits/split.rc2.<split>.json``) every name must be one
of its images, as the server's gallery is.
"""

from __future__ import annotations

import json
from pathlib import Path

from detailfusion.library.errors import DataError
from detailfusion.library.eval.metrics import CIRR_KS, CIRR_SUBSET_KS

VERSION = "rc2"
LIST_LENGTH = {"recall": 50, "recall_subset": 3}
FILE_NAMES = {"recall": "cirr_test1_recall.json", "recall_subset": "cirr_test1_recall_subset.json"}


class SubmissionError(DataError):
    """A submission that is malformed or incomplete; ``problems`` lists every finding."""

    def __init__(self, where: str, problems: list[str]):
        self.problems = problems
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        super().__init__(f"{where}: {len(problems)} problem(s):\n  " + "\n  ".join(shown))


def submission(metric: str, rankings: dict[str, list[str]]) -> dict:
    """The server's JSON object for ``metric`` from {pairid: names best first} (cut to the list length)."""
    return {"version": VERSION, "metric": metric, **{str(p): names[: LIST_LENGTH[metric]] for p, names in rankings.items()}}


def write_submissions(out: str | Path, recall: dict[str, list[str]], recall_subset: dict[str, list[str]]) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for metric, rankings in (("recall", recall), ("recall_subset", recall_subset)):
        paths[metric] = out / FILE_NAMES[metric]
        paths[metric].write_text(json.dumps(submission(metric, rankings)))
    return paths


def load_submission(path: str | Path) -> dict:
    """Read a submission file; duplicate pairid keys (which ``json`` would silently merge) are an error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"submission file {path} does not exist")

    def no_duplicates(pairs):
        keys = [k for k, _ in pairs]
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        if repeated:
            raise SubmissionError(str(path), [f"key {k!r} appears more than once" for k in repeated])
        return dict(pairs)

    try:
        data = json.loads(path.read_text(), object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as exc:
        raise SubmissionError(str(path), [f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"]) from None
    if not isinstance(data, dict):
        raise SubmissionError(str(path), [f"top level is a {type(data).__name__}, expected a JSON object"])
    return data


def load_split_images(path: str | Path) -> set[str]:
    """The image names of a CIRR split file (``image_splits/split.rc2.<split>.json``: ``{name: relative path}``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"split file {path}: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if not isinstance(data, dict) or not data:
        raise DataError(f"split file {path}: expected a JSON object of image name -> path, got "
                        f"{type(data).__name__} {'(empty)' if not data else ''}".rstrip())
    return set(data)


def expected_length(metric: str, record: dict, gallery_size: int | None = None) -> int:
    """Names a ranking must hold: 50 / 3, or every candidate when fewer remain (a gallery smaller than CIRR's)."""
    if metric == "recall_subset":
        candidates = len(set(record["img_set"]["members"]) - {record["reference"]})
    else:
        candidates = gallery_size - 1 if gallery_size is not None else LIST_LENGTH[metric]
    return min(LIST_LENGTH[metric], candidates)


def check_submission(data: dict, metric: str, annotations: list[dict], where: str = "submission",
                     gallery_size: int | None = None, split: tuple[str, set[str]] | None = None) -> None:
    """Raise ``SubmissionError`` listing everything wrong with ``data`` as a ``metric`` file for ``annotations``
    (CIRR caption records: pairid, reference, img_set.members). ``gallery_size``: of a gallery smaller than
    51 images, whose rankings can only hold ``gallery_size - 1`` names. ``split``: (its file, its image names),
    every name must be one of them."""
    problems = []
    if data.get("version") != VERSION:
        problems.append(f'"version" is {data.get("version")!r}, expected {VERSION!r}')
    if data.get("metric") != metric:
        problems.append(f'"metric" is {data.get("metric")!r}, expected {metric!r}')
    by_pairid = {str(a["pairid"]): a for a in annotations}
    given = {k for k in data if k not in ("version", "metric")}
    missing = sorted(set(by_pairid) - given, key=_numeric)
    unknown = sorted(given - set(by_pairid), key=_numeric)
    if missing:
        problems.append(f"{len(missing)} pairid(s) missing: {_short(missing)}")
    if unknown:
        problems.append(f"{len(unknown)} pairid(s) not in the annotations: {_short(unknown)}")
    for pairid in sorted(given & set(by_pairid), key=_numeric):
        names, record = data[pairid], by_pairid[pairid]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            problems.append(f"pairid {pairid}: expected a list of image names")
            continue
        length = expected_length(metric, record, gallery_size)
        if len(names) != length:
            problems.append(f"pairid {pairid}: {len(names)} names, expected {length}")
        if len(set(names)) != len(names):
            problems.append(f"pairid {pairid}: repeated image names")
        if record["reference"] in names:
            problems.append(f"pairid {pairid}: lists its own reference image {record['reference']}")
        if split is not None:
            foreign = [n for n in names if n not in split[1]]
            if foreign:
                problems.append(f"pairid {pairid}: image(s) not in the split's image list {split[0]}: {_short(foreign)}")
        if metric == "recall_subset":
            outside = [n for n in names if n not in record["img_set"]["members"]]
            if outside:
                problems.append(f"pairid {pairid}: names outside its img_set.members: {_short(outside)}")
    if problems:
        raise SubmissionError(where, problems)


def check_cirr(annotations: list[dict], recall: dict, recall_subset: dict, gallery_size: int | None = None,
               split: tuple[str, set[str]] | None = None, sources: tuple[str, str] = ("", "")) -> None:
    """The server's format check of both submissions against caption records (labelled or not, e.g. test1), and
    with ``split`` (its file, its image names) of every name against the split's images. ``sources``: the two
    submission files' names, for the messages."""
    malformed = [f"record #{i}" for i, a in enumerate(annotations)
                 if not isinstance(a, dict) or not {"pairid", "reference", "img_set"} <= set(a)
                 or not isinstance(a["img_set"], dict) or "members" not in a["img_set"]]
    if malformed:
        raise SubmissionError("annotations", [f"{len(malformed)} record(s) lack pairid / reference / img_set.members: "
                                              f"{_short(malformed)}"])
    check_submission(recall, "recall", annotations, f"recall submission {sources[0]}".strip(), gallery_size, split)
    check_submission(recall_subset, "recall_subset", annotations, f"recall_subset submission {sources[1]}".strip(),
                     gallery_size, split)


def score_cirr(annotations: list[dict], recall: dict, recall_subset: dict, gallery_size: int | None = None,
               split: tuple[str, set[str]] | None = None, sources: tuple[str, str] = ("", "")) -> dict[str, float]:
    """Check both submissions (``check_cirr``), then score them against labelled annotations (``target_hard``) as the
    server does."""
    check_cirr(annotations, recall, recall_subset, gallery_size, split, sources)
    unlabelled = [str(a["pairid"]) for a in annotations if not a.get("target_hard")]
    if unlabelled:
        raise SubmissionError("annotations", [f"{len(unlabelled)} record(s) without target_hard: {_short(unlabelled)}"])
    hits = {f"R@{k}": 0 for k in CIRR_KS} | {f"Rs@{k}": 0 for k in CIRR_SUBSET_KS}
    for record in annotations:
        pairid, target = str(record["pairid"]), record["target_hard"]
        for k in CIRR_KS:
            hits[f"R@{k}"] += target in recall[pairid][:k]
        for k in CIRR_SUBSET_KS:
            hits[f"Rs@{k}"] += target in recall_subset[pairid][:k]
    metrics = {name: 100.0 * n / len(annotations) for name, n in hits.items()}
    metrics["Avg"] = (metrics["R@5"] + metrics["Rs@1"]) / 2
    return metrics


def _numeric(key: str):
    return (0, int(key)) if key.lstrip("-").isdigit() else (1, key)


def _short(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")
