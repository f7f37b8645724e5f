"""Stage 1 that can pay off (issue 33, point 3): benchmark v2 with edit types held out of its train split, the
synthetic IPr2Pr corpus of its world (every edit type, no test1 scene) and the data-efficiency study's subsets."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from detailfusion.library.data.synthetic import write_synthetic
from detailfusion.library.data.synthetic_detail import GLOBAL_TYPES, LOCAL_TYPES, benchmark_scene_keys
from detailfusion.library.data.synthetic_ipr2pr import edit_pairs
from detailfusion.library.errors import ConfigError
from detailfusion.platform.data_efficiency import HELD_OUT_TYPES, in_fraction, train_subset


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("v2-held-out")
    write_synthetic("detail", root, pairs=300, val_pairs=40, test_pairs=300, seed=2, held_out_types=HELD_OUT_TYPES)
    return root


def _types(root: Path, split: str) -> Counter:
    return Counter(r["edit_type"] for r in json.loads((root / "captions" / f"cap.rc2.{split}.json").read_text()))


def _edit_types_of_sets(root: Path, split: str) -> set[str]:
    """The edit types that made any img_set member of the split (from its structured scene records)."""
    scenes = json.loads((root / "synthetic" / f"scenes.{split}.json").read_text())
    found = set()
    for record in json.loads((root / "captions" / f"cap.rc2.{split}.json").read_text()):
        ref = scenes[record["reference"]]
        for member in record["img_set"]["members"]:
            other = scenes[member]
            found |= {a for a in ref["look"] if ref["look"][a] != other["look"][a]}
            before = {tuple(s) for s in ref["shapes"]} - {tuple(s) for s in other["shapes"]}
            after = {tuple(s) for s in other["shapes"]} - {tuple(s) for s in ref["shapes"]}
            if len(before) == len(after) == 1:
                (b,), (a,) = before, after
                found |= {"move" if b[3] != a[3] else "resize" if b[2] != a[2] else "other-local"}
    return found


def test_held_out_types_absent_from_train_and_val_present_in_test1(held_out):
    for split in ("train", "val"):
        assert not set(_types(held_out, split)) & set(HELD_OUT_TYPES), split
        assert not _edit_types_of_sets(held_out, split) & set(HELD_OUT_TYPES), split  # no img_set member either
    test1 = json.loads((held_out / "captions" / "cap.rc2.test1.json").read_text())
    assert set(HELD_OUT_TYPES) <= {r["edit_type"] for r in test1}
    assert json.loads((held_out / "synthetic" / "manifest.json").read_text())["held_out_types"] == list(HELD_OUT_TYPES)


def test_held_out_types_refused_when_unknown_or_not_closed(tmp_path):
    with pytest.raises(ConfigError, match="unknown edit type"):
        write_synthetic("detail", tmp_path / "a", pairs=10, held_out_types=("melt",))
    with pytest.raises(ConfigError, match="'add' and 'remove'"):
        write_synthetic("detail", tmp_path / "b", pairs=10, held_out_types=("add",))
    with pytest.raises(ConfigError, match="only for kind 'detail'"):
        write_synthetic("cirr", tmp_path / "c", pairs=10, held_out_types=("move",))


def test_stage1_corpus_teaches_every_type_and_no_test1_scene(tmp_path, held_out):
    out = tmp_path / "ipr2pr"
    summary = write_synthetic("ipr2pr-detail", out, pairs=1200, seed=0, exclude_from=str(held_out))
    table = pq.read_table(out / "data")
    assert table.num_rows == 1200 and summary["train"] == 1200
    types = Counter(table.column("edit_type").to_pylist())
    assert set(types) == set(LOCAL_TYPES + GLOBAL_TYPES), types  # the held-out types included
    families = Counter(table.column("edit_family").to_pylist())
    assert abs(families["local"] - families["global"]) < 0.1 * 1200, families  # even odds
    row = table.slice(0, 1).to_pylist()[0]
    assert row["original_image"]["bytes"].startswith(b"\x89PNG") and row["edit_prompt"] and row["edited_prompt"]
    manifest = json.loads((out / "synthetic" / "manifest.json").read_text())
    assert manifest["excluded_scenes"] == len(benchmark_scene_keys(held_out)) > 0


def test_stage1_corpus_refuses_excluded_scenes():
    first = [next(iter(edit_pairs(5)))]
    before, _, after = first[0]
    again = edit_pairs(5, exclude={before.key()})
    assert all(before.key() not in (b.key(), a.key()) for b, _, a in (next(again) for _ in range(50)))


def test_fractions_nest_and_keep_whole_scene_roots(tmp_path, held_out):
    roots = range(1000)
    ten, quarter = {r for r in roots if in_fraction(r, 0.1)}, {r for r in roots if in_fraction(r, 0.25)}
    assert ten <= quarter and 60 < len(ten) < 140 and 190 < len(quarter) < 310
    out = train_subset(held_out, 0.25, tmp_path / "quarter")
    kept = json.loads((out / "captions" / "cap.rc2.train.json").read_text())
    everything = json.loads((held_out / "captions" / "cap.rc2.train.json").read_text())
    kept_roots = {r["scene_root"] for r in kept}
    assert kept == [r for r in everything if r["scene_root"] in kept_roots]  # whole roots, in order
    images = json.loads((out / "image_splits" / "split.rc2.train.json").read_text())
    needed = {n for r in kept for n in [r["reference"], r["target_hard"], *r["img_set"]["members"]]}
    assert needed <= set(images) and all((out / path).is_file() for path in images.values())


def _outcomes(values_by_variant: dict, ids: list[str]):
    from detailfusion.library.eval.outcomes import METRICS, Outcomes

    return Outcomes(ids, {v: {m: np.asarray(x, float) for m in METRICS} for v, x in values_by_variant.items()},
                    np.full((len(ids), 2), np.nan))


def test_study_summary_measures_stage1_gain_on_all_and_held_out_queries():
    """Known outcomes: from stage 1, DI hits every held-out query; without, none; the seen queries are equal."""
    from detailfusion.library.eval.claims import QuerySet
    from detailfusion.platform.data_efficiency import DataEfficiencyConfig, summarise

    rng = np.random.default_rng(0)
    types = ["move", "recolour", "zoom", "resize"] * 50  # 200 queries, half of a held-out type
    ids = [f"cirr/test1/{n}" for n in range(len(types))]
    held = np.array([t in HELD_OUT_TYPES for t in types])
    queries = QuerySet([n // 10 for n in range(len(ids))], "scene_root", types,
                       ["local" if t in ("move", "recolour", "resize") else "global" for t in types])
    config = DataEfficiencyConfig(workdir="unused", seeds=5, fractions=(0.5, 1.0), bootstrap=200)
    outcomes = {}
    for fraction in (50, 100):
        for arm in ("stage1", "no_stage1"):
            runs = []
            for _ in range(5):
                seen = 100.0 * (rng.random(len(ids)) < 0.5)
                di = np.where(held, 100.0 if arm == "stage1" else 0.0, seen) if fraction == 50 else seen
                runs.append(_outcomes({"di": di, "gm": seen}, ids))
            outcomes[f"f{fraction}pct-{arm}"] = runs
    result = summarise(config, outcomes, queries, {"kind": "detail"})
    gains = {(g["fraction"], g["queries"]): g for g in result["gains"]}
    assert gains[(0.5, "held_out")]["difference"] == 100.0 and gains[(0.5, "held_out")]["verdict"] == "holds"
    assert gains[(0.5, "all")]["verdict"] == "holds" and 40 < gains[(0.5, "all")]["difference"] < 60
    assert gains[(1.0, "all")]["verdict"] != "holds" and abs(gains[(1.0, "all")]["difference"]) < 10
    row = next(r for r in result["rows"] if r["fraction"] == 0.5 and r["arm"] == "stage1")
    assert row["di/held_out"]["mean"]["Avg"] == 100.0 and result["held_out_queries"] == int(held.sum())


def test_cli_writes_the_stage1_corpus_and_refuses_fractions_without_the_study(tmp_path, held_out):
    out = tmp_path / "corpus"
    done = subprocess.run([sys.executable, "-m", "detailfusion", "synth", "--kind", "ipr2pr-detail", "--pairs", "40",
                           "--exclude-from", str(held_out), "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert pq.read_table(out / "data").num_rows == 40
    refused = subprocess.run([sys.executable, "-m", "detailfusion", "ablate", "--workdir", str(tmp_path / "w"),
                              "--fractions", "0.5"], capture_output=True, text=True)
    assert refused.returncode == 2 and "--study data-efficiency" in refused.stderr
