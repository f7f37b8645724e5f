"""Synthetic datasets, the one front: ``write_synthetic(kind, out, pairs, seed)`` writes procedural CIR data in
the on-disk format of CIRR, FashionIQ or IPr2Pr (``synthetic_scenes``: scenes of coloured shapes, one atomic edit
per pair), the detail benchmark v2 (kind ``detail``, ``synthetic_detail``: local and global edits, every img_set
member one edit from the reference, in CIRR's layout), or v1 (kind ``cirr``, benchmark ``detail``,
``synthetic_bench``: families of sibling image sets, local edits only, kept for comparison). Everything is
deterministic by seed; no scene is shared between splits.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

from detailfusion.library.data.synthetic_bench import DetailLayout, write_cirr_detail
from detailfusion.library.data.synthetic_detail import DetailV2Layout, benchmark_scene_keys, write_detail_v2
from detailfusion.library.data.synthetic_ipr2pr import write_ipr2pr_detail
from detailfusion.library.data.synthetic_scenes import write_cirr, write_fashioniq, write_ipr2pr, write_json
from detailfusion.library.errors import ConfigError
from detailfusion.library.registry import Registry

DETAIL_V2_IMAGE_SIZE = 64  # the tiny preset's input side: the renderer draws it directly (no resize in prepare)
BENCHMARKS = ("near-duplicates", "detail")


@dataclass(frozen=True)
class SyntheticKind:
    """write(out: Path, pairs: int | None, seed: int, image_size: int | None, **options) -> {split: pairs};
    ``options``: the keyword options it takes (any other one given is refused, naming the kinds that take it)."""

    write: Callable[..., dict]
    options: tuple[str, ...] = ()


SYNTHETIC_KINDS: Registry[SyntheticKind] = Registry("synthetic kind", __name__)


def write_synthetic(kind: str, out: str | Path, pairs: int | None = None, seed: int = 0, image_size: int | None = None,
                    **options) -> dict:
    """Write synthetic pairs of dataset ``kind`` under ``out``; returns pair counts per split.

    kind "detail" (benchmark v2, synthetic_detail.DetailV2Layout, its defaults where None): ``pairs`` train queries,
    ``val_pairs`` and ``test_pairs`` queries, 10 per scene root (defaults 10,000 / 1,000 / 4,000); images of
    ``image_size`` (default 64) pixels; ``held_out_types``: edit types absent from train and val (test1 keeps them).
    kind "ipr2pr-detail" (synthetic_ipr2pr): ``pairs`` (2,000) IPr2Pr rows of benchmark v2's scenes and all its edit
    types, 64 px; ``exclude_from``: a benchmark v2 root whose test1 scenes never appear. Other kinds: ``pairs`` 2000 and 128-pixel images by default.

    benchmark "near-duplicates": ``pairs`` over all splits, each img_set alone with its near-duplicates.
    benchmark "detail" (CIRR only; synthetic_bench.DetailLayout, its defaults where None): ``pairs`` train queries,
    ``val_pairs`` and ``test_pairs`` queries, img_sets in families of ``family_size`` sibling groups,
    ``pairs_per_set`` queries per img_set.
    """
    found = SYNTHETIC_KINDS.get(kind, "synth --kind")
    given = {name: value for name, value in options.items() if value is not None and value != ()}
    if given.get("benchmark") == BENCHMARKS[0]:  # kind cirr's default
        given.pop("benchmark")
    for name in given:
        if name not in found.options:
            takers = [k for k in SYNTHETIC_KINDS.names() if name in SYNTHETIC_KINDS.get(k).options]
            raise ConfigError(f"{name}: only for kind {' or '.join(map(repr, takers))}, got kind {kind!r}")
    return found.write(Path(out), pairs, seed, image_size, **given)


def _write_scenes(out: Path, pairs: int | None, seed: int, image_size: int | None, *, kind: str,
                  writer: Callable[..., dict], benchmark: str = BENCHMARKS[0], **detail) -> dict:
    """CIRR, FashionIQ or IPr2Pr layout of ``synthetic_scenes``; kind cirr with benchmark "detail": v1."""
    image_size, pairs = image_size or 128, 2000 if pairs is None else pairs
    if benchmark not in BENCHMARKS:
        raise ConfigError(f"unknown synthetic benchmark {benchmark!r}; known: {', '.join(BENCHMARKS)}")
    if detail and benchmark != "detail":
        given = ", ".join(f"{name}={value}" for name, value in detail.items())
        raise ConfigError(f"{given}: only for benchmark 'detail', got benchmark {benchmark!r}")
    if pairs < 3:
        raise ConfigError(f"--pairs must be at least 3 (one per split), got {pairs}")
    out.mkdir(parents=True, exist_ok=True)
    if benchmark == "detail":
        layout = DetailLayout(pairs, **detail)
        summary = write_cirr_detail(out, layout, seed, image_size)
        options = {"benchmark": benchmark, **{k: v for k, v in vars(layout).items() if k != "train_pairs"}}
    else:
        summary = writer(out, pairs, seed, image_size)
        options = {"benchmark": benchmark}
    write_json(out / "synthetic" / "manifest.json", {"kind": kind, "pairs": pairs, "seed": seed,
                                                       "image_size": image_size, **options, "splits": summary})
    return summary


def _write_detail_v2(out: Path, pairs: int | None, seed: int, image_size: int | None, **given) -> dict:
    """Benchmark v2 (``synthetic_detail``): ``given`` val_pairs, test_pairs, held_out_types."""
    pairs, image_size = DetailV2Layout.train_pairs if pairs is None else pairs, image_size or DETAIL_V2_IMAGE_SIZE
    layout = DetailV2Layout(pairs, **given)
    out.mkdir(parents=True, exist_ok=True)
    summary = write_detail_v2(out, layout, seed, image_size)
    write_json(out / "synthetic" / "manifest.json", {"kind": "detail", "benchmark": "detail-v2", "pairs": pairs,
                                                       "seed": seed, "image_size": image_size,
                                                       **{k: v for k, v in vars(layout).items() if k != "train_pairs"},
                                                       "splits": summary})
    return summary


def _write_ipr2pr_detail(out: Path, pairs: int | None, seed: int, image_size: int | None,
                         exclude_from: str | None = None) -> dict:
    pairs, image_size = 2000 if pairs is None else pairs, image_size or DETAIL_V2_IMAGE_SIZE
    if pairs < 1:
        raise ConfigError(f"--pairs must be at least 1, got {pairs}")
    exclude = benchmark_scene_keys(exclude_from) if exclude_from else set()
    summary = write_ipr2pr_detail(out, pairs, seed, image_size, exclude)
    write_json(out / "synthetic" / "manifest.json", {"kind": "ipr2pr-detail", "pairs": pairs, "seed": seed,
                                                       "image_size": image_size, "exclude_from": exclude_from,
                                                       "excluded_scenes": len(exclude), "splits": summary})
    return summary


SYNTHETIC_KINDS.register("cirr", SyntheticKind(partial(_write_scenes, kind="cirr", writer=write_cirr),
                                               ("benchmark", "val_pairs", "test_pairs", "family_size", "pairs_per_set")))
SYNTHETIC_KINDS.register("fashioniq", SyntheticKind(partial(_write_scenes, kind="fashioniq", writer=write_fashioniq)))
SYNTHETIC_KINDS.register("ipr2pr", SyntheticKind(partial(_write_scenes, kind="ipr2pr", writer=write_ipr2pr)))
SYNTHETIC_KINDS.register("detail", SyntheticKind(_write_detail_v2, ("val_pairs", "test_pairs", "held_out_types")))
SYNTHETIC_KINDS.register("ipr2pr-detail", SyntheticKind(_write_ipr2pr_detail, ("exclude_from",)))
