"""The synthetic detail benchmark the ablation (and the pipeline) measure on: written once per seed and size,
prepared for the tiny preset, with test1's hidden targets and every query's edit type at hand.

``prepare_benchmark(out, ...)`` writes ``out/data/{cirr,ipr2pr}`` and ``out/prep/<kind>-<split>`` and returns
{"<kind>-<split>": prepared split dirs, "root": the CIRR-format dataset, "manifest": its synthetic/manifest.json};
finished data and prepared splits are reused.
"""

from __future__ import annotations

import json
from pathlib import Path

from detailfusion.library.data.query_tags import QueryTag, read_query_tags

BENCHMARK = "detail"  # synthetic.write_synthetic's kind: benchmark v2 (local and global edits, no star graph)
TRAIN_QUERIES, TEST_QUERIES, IPR2PR_PAIRS = 10_000, 4000, 2000  # the pipeline's and the ablation's sizes (1,000
#   train and 400 test1 scene roots, issue 33)


def _written(out: Path, kind: str, options: dict) -> Path:
    from detailfusion.library.data.synthetic import write_synthetic

    manifest = out / "synthetic" / "manifest.json"
    if manifest.is_file():
        made = json.loads(manifest.read_text())
        if made.get("kind") == kind and all(made.get(k) == v for k, v in options.items()):
            print(f"synth: reusing {out} ({kind}, {options})", flush=True)
            return out
    summary = write_synthetic(kind, out, **options)
    print(f"synth: {kind} -> {out}: " + ", ".join(f"{s} {n}" for s, n in summary.items()), flush=True)
    return out


def cirr_options(cirr_pairs: int, test_pairs: int, seed: int) -> dict:
    """write_synthetic's options of the benchmark's CIRR-format part: its train and test1 queries, and val as many as
    test1 up to 1,000 (validated every epoch: 1,000 queries put Avg's standard error near 1.3 points)."""
    return {"pairs": cirr_pairs, "seed": seed, "val_pairs": min(test_pairs, 1000), "test_pairs": test_pairs}


def prepare_benchmark(out: str | Path, cirr_pairs: int = TRAIN_QUERIES, test_pairs: int = TEST_QUERIES,
                      ipr2pr_pairs: int = IPR2PR_PAIRS,
                      seed: int = 0, splits: tuple[str, ...] = ("train", "test1"), preset: str = "tiny",
                      num_cpus: int | None = None) -> dict:
    from detailfusion.library.config import PrepareConfig
    from detailfusion.platform.data.prepare import prepare

    out = Path(out)
    cirr = _written(out / "data" / "cirr", BENCHMARK, cirr_options(cirr_pairs, test_pairs, seed))
    ipr2pr = _written(out / "data" / "ipr2pr", "ipr2pr", {"pairs": ipr2pr_pairs, "seed": seed})
    found = {"root": cirr, "manifest": json.loads((cirr / "synthetic" / "manifest.json").read_text())}
    for kind, root, split in [("ipr2pr", ipr2pr, "train")] + [("cirr", cirr, s) for s in splits]:
        name = f"{kind}-{split}"
        prepare(PrepareConfig(dataset=kind, root=str(root), split=split, out=str(out / "prep" / name), preset=preset,
                              num_cpus=num_cpus))
        found[name] = out / "prep" / name
    return found


def labelled_test1(data: dict) -> tuple[dict[str, str], dict[str, QueryTag]]:
    """({sample_id: hidden target image}, {sample_id: QueryTag (edit type, family, direction, scene root)}) of the
    benchmark's test1 queries."""
    root = Path(data["root"])
    targets = json.loads((root / "synthetic" / "test1_targets.json").read_text())
    return {f"cirr/test1/{pairid}": name for pairid, name in targets.items()}, read_query_tags(root, "test1")
