"""The prepare job on Ray Data: real CIRR/FashionIQ annotations with placeholder images, synthetic data in all
three formats, and every bad-input case landing in quarantine with its file, record and reason."""

import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from detailfusion.library.config import PrepareConfig
from detailfusion.library.data.images import load_pixels
from detailfusion.library.data.synthetic import write_synthetic
from detailfusion.platform.data.prepare import PrepareError, prepare, read_quarantine
from detailfusion.platform.data.training_input import load_image_store

pytestmark = pytest.mark.usefixtures("ray_local")


def placeholder(path: Path, seed: int, size=(24, 18)):
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = tuple(int(c) for c in np.random.default_rng(seed).integers(0, 255, 3))
    Image.new("RGB", size, colour).save(path)


def bomb_png(path: Path, width=100_000, height=100_000):
    """A tiny valid PNG whose header claims absurd dimensions (a decompression bomb's signature)."""
    Image.new("RGB", (4, 4)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = bytearray(data[12:29])  # chunk type + 13 data bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    path.write_bytes(bytes(data))


def copy_annotations(shared: Path, name: str, dest: Path) -> Path:
    shutil.copytree(shared / name, dest, ignore=shutil.ignore_patterns("LICENSE*"))
    return dest


def test_real_cirr_val_with_placeholder_images_and_damaged_files(tmp_path, shared_datasets):
    root = copy_annotations(shared_datasets, "cirr", tmp_path / "cirr")
    images = json.loads((root / "image_splits/split.rc2.val.json").read_text())
    for i, rel in enumerate(images.values()):
        placeholder(root / rel, i)
    names = sorted(images)
    deleted, truncated, text_file, bomb = names[0], names[1], names[2], names[3]
    (root / images[deleted]).unlink()
    data = (root / images[truncated]).read_bytes()
    (root / images[truncated]).write_bytes(data[: len(data) // 2])
    (root / images[text_file]).write_text("this is not a png\n")
    bomb_png(root / images[bomb])

    config = PrepareConfig(dataset="cirr", root=str(root), split="val", out=str(tmp_path / "out"), max_bad_fraction=0.05)
    manifest = prepare(config)
    captions = json.loads((root / "captions/cap.rc2.val.json").read_text())
    broken = {deleted, truncated, text_file, bomb}
    lost = [c for c in captions if c["reference"] in broken or c["target_hard"] in broken]
    assert len(captions) == 4181 and len(images) == 2297
    assert manifest.counts["triplets"] == 4181 - len(lost)
    assert manifest.counts["images"] == 2297 - 4
    quarantine = read_quarantine(tmp_path / "out")
    by_id = {q["record"]: q for q in quarantine if q["kind"] == "image"}
    assert set(by_id) == broken
    assert by_id[deleted]["reason"] == "image file not found"
    assert "truncated" in by_id[truncated]["reason"]
    assert "not an image" in by_id[text_file]["reason"]
    assert "decompression bomb" in by_id[bomb]["reason"]
    assert all(q["source"].endswith(".png") for q in by_id.values())
    cascaded = [q for q in quarantine if q["kind"] == "triplet"]
    assert len(cascaded) == len(lost) and all("quarantined" in q["reason"] for q in cascaded)

    triplets = pq.read_table(tmp_path / "out/triplets").to_pylist()
    pixels = pq.read_table(tmp_path / "out/images")
    assert pixels.num_rows == 2293 and pixels.schema.field("pixels").type == pa.binary(64 * 64 * 3)
    assert manifest.schema_version == 3 and manifest.image_size == 64
    kept_images = set(pixels.column("image_id").to_pylist())
    index, store = load_image_store(tmp_path / "out", "pixels")
    assert store.shape == (2293, 64, 64, 3) and store.dtype == np.uint8
    for name in names[4:9]:  # the stored bytes are exactly the loaded pixels
        assert np.array_equal(store[index[name]], load_pixels((root / images[name]).read_bytes(), 64))
    for row in triplets:
        assert row["reference_id"] in kept_images and row["target_id"] in kept_images
        assert row["reference_id"] in row["subset_ids"] and row["text"] == row["text"].lower()
        assert row["dataset"] == "cirr" and row["split"] == "val" and row["sample_id"].startswith("cirr/val/")
    # rerun with the same config reuses the output
    assert prepare(config).config_hash == manifest.config_hash


def test_real_fashioniq_val_counts(tmp_path, shared_datasets):
    root = copy_annotations(shared_datasets, "fashioniq", tmp_path / "fiq")
    names = set()
    for category in ("dress", "shirt", "toptee"):
        names |= set(json.loads((root / f"image_splits/split.{category}.val.json").read_text()))
    for i, name in enumerate(sorted(names)):
        placeholder(root / "images" / f"{name}.png", i, size=(8, 10))
    manifest = prepare(PrepareConfig(dataset="fashioniq", root=str(root), split="val", out=str(tmp_path / "out"),
                                     image_size=16))
    assert manifest.counts["triplets"] == 2017 + 2038 + 1961
    assert manifest.counts["gallery_rows"] == 3817 + 6346 + 5373
    assert manifest.counts["images"] == len(names)
    assert len(manifest.warnings) == 3  # three val pairs with one empty caption keep the other one
    rows = pq.read_table(tmp_path / "out/triplets").to_pylist()
    dress = [r for r in rows if r["category"] == "dress"]
    first = json.loads((root / "captions/cap.dress.val.json").read_text())[0]
    assert dress[0]["reference_id"] == first["candidate"] and dress[0]["target_id"] == first["target"]
    assert dress[0]["text"] == f"{first['captions'][0]} and {first['captions'][1]}".lower()
    assert len(dress[0]["text_variants"]) == 4


@pytest.mark.parametrize("kind, split", [("cirr", "train"), ("fashioniq", "train"), ("ipr2pr", "train")])
def test_synthetic_data_goes_through_prepare_unchanged(tmp_path, kind, split):
    write_synthetic(kind, tmp_path / "raw", pairs=60, seed=1, image_size=48)
    manifest = prepare(PrepareConfig(dataset=kind, root=str(tmp_path / "raw"), split=split, out=str(tmp_path / "out")))
    expected = json.loads((tmp_path / "raw/synthetic/manifest.json").read_text())["splits"]
    wanted = expected["train"] if kind != "fashioniq" else sum(v for k, v in expected.items() if k.endswith(".train"))
    assert manifest.counts["triplets"] == wanted
    assert manifest.counts["quarantined_records"] == 0 and read_quarantine(tmp_path / "out") == []


def broken_cirr(tmp_path):
    root = tmp_path / "raw"
    write_synthetic("cirr", root, pairs=100, seed=2, image_size=32)
    path = root / "captions/cap.rc2.train.json"
    captions = json.loads(path.read_text())
    images = json.loads((root / "image_splits/split.rc2.train.json").read_text())
    del captions[0]["caption"]                     # a record missing a field
    captions[1]["caption"] = "  ?! "               # empty text once normalised
    captions[2]["pairid"] = captions[3]["pairid"]  # a duplicate id (the later one is quarantined)
    captions[4]["target_hard"] = "train-999-9-img9"  # named in captions, absent from the split file
    path.write_text(json.dumps(captions))
    return root, captions, images


def test_bad_annotation_records_are_quarantined_with_file_record_and_reason(tmp_path):
    root, captions, _ = broken_cirr(tmp_path)
    manifest = prepare(PrepareConfig(dataset="cirr", root=str(root), split="train", out=str(tmp_path / "out"),
                                     max_bad_fraction=0.1))
    quarantine = {q["reason"].split(":")[0].split(" ")[0] + "|" + q["record"]: q for q in read_quarantine(tmp_path / "out")}
    reasons = [q["reason"] for q in quarantine.values()]
    assert any(r == "missing field(s): caption" for r in reasons)
    assert any(r == "empty caption" for r in reasons)
    assert any(r == f"duplicate pairid {captions[3]['pairid']}" for r in reasons)
    assert any("train-999-9-img9" in r and "not in split.rc2.train.json" in r for r in reasons)
    assert all(q["source"].endswith("cap.rc2.train.json") for q in quarantine.values())
    assert len(quarantine) == 4 and manifest.counts["triplets"] == len(captions) - 4
    kept = {r["sample_id"] for r in pq.read_table(tmp_path / "out/triplets").to_pylist()}
    assert f"cirr/train/{captions[5]['pairid']}" in kept  # good neighbours are kept


def test_too_many_bad_records_fail_with_a_clear_error_after_writing_quarantine(tmp_path):
    root, _, _ = broken_cirr(tmp_path)
    with pytest.raises(PrepareError, match=r"quarantined, above max_bad_fraction=1\.00%.*quarantine\.jsonl"):
        prepare(PrepareConfig(dataset="cirr", root=str(root), split="train", out=str(tmp_path / "out")))
    assert len(read_quarantine(tmp_path / "out")) == 4
    assert not (tmp_path / "out/manifest.json").exists()


def test_malformed_json_fails_naming_the_file_and_line(tmp_path):
    root = tmp_path / "raw"
    write_synthetic("cirr", root, pairs=30, seed=0, image_size=32)
    (root / "captions/cap.rc2.val.json").write_text('[{"pairid": 1, "reference": "x",\n  "caption": }]')
    with pytest.raises(PrepareError, match=r"cap\.rc2\.val\.json \(malformed JSON"):
        prepare(PrepareConfig(dataset="cirr", root=str(root), split="val", out=str(tmp_path / "out")))
    (entry,) = read_quarantine(tmp_path / "out")
    assert entry["kind"] == "file" and entry["record"] == "line 2"


def test_ipr2pr_bad_rows_are_quarantined(tmp_path):
    root = tmp_path / "raw"
    write_synthetic("ipr2pr", root, pairs=40, seed=0, image_size=32)
    shard = next((root / "data").glob("*.parquet"))
    rows = pq.read_table(shard).to_pylist()
    rows[0]["edited_image"]["bytes"] = rows[0]["edited_image"]["bytes"][:60]  # truncated
    rows[1]["original_image"]["bytes"] = b"GIF89a not really"                 # corrupt
    rows[2]["edit_prompt"] = ""                                               # empty text
    rows[3] = dict(rows[4])                                                    # duplicate row
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(shard)), shard)
    manifest = prepare(PrepareConfig(dataset="ipr2pr", root=str(root), split="train", out=str(tmp_path / "out"),
                                     max_bad_fraction=0.2))
    reasons = sorted(q["reason"] for q in read_quarantine(tmp_path / "out"))
    assert manifest.counts["triplets"] == 36 and len(reasons) == 4
    assert any(r.startswith("edited_image: corrupt or truncated") for r in reasons)
    assert any(r.startswith("original_image:") for r in reasons)
    assert "empty edit_prompt" in reasons and any(r.startswith("duplicate row") for r in reasons)
    assert all(q["source"].endswith(shard.name) for q in read_quarantine(tmp_path / "out"))


def test_missing_root_and_wrong_columns_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare(PrepareConfig(dataset="cirr", root=str(tmp_path / "nope"), split="val", out=str(tmp_path / "o")))
    (tmp_path / "p/data").mkdir(parents=True)
    pq.write_table(pa.table({"edit_prompt": ["x"]}), tmp_path / "p/data/train-0.parquet")
    with pytest.raises(ValueError, match="missing IPr2Pr column\\(s\\) original_image, edited_image"):
        prepare(PrepareConfig(dataset="ipr2pr", root=str(tmp_path / "p"), split="train", out=str(tmp_path / "o")))


def test_ipr2pr_streams_several_shards_and_drops_a_row_repeated_in_another_shard(tmp_path, capsys):
    from detailfusion.library.data.synthetic_scenes import write_ipr2pr

    root = tmp_path / "raw"
    write_ipr2pr(root, pairs=45, seed=0, image_size=32, rows_per_shard=15)
    shards = sorted((root / "data").glob("*.parquet"))
    assert len(shards) == 3
    first, last = pq.read_table(shards[0]).to_pylist(), pq.read_table(shards[2]).to_pylist()
    last[-1] = dict(first[0])  # the last shard repeats the first shard's first row
    last[3]["edit_prompt"] = ""  # and has a bad row of its own
    pq.write_table(pa.Table.from_pylist(last, schema=pq.read_schema(shards[2])), shards[2])
    manifest = prepare(PrepareConfig(dataset="ipr2pr", root=str(root), split="train", out=str(tmp_path / "out"),
                                     max_bad_fraction=0.1, batch_size=8))
    assert "streaming 3 ipr2pr parquet shard(s)" in capsys.readouterr().out
    ids = pq.read_table(tmp_path / "out/triplets", columns=["sample_id"]).column("sample_id").to_pylist()
    assert manifest.counts == {"records_read": 45, "triplets": 43, "quarantined_records": 2}
    assert len(ids) == len(set(ids)) == 43
    reasons = {q["reason"].split(" ")[0]: q["source"] for q in read_quarantine(tmp_path / "out")}
    assert reasons["empty"].endswith(shards[2].name)
    # the repeat is dropped where it is first seen: in one map batch when Ray Data bundles both copies' blocks
    # together (the source is a shard holding a copy), else after the write (the triplets file); Ray Data's
    # bundling of small blocks varies from run to run (a clean-clone CI run saw the first, others the second)
    duplicate = reasons["duplicate"]
    assert duplicate.startswith("triplets/") or duplicate.endswith((shards[0].name, shards[2].name)), duplicate
