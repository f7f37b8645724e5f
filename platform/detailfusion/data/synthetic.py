"""Synthetic datasets, the one front: ``write_synthetic(kind, out, pairs, seed)`` writes procedural CIR data in
the on-disk format of CIRR, FashionIQ or IPr2Pr (``synthetic_scenes``: scenes of coloured shapes, one atomic edit
per pair), or CIRR's detail benchmark (``synthetic_bench``: families of sibling image sets where only the text
decides). Everything is deterministic by seed; no scene is shared between splits.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError
from .synthetic_bench import DetailLayout, write_cirr_detail
from .synthetic_scenes import write_json, write_cirr, write_fashioniq, write_ipr2pr

WRITERS = {"cirr": write_cirr, "fashioniq": write_fashioniq, "ipr2pr": write_ipr2pr}


BENCHMARKS = ("near-duplicates", "detail")


def write_synthetic(kind: str, out: str | Path, pairs: int = 2000, seed: int = 0, image_size: int = 128, *,
                    benchmark: str = "near-duplicates", val_pairs: int | None = None, test_pairs: int | None = None,
                    family_size: int | None = None, pairs_per_set: int | None = None) -> dict:
    """Write synthetic pairs of dataset ``kind`` under ``out``; returns pair counts per split.

    benchmark "near-duplicates": ``pairs`` over all splits, each img_set alone with its near-duplicates.
    benchmark "detail" (CIRR only; synthetic_bench.DetailLayout, its defaults where None): ``pairs`` train queries,
    ``val_pairs`` and ``test_pairs`` queries, img_sets in families of ``family_size`` sibling groups,
    ``pairs_per_set`` queries per img_set.
    """
    detail = {"val_pairs": val_pairs, "test_pairs": test_pairs, "family_size": family_size,
              "pairs_per_set": pairs_per_set}
    detail = {name: value for name, value in detail.items() if value is not None}
    if kind not in WRITERS:
        raise ConfigError(f"unknown synthetic kind {kind!r}; known: {', '.join(WRITERS)}")
    if benchmark not in BENCHMARKS:
        raise ConfigError(f"unknown synthetic benchmark {benchmark!r}; known: {', '.join(BENCHMARKS)}")
    if benchmark == "detail" and kind != "cirr":
        raise ConfigError(f"the detail benchmark is written in CIRR's layout only, got kind {kind!r}")
    if detail and benchmark != "detail":
        given = ", ".join(f"{name}={value}" for name, value in detail.items())
        raise ConfigError(f"{given}: only for benchmark 'detail', got benchmark {benchmark!r}")
    if pairs < 3:
        raise ConfigError(f"--pairs must be at least 3 (one per split), got {pairs}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if benchmark == "detail":
        layout = DetailLayout(pairs, **detail)
        summary = write_cirr_detail(out, layout, seed, image_size)
        options = {"benchmark": benchmark, **{k: v for k, v in vars(layout).items() if k != "train_pairs"}}
    else:
        summary = WRITERS[kind](out, pairs, seed, image_size)
        options = {"benchmark": benchmark}
    write_json(out / "synthetic" / "manifest.json", {"kind": kind, "pairs": pairs, "seed": seed,
                                                       "image_size": image_size, **options, "splits": summary})
    return summary
