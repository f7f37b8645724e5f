"""The procedural dataset: real on-disk formats, deterministic by seed, no scene shared between splits."""

import hashlib
import io
import json
import random
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from detailfusion.data.synthetic import (
    COLOURS,
    CELLS,
    EDIT_TYPES,
    KINDS,
    Edit,
    SceneFactory,
    describe,
    random_edit,
    random_scene,
    write_synthetic,
)


def load(path):
    return json.loads(Path(path).read_text())


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def cirr(tmp_path_factory):
    root = tmp_path_factory.mktemp("cirr")
    write_synthetic("cirr", root, pairs=200, seed=3, image_size=64)
    return root


def test_cirr_root_has_the_real_layout_and_fields(cirr):
    for split in ("train", "val", "test1"):
        assert (cirr / "captions" / f"cap.rc2.{split}.json").is_file()
        assert (cirr / "image_splits" / f"split.rc2.{split}.json").is_file()
    train, val, test = (load(cirr / "captions" / f"cap.rc2.{s}.json") for s in ("train", "val", "test1"))
    assert (len(train), len(val), len(test)) == (160, 20, 20)
    for split, records in (("train", train), ("val", val)):
        images = load(cirr / "image_splits" / f"split.rc2.{split}.json")
        for rec in records:
            assert set(rec) == {"pairid", "reference", "target_hard", "target_soft", "caption", "img_set"}
            members = rec["img_set"]["members"]
            assert len(members) == 6 and len(set(members)) == 6
            assert rec["reference"] in members and rec["target_hard"] in members
            assert rec["reference"] != rec["target_hard"]
            assert members[rec["img_set"]["target_rank"]] == rec["target_hard"]
            assert rec["reference"] in images and rec["target_hard"] in images
            assert rec["caption"].strip()
        for name, rel in images.items():
            assert (cirr / rel).is_file()
            if split == "train":  # CIRR keeps train images in numbered sub-folders
                assert rel.startswith("./train/") and rel.split("/")[2].isdigit()
            else:
                assert rel == f"./dev/{name}.png"
    assert all("target_hard" not in rec and len(rec["img_set"]["members"]) == 6 for rec in test)
    hidden = load(cirr / "synthetic" / "test1_targets.json")
    assert set(hidden) == {str(rec["pairid"]) for rec in test}
    assert len({rec["pairid"] for rec in train + val + test}) == 200
    image = Image.open(cirr / "dev" / f"{val[0]['reference']}.png")
    assert image.size == (64, 64) and image.mode == "RGB"


def test_no_scene_is_shared_between_splits(cirr):
    by_split = {}
    for split in ("train", "val", "test1"):
        images = load(cirr / "image_splits" / f"split.rc2.{split}.json")
        by_split[split] = {digest(cirr / rel) for rel in images.values()}
    assert not by_split["train"] & by_split["test1"]
    assert not by_split["train"] & by_split["val"]
    assert not by_split["val"] & by_split["test1"]


def test_deterministic_by_seed(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for root, seed in ((a, 1), (b, 1), (c, 2)):
        write_synthetic("cirr", root, pairs=30, seed=seed, image_size=32)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all(digest(a / f) == digest(b / f) for f in files)
    assert load(a / "captions/cap.rc2.train.json") != load(c / "captions/cap.rc2.train.json")


def test_fashioniq_root_has_the_real_layout(tmp_path):
    write_synthetic("fashioniq", tmp_path, pairs=60, seed=0, image_size=48)
    total = 0
    for category in ("dress", "shirt", "toptee"):
        for split in ("train", "val", "test"):
            captions = load(tmp_path / "captions" / f"cap.{category}.{split}.json")
            names = set(load(tmp_path / "image_splits" / f"split.{category}.{split}.json"))
            total += len(captions)
            for rec in captions:
                assert set(rec) == {"candidate", "target", "captions"}
                assert len(rec["captions"]) == 2 and all(c.strip() for c in rec["captions"])
                assert rec["candidate"] in names and rec["target"] in names
                assert rec["candidate"].startswith("B00") and len(rec["candidate"]) == 10
            for name in names:
                assert (tmp_path / "images" / f"{name}.png").is_file()
    assert total == 60


def test_ipr2pr_shards_have_the_hugging_face_columns(tmp_path):
    write_synthetic("ipr2pr", tmp_path, pairs=25, seed=0, image_size=32)
    shards = sorted((tmp_path / "data").glob("train-*-of-*.parquet"))
    assert shards
    table = pq.read_table(shards[0])
    assert table.column_names == ["original_prompt", "original_image", "edit_prompt", "edited_prompt", "edited_image"]
    assert table.schema.field("original_image").type.names == ["bytes", "path"]
    row = table.slice(0, 1).to_pylist()[0]
    before = Image.open(io.BytesIO(row["original_image"]["bytes"]))
    after = Image.open(io.BytesIO(row["edited_image"]["bytes"]))
    assert before.size == after.size == (32, 32)
    assert before.tobytes() != after.tobytes()
    assert row["original_prompt"] != row["edited_prompt"] and row["edit_prompt"]
    assert sum(pq.read_metadata(s).num_rows for s in shards) == 25


@pytest.mark.parametrize("edit_type", EDIT_TYPES)
def test_every_edit_changes_one_shape_and_its_text_names_the_change(edit_type):
    rng = random.Random(7)
    for _ in range(20):
        scene = random_scene(rng)
        edit = random_edit(rng, scene, edit_type)
        if edit is None:
            continue
        after = edit.apply(scene)
        assert edit.type == edit_type
        assert len(set(scene.shapes) ^ set(after.shapes)) in (1, 2)
        assert edit.inverse().apply(after).key() == scene.key()
        text = describe(edit, rng).lower()
        shape = edit.before or edit.after
        assert shape.kind in text and shape.colour in text
        if edit_type == "recolour":
            assert edit.after.colour in text
        if edit_type == "reshape":
            assert edit.after.kind in text
        if edit_type in ("add", "move"):
            assert CELLS[edit.after.cell] in text
        names = [(s.kind, s.colour) for s in after.shapes]
        assert len(names) == len(set(names))  # "the red circle" still names one shape


def test_groups_are_near_duplicates_with_forward_and_inverse_pairs():
    group = SceneFactory(random.Random(0)).group()
    assert len(group.scenes) == 6 and len(group.pairs) == 10
    for ref, tgt, edit in group.pairs:
        assert edit.apply(group.scenes[ref]).key() == group.scenes[tgt].key()
    assert len({e.type for _, _, e in group.pairs}) == 5


def test_cli_writes_a_dataset_and_rejects_bad_arguments(tmp_path):
    exe = [sys.executable, "-m", "detailfusion.cli", "synth"]
    ok = subprocess.run(exe + ["--kind", "cirr", "--out", str(tmp_path / "d"), "--pairs", "30"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "train: 24" in ok.stdout and (tmp_path / "d/captions/cap.rc2.val.json").is_file()
    bad = subprocess.run(exe + ["--kind", "cirr", "--out", str(tmp_path / "e"), "--pairs", "1"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--pairs must be at least 3" in bad.stderr
    wrong = subprocess.run(exe + ["--kind", "coco", "--out", str(tmp_path / "f")], capture_output=True, text=True)
    assert wrong.returncode == 2 and "invalid choice" in wrong.stderr
