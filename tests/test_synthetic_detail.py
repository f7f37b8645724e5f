"""The detail benchmark v2: structure (every img_set member one edit from the reference), tags, determinism, roots
disjoint across splits, and no shortcut (the pixel nearest neighbour stays at or below 35 on Rs@1 and R@5 in every
family and direction)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from detailfusion.library.data.query_tags import read_query_tags
from detailfusion.library.data.shortcut_report import shortcut_report, shortcut_table
from detailfusion.library.data.synthetic import write_synthetic
from detailfusion.library.errors import ConfigError

SMALL = dict(pairs=60, val_pairs=40, test_pairs=60)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("v2-small")
    write_synthetic("detail", root, seed=3, **SMALL)
    return root


@pytest.fixture(scope="module")
def test_split(tmp_path_factory) -> Path:
    """A test1 of 2,000 queries (200 roots): enough for the shortcut bound per family and direction (400-600 each)."""
    root = tmp_path_factory.mktemp("v2-test")
    write_synthetic("detail", root, pairs=10, val_pairs=10, test_pairs=2000, seed=0)
    return root


def _records(root: Path, split: str) -> list[dict]:
    return json.loads((root / "captions" / f"cap.rc2.{split}.json").read_text())


def _differences(a: dict, b: dict) -> tuple[int, int]:
    """(look attributes that differ, shapes in one scene and not the other) between two scene records."""
    looks = sum(a["look"][k] != b["look"][k] for k in a["look"])
    shapes_a, shapes_b = {tuple(s) for s in a["shapes"]}, {tuple(s) for s in b["shapes"]}
    return looks, len(shapes_a ^ shapes_b)


def test_every_member_is_one_edit_from_the_reference(small):
    """No star graph: the target and every other member differ from the reference by one look attribute (and no
    shape) or one shape change (1 or 2 shapes in the symmetric difference, no look change). Read from the scene
    records, not from the generator's edit objects."""
    for split in ("train", "val", "test1"):
        scenes = json.loads((small / "synthetic" / f"scenes.{split}.json").read_text())
        for record in _records(small, split):
            members = record["img_set"]["members"]
            assert len(members) == 6 and len(set(members)) == 6 and record["reference"] in members
            for member in members:
                if member == record["reference"]:
                    continue
                looks, shapes = _differences(scenes[record["reference"]], scenes[member])
                assert (looks, shapes) in {(1, 0), (0, 1), (0, 2)}, (split, record["pairid"], member, looks, shapes)


def test_tags_and_families(small):
    tags = read_query_tags(small, "val")
    records = _records(small, "val")
    assert len(tags) == len(records)
    for record in records:
        tag = tags[f"cirr/val/{record['pairid']}"]
        assert tag.edit_family in ("local", "global") and tag.direction in ("forward", "inverse")
        assert tag.edit_type == record["edit_type"] and tag.scene_root == record["scene_root"]
    families = Counter(t.edit_family for t in tags.values())
    assert families["local"] == families["global"]  # 5 of each per root; 40 queries = 4 whole roots
    test1 = _records(small, "test1")
    assert all("target_hard" not in r for r in test1)  # hidden, as CIRR's
    assert len(json.loads((small / "synthetic" / "test1_targets.json").read_text())) == len(test1)


def test_roots_and_scenes_never_repeat_across_splits(small):
    roots = {split: {r["scene_root"] for r in _records(small, split)} for split in ("train", "val", "test1")}
    assert not roots["train"] & roots["test1"] and not roots["val"] & roots["test1"] and not roots["train"] & roots["val"]
    keys = {}
    for split in ("train", "val", "test1"):
        scenes = json.loads((small / "synthetic" / f"scenes.{split}.json").read_text())
        keys[split] = {json.dumps(v, sort_keys=True) for v in scenes.values()}
    assert not keys["train"] & keys["test1"] and not keys["val"] & keys["test1"]


def test_deterministic_by_seed(small, tmp_path):
    again, other = tmp_path / "again", tmp_path / "other"
    write_synthetic("detail", again, seed=3, **SMALL)
    write_synthetic("detail", other, seed=4, **SMALL)
    for name in ("captions/cap.rc2.train.json", "captions/cap.rc2.test1.json", "synthetic/test1_targets.json"):
        assert (small / name).read_bytes() == (again / name).read_bytes()
    digest = lambda root: hashlib.sha256(b"".join(p.read_bytes() for p in sorted(root.glob("test1/*.png")))).hexdigest()  # noqa: E731
    assert digest(small) == digest(again) != digest(other)


def test_no_shortcut_by_family_and_direction(test_split):
    """Pixel NN Rs@1 and R@5 <= 35 in every family x direction cell (issue 33); the oracle finds every target (the
    caption's edit names one image) and text alone does not reach the gallery's target (R@5 far below the oracle)."""
    report = shortcut_report(test_split, "test1")
    print(shortcut_table(report))
    cells = [c for c in report["queries"] if c != "all"]
    assert len(cells) == 4 and all(report["queries"][c] >= 300 for c in cells)
    for cell in cells:
        assert report["pixel_nn"][cell]["Rs@1"] <= 35, (cell, report["pixel_nn"][cell])
        assert report["pixel_nn"][cell]["R@5"] <= 35, (cell, report["pixel_nn"][cell])
        assert report["oracle"][cell]["R@1"] == 100.0
    assert report["text_only"]["all"]["R@5"] < 35


def test_refused_options(tmp_path):
    with pytest.raises(ConfigError, match="family_size"):
        write_synthetic("detail", tmp_path / "x", family_size=4)
    with pytest.raises(ConfigError, match="test_pairs"):
        write_synthetic("detail", tmp_path / "y", test_pairs=0)


def test_cli_synth_detail(tmp_path):
    out = tmp_path / "cli"
    done = subprocess.run([sys.executable, "-m", "detailfusion", "synth", "--kind", "detail", "--seed", "1", "--out",
                           str(out), "--pairs", "20", "--val-pairs", "10", "--test-pairs", "10"],
                          capture_output=True, text=True, check=True)
    assert "train: 20, val: 10, test1: 10" in done.stdout
    manifest = json.loads((out / "synthetic" / "manifest.json").read_text())
    assert manifest["benchmark"] == "detail-v2" and manifest["image_size"] == 64
