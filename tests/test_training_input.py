"""Training input: the frozen-ViT feature cache equals the online path, and 2 ranks get disjoint micro-batches that
cover the split once per epoch."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq
import pytest
import torch

from detailfusion.library.config import PrepareConfig
from detailfusion.library.data.schema import pixels_from_bytes
from detailfusion.library.data.synthetic import write_synthetic
from detailfusion.library.model import build_model, save_model
from detailfusion.library.pixels import normalize_pixels
from detailfusion.platform.data.feature_cache import vision_fingerprint
from detailfusion.platform.data.prepare import prepare
from detailfusion.platform.data.training_input import (
    gallery_input,
    holdout_mask,
    inline_input,
    load_image_store,
    sample_key,
    training_dataset,
)

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model, tokenizer = build_model("tiny")
    path = tmp_path_factory.mktemp("model") / "tiny"
    save_model(model, tokenizer, path)
    return model.eval(), tokenizer, path


@pytest.fixture(scope="module")
def cirr_prepared(tmp_path_factory, exported, ray_local):
    _, _, model_dir = exported
    root = tmp_path_factory.mktemp("cirr")
    write_synthetic("cirr", root / "raw", pairs=50, seed=0, image_size=64)
    prepare(PrepareConfig(dataset="cirr", root=str(root / "raw"), split="train", out=str(root / "out"),
                          cache_vision_features=True, model=str(model_dir)))
    return root / "out"


def test_cached_features_equal_the_online_vision_encoder(cirr_prepared, exported):
    model = exported[0]
    manifest = json.loads((cirr_prepared / "manifest.json").read_text())
    assert manifest["features"]["fingerprint"] == vision_fingerprint(model)
    assert manifest["features"]["rows"] == manifest["counts"]["images"]
    index, pixels = load_image_store(cirr_prepared, "pixels")
    cached_index, cached = load_image_store(cirr_prepared, "features")
    assert set(index) == set(cached_index)
    ids = sorted(index)[:8]
    with torch.no_grad():
        online = model.encode_image(normalize_pixels(torch.from_numpy(pixels[[index[i] for i in ids]])))
    from_cache = torch.from_numpy(cached[[cached_index[i] for i in ids]]).float()
    assert from_cache.shape == online.shape == (8, 65, 64)
    assert torch.allclose(from_cache, online, atol=5e-3, rtol=2e-3)


def test_ipr2pr_inline_cache_and_training_rows(tmp_path, exported):
    model, tokenizer, model_dir = exported
    write_synthetic("ipr2pr", tmp_path / "raw", pairs=20, seed=0, image_size=64)
    prepare(PrepareConfig(dataset="ipr2pr", root=str(tmp_path / "raw"), split="train", out=str(tmp_path / "out"),
                          cache_vision_features=True, model=str(model_dir)))
    rows = training_dataset(tmp_path / "out", tokenizer, 32, vision_fingerprint=vision_fingerprint(model)).take_batch(4)
    assert rows["reference"].shape == (4, 65, 64) and rows["reference"].dtype == np.float16
    raw = pq.read_table(tmp_path / "out/triplets").to_pylist()
    by_key = {sample_key(r["sample_id"]): r for r in raw}
    first = by_key[int(rows["sample_key"][0])]
    with torch.no_grad():
        online = model.encode_image(normalize_pixels(torch.from_numpy(pixels_from_bytes([first["target_pixels"]]))))
    assert torch.allclose(torch.from_numpy(rows["target"][:1]).float(), online, atol=5e-3, rtol=2e-3)
    pixels = training_dataset(tmp_path / "out", tokenizer, 32, use_features=False).take_batch(2)
    assert pixels["reference"].shape == (2, 64, 64, 3) and pixels["reference"].dtype == np.uint8

    # the same split held whole (inline_input): each row's own images, edit text or (stage 0) both captions
    def decode(ids):
        return tokenizer.decode(ids, skip_special_tokens=True)

    for use_features, captions in ((True, False), (False, True)):
        held = inline_input(tmp_path / "out", tokenizer, 32, use_features=use_features, epochs=2, batch_size=8,
                            vision_fingerprint=vision_fingerprint(model), captions=captions)
        assert held.epoch_rows == 16 and held.rows == 32
        batches = list(held.micro_batches(0, 1, 8))
        assert len(batches) == 4
        keys = [[int(k) for k in b["sample_key"]] for b in batches]
        assert len(set(keys[0] + keys[1])) == 16 and keys[:2] != keys[2:]  # distinct rows; epoch 2 reshuffled
        for batch in batches:
            for i, key in enumerate(batch["sample_key"]):
                row = by_key[int(key)]
                expected = pixels_from_bytes([row["reference_pixels"], row["target_pixels"]])
                if use_features:  # the cache's features of those very images
                    with torch.no_grad():
                        expected = model.encode_image(normalize_pixels(torch.from_numpy(expected))).numpy()
                    got = np.stack([batch["reference"][i], batch["target"][i]]).astype(np.float32)
                    assert np.allclose(got, expected, atol=5e-3, rtol=2e-3)
                else:
                    assert np.array_equal(batch["reference"][i], expected[0])
                    assert np.array_equal(batch["target"][i], expected[1])
                if captions:
                    assert decode(batch["input_ids"][i]) == decode(tokenizer(row["reference_caption"], truncation=True, max_length=32)["input_ids"])
                    assert decode(batch["target_input_ids"][i]) == decode(tokenizer(row["target_caption"], truncation=True, max_length=32)["input_ids"])
                else:
                    assert decode(batch["input_ids"][i]) in {decode(tokenizer(t, truncation=True, max_length=32)["input_ids"])
                                                          for t in row["text_variants"]}


def test_training_rows_are_tokenised_and_refuse_a_foreign_cache(cirr_prepared, exported):
    _, tokenizer, _ = exported
    batch = next(gallery_input(cirr_prepared, tokenizer, 32, use_features=False).micro_batches(0, 1, 3))
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (3, 32)
    assert batch["reference"].shape == (3, 64, 64, 3)
    assert (batch["input_ids"][:, 0] == tokenizer.cls_token_id).all()
    torch.manual_seed(1)
    other, _ = build_model("tiny", vision_weights="random")  # another ViT than the export's (the shipped one)
    with pytest.raises(ValueError, match="feature cache was made by a vision encoder with fingerprint"):
        gallery_input(cirr_prepared, tokenizer, 32, vision_fingerprint=vision_fingerprint(other))


def test_a_triplet_whose_image_is_missing_is_named(cirr_prepared, exported, tmp_path):
    """A split whose image store lost an image: the error names the split and the triplet, before any training."""
    import shutil

    _, tokenizer, _ = exported
    broken = tmp_path / "broken"
    shutil.copytree(cirr_prepared, broken)
    images = pq.read_table(broken / "images")
    first = pq.read_table(broken / "triplets").to_pylist()[0]
    shutil.rmtree(broken / "images")
    (broken / "images").mkdir()
    pq.write_table(images.filter(pa.compute.not_equal(images.column("image_id"), first["reference_id"])),
                   broken / "images" / "part-0.parquet")
    with pytest.raises(ValueError, match=f"{broken}: .* missing from its image store .*{first['sample_id']}"):
        gallery_input(broken, tokenizer, 32, use_features=False, batch_size=8)


def test_subset_negatives_are_other_set_members(cirr_prepared, exported):
    """K=2 images per row from the query's img_set, never its reference or target (the pixels say which)."""
    _, tokenizer, _ = exported
    index, store = load_image_store(cirr_prepared, "pixels")
    triplets = pq.read_table(cirr_prepared / "triplets").to_pylist()
    batches = list(gallery_input(cirr_prepared, tokenizer, 32, use_features=False, subset_negatives=2,
                                 batch_size=8).micro_batches(0, 1, 8))  # 40 rows: 5 whole global batches
    batch = {key: np.concatenate([b[key] for b in batches]) for key in ("sample_key", "subset")}
    assert batch["subset"].shape == (len(triplets), 2, 64, 64, 3)
    by_key = {sample_key(t["sample_id"]): t for t in triplets}
    for key, subset in zip(batch["sample_key"], batch["subset"]):
        row = by_key[int(key)]
        members = [store[index[m]] for m in row["subset_ids"] if m not in (row["reference_id"], row["target_id"])]
        for image in subset:
            assert any(np.array_equal(image, m) for m in members)
    with pytest.raises(ValueError, match="inline images, no gallery"):  # IPr2Pr: no sets, no gallery to gather from
        ipr2pr = cirr_prepared.parent / "ipr2pr"
        write_synthetic("ipr2pr", ipr2pr / "raw", pairs=8, seed=0, image_size=64)
        prepare(PrepareConfig(dataset="ipr2pr", root=str(ipr2pr / "raw"), split="train", out=str(ipr2pr / "out")))
        gallery_input(ipr2pr / "out", tokenizer, 32, subset_negatives=2)


def test_two_ranks_get_disjoint_micro_batches_covering_the_split_every_epoch(cirr_prepared, exported):
    """Global batch 10 = 2 ranks x 5, 2 epochs of the 40-row split: each epoch the ranks' rows are disjoint and cover
    the split once; a resumed stream (``start``) continues exactly where the full one was."""
    model, tokenizer, _ = exported
    source = gallery_input(cirr_prepared, tokenizer, 32, vision_fingerprint=vision_fingerprint(model), epochs=2,
                           batch_size=10)
    ranks = [list(source.micro_batches(rank, 2, 5)) for rank in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 8  # 4 steps per epoch on each rank
    assert ranks[0][0]["input_ids"].dtype == np.int64 and ranks[0][0]["reference"].shape == (5, 65, 64)
    expected = {sample_key(s) for s in pq.read_table(cirr_prepared / "triplets").column("sample_id").to_pylist()}
    assert len(expected) == 40
    for epoch in (0, 1):
        keys0, keys1 = ([int(k) for b in rank[epoch * 4:(epoch + 1) * 4] for k in b["sample_key"]] for rank in ranks)
        assert len(keys0) == len(set(keys0)) == 20 and len(set(keys1)) == 20
        assert not set(keys0) & set(keys1)
        assert set(keys0) | set(keys1) == expected
    resumed = list(source.micro_batches(1, 2, 5, start=5))
    assert len(resumed) == 3
    assert all(np.array_equal(a["sample_key"], b["sample_key"]) and np.array_equal(a["target"], b["target"])
               for a, b in zip(resumed, ranks[1][5:]))


def test_holdout_rows_are_stable_disjoint_and_complete(cirr_prepared, exported):
    """data.holdout_fraction: stage 2 gathers only the rows outside the held-out share, stage 3 only those inside;
    the share is fixed by the rows' groups (here the img_sets: the split's captions record no scene root), the same
    in every stage, seed and run, and no img_set has rows on both sides."""
    from detailfusion.library.data.manifest import read_manifest
    from detailfusion.platform.data.training_input import holdout_groups

    _, tokenizer, _ = exported
    table = pq.read_table(cirr_prepared / "triplets")
    manifest = read_manifest(cirr_prepared)
    ids = table.column("sample_id").to_pylist()  # 40 rows
    groups = holdout_groups(table, manifest.source, manifest.split)
    assert len(set(groups)) < len(ids)  # several queries per img_set
    held = holdout_mask(groups, 0.5)
    assert 0 < held.sum() < len(ids) and np.array_equal(held, holdout_mask(list(groups), 0.5))
    keys = {}
    for part in ("fit", "holdout"):
        stream = gallery_input(cirr_prepared, tokenizer, 32, use_features=False, batch_size=2, seed=3,
                               holdout=(part, 0.5))
        keys[part] = {int(k) for b in stream.micro_batches(0, 1, 2) for k in b["sample_key"]}
        assert stream.epoch_rows == len(keys[part])  # whole batches of 2
    assert not keys["fit"] & keys["holdout"]
    assert keys["holdout"] <= {sample_key(s) for s, h in zip(ids, held) if h}
    assert len(keys["holdout"]) == held.sum() // 2 * 2 and len(keys["fit"]) == (~held).sum() // 2 * 2
    group_of = {sample_key(s): g for s, g in zip(ids, groups)}
    assert not {group_of[k] for k in keys["fit"]} & {group_of[k] for k in keys["holdout"]}
