"""evaluate / score-cirr / index end to end on Ray (untrained tiny model): the protocol's invariants on the REAL
CIRR val annotations with placeholder images, submissions scored back equal to the metrics, FashionIQ galleries,
unlabelled CIRR test1 / FashionIQ test answering every query, the index's reuse and model check, clear errors."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F

from detailfusion.cli import main
from detailfusion.config import EvalConfig
from detailfusion.data.synthetic import write_synthetic
from detailfusion.eval.evaluate import evaluate
from detailfusion.data.prepare import read_quarantine
from detailfusion.eval.fashioniq_predictions import check_predictions, predictions
from detailfusion.eval.submission import SubmissionError, check_submission, load_submission, score_cirr
from detailfusion.index import GalleryIndex, IndexMismatch
from detailfusion.eval.validate import ValidationSplit
from detailfusion.model import load_model, model_fingerprint, save_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny):
    model, tokenizer = tiny
    return save_model(model, tokenizer, tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def cirr_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "cirr"
    write_synthetic("cirr", root, pairs=300, seed=3, image_size=64)
    return root


def run_eval(ray_local, tmp_path, root, split, model_dir, dataset="cirr", **extra):
    config = EvalConfig(dataset=dataset, root=str(root), split=split, checkpoint=str(model_dir),
                        out=str(tmp_path / f"{dataset}-{split}"), cpus_per_actor=0.5, **extra)
    return evaluate(config), tmp_path / f"{dataset}-{split}"


def test_cirr_val_submissions_score_back_to_the_metrics(ray_local, tmp_path, cirr_root, model_dir):
    result, out = run_eval(ray_local, tmp_path, cirr_root, "val", model_dir)
    assert set(result["variants"]) == {"gm", "di", "static", "afc", "image_only", "text_only", "random"}
    assert result["model_fingerprint"] == model_fingerprint(model_dir)
    assert "reference removed" in result["protocol"] and "gallery index" in result["tie_rule"]
    annotations = json.loads((cirr_root / "captions/cap.rc2.val.json").read_text())
    for variant, files in result["submissions"].items():
        scored = score_cirr(annotations, load_submission(files["recall"]), load_submission(files["recall_subset"]),
                            gallery_size=result["counts"]["gallery"])
        assert scored == pytest.approx(result["variants"][variant]), variant
    # the untrained AFC starts as static fusion: same rankings, weights (.5, .5)
    assert result["variants"]["afc"] == pytest.approx(result["variants"]["static"])
    assert result["fusion_weights"]["all"]["mean_a_di"] == pytest.approx(0.5)
    assert set(result["fusion_weights"]["by_edit_type"]) <= {"recolour", "reshape", "add", "remove", "move", "resize"}
    lines = (out / "fusion_weights.csv").read_text().splitlines()
    assert lines[0] == "sample_id,a_gm,a_di,edit_type" and len(lines) == result["counts"]["queries"] + 1
    # the in-training validation that scores sweep trials gives the same numbers, in process
    model, tokenizer = load_model(model_dir)
    in_training = ValidationSplit(out / "prepared").metrics(model.eval(), tokenizer, ["gm", "di", "static", "afc"])
    assert {v: pytest.approx(m) for v, m in in_training.items()} == {v: result["variants"][v] for v in in_training}


def test_cirr_test1_answers_every_pairid_even_blank_captions_and_reuses_the_index(ray_local, tmp_path, cirr_root,
                                                                                   model_dir, capsys):
    root = tmp_path / "cirr"
    shutil.copytree(cirr_root, root)
    path = root / "captions/cap.rc2.test1.json"
    annotations = json.loads(path.read_text())
    annotations[0]["caption"], annotations[1]["caption"] = "", "  ?! "  # blank, and blank once normalised
    path.write_text(json.dumps(annotations))
    result, out = run_eval(ray_local, tmp_path, root, "test1", model_dir)
    assert "variants" not in result and result["counts"]["queries"] == len(annotations)
    warnings = json.loads((out / "prepared/manifest.json").read_text())["warnings"]
    assert sum("empty caption" in w for w in warnings) == 2 and str(annotations[0]["pairid"]) in warnings[0]
    files = {metric: out / f"cirr_test1_{metric}.json" for metric in ("recall", "recall_subset")}
    for metric, file in files.items():
        check_submission(load_submission(file), metric, annotations, gallery_size=result["counts"]["gallery"])
    # the score-cirr command's own format check accepts them (test1 has no targets to score)
    assert main(["score-cirr", "--annotations", str(path), "--recall", str(files["recall"]), "--recall-subset",
                 str(files["recall_subset"]), "--gallery-size", str(result["counts"]["gallery"])]) == 0
    assert f"answer all {len(annotations)} pairids" in capsys.readouterr().out
    run_eval(ray_local, tmp_path, root, "test1", model_dir)
    assert "index: reusing" in capsys.readouterr().out


def test_fashioniq_test_predicts_every_query_and_quarantines_only_the_broken_image(ray_local, tmp_path, model_dir):
    root = tmp_path / "fiq"
    write_synthetic("fashioniq", root, pairs=240, seed=1, image_size=64)
    records = {c: json.loads((root / f"captions/cap.{c}.test.json").read_text()) for c in ("dress", "shirt", "toptee")}
    assert not any("target" in r for rs in records.values() for r in rs)  # unlabelled, as FashionIQ's test split
    records["dress"][0]["captions"] = ["", " "]  # both blank: answered from the candidate alone
    records["shirt"][1]["captions"][0] = ""       # one blank: the other kept
    for category, rs in records.items():
        (root / f"captions/cap.{category}.test.json").write_text(json.dumps(rs))
    hidden = json.loads((root / "synthetic/fashioniq_test_targets.json").read_text())
    broken = hidden["toptee"][2]  # a gallery image no query starts from
    (root / f"images/{broken}.png").write_bytes(b"not a png")
    result, out = run_eval(ray_local, tmp_path, root, "test", model_dir, dataset="fashioniq",
                           max_bad_fraction=0.05)  # 1 of 72 records (48 images, 24 queries)
    assert "variants" not in result and result["counts"]["queries"] == sum(map(len, records.values()))
    quarantined = read_quarantine(out / "prepared")
    assert [q["record"] for q in quarantined] == [broken]
    galleries = {c: set(json.loads((root / f"image_splits/split.{c}.test.json").read_text())) - {broken}
                 for c in records}
    for category, rs in records.items():
        predicted = json.loads((out / f"fashioniq_test_{category}.json").read_text())
        check_predictions(predicted, rs, galleries[category])  # every record, in order, a full ranking
        assert [p["candidate"] for p in predicted] == [r["candidate"] for r in rs]
        assert all(len(p["ranking"]) == min(50, len(galleries[category])) for p in predicted)
        assert set(result["predictions"]) == {"gm", "di", "static", "afc", "image_only", "text_only", "random"}
    # predictions that leave a query unanswered (as a quarantined candidate would) fail the check, naming it
    predicted = json.loads((out / "fashioniq_test_dress.json").read_text())
    rankings = {i: p["ranking"] for i, p in enumerate(predicted) if i != 3}
    with pytest.raises(SubmissionError, match=r"1 caption record\(s\) unanswered.*#3"):
        check_predictions(predictions(records["dress"], rankings), records["dress"], galleries["dress"])


def test_index_refuses_another_model(tmp_path):
    index = GalleryIndex(torch.randn(5, 2, 4), [f"i{n}" for n in range(5)], "aaaa")
    index.save(tmp_path / "index")
    assert GalleryIndex.load(tmp_path / "index", "aaaa").image_ids == index.image_ids
    with pytest.raises(IndexMismatch, match="built by model aaaa.*model in use is bbbb"):
        GalleryIndex.load(tmp_path / "index", "bbbb")


@pytest.mark.parametrize("rule", ["branch_max", "joint_max"])
def test_faiss_search_equals_exact_search(rule, tmp_path):
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.nn.functional.normalize(torch.randn(300, 8, 16, generator=generator), dim=-1)
    index = GalleryIndex(embeddings, [str(n) for n in range(300)], "x", fusion_score=rule)
    queries = torch.nn.functional.normalize(torch.randn(40, 16, generator=generator), dim=-1)
    exact_scores, exact = index.search(queries, 10)
    faiss_scores, approx = index.search_faiss(queries, 10)
    assert torch.equal(exact, approx)
    assert torch.allclose(exact_scores, faiss_scores, atol=1e-5)
    # the rule decides the ranking, and travels with the saved index
    other = GalleryIndex(embeddings, index.image_ids, "x", fusion_score="joint_max" if rule == "branch_max" else "branch_max")
    assert not torch.equal(other.search(queries, 10)[1], exact)
    assert GalleryIndex.load(index.save(tmp_path / "index")).fusion_score == rule


def placeholder_images(root, split_file):
    images = json.loads(split_file.read_text())
    for i, relative in enumerate(images.values()):
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        colour = tuple(int(c) for c in np.random.default_rng(i).integers(0, 255, 3))
        Image.new("RGB", (24, 18), colour).save(path)


@pytest.mark.slow
def test_real_cirr_val_protocol_invariants(ray_local, tmp_path, shared_datasets, model_dir):
    root = tmp_path / "cirr"
    shutil.copytree(shared_datasets / "cirr", root)
    placeholder_images(root, root / "image_splits/split.rc2.val.json")
    result, out = run_eval(ray_local, tmp_path, root, "val", model_dir, batch_size=256)
    annotations = json.loads((root / "captions/cap.rc2.val.json").read_text())
    assert result["counts"] == {"queries": 4181, "gallery": 2297}
    recall = load_submission(out / "cirr_val_recall.json")
    subset = load_submission(out / "cirr_val_recall_subset.json")
    pairids = [str(a["pairid"]) for a in annotations]
    assert sorted(k for k in recall if k not in ("version", "metric")) == sorted(pairids)  # every pairid, once
    for record in annotations:
        top = recall[str(record["pairid"])]
        assert len(top) == 50 and record["reference"] not in top  # the reference never ranks for its own query
        members = set(record["img_set"]["members"]) - {record["reference"]}
        assert len(subset[str(record["pairid"])]) == 3 and set(subset[str(record["pairid"])]) <= members
    scored = score_cirr(annotations, recall, subset)
    assert scored == pytest.approx(result["variants"]["afc"])
    # random scores: subset recall at chance (the target is one of 5 candidates: Rs@2 = 40 %; binomial sd over
    # 4,181 queries 0.76 points, so the 35-45 band is +-6.5 sd)
    assert 35 <= result["variants"]["random"]["Rs@2"] <= 45


def test_fashioniq_per_category_galleries(ray_local, tmp_path, model_dir):
    root = tmp_path / "fiq"
    write_synthetic("fashioniq", root, pairs=240, seed=1, image_size=64)
    result, _ = run_eval(ray_local, tmp_path, root, "val", model_dir, dataset="fashioniq")
    metrics = result["variants"]["di"]
    assert {"dress/R@10", "shirt/R@50", "toptee/R@10", "R@10", "R@50", "Avg"} <= set(metrics)
    assert result["counts"]["queries"] == 24  # 8 val queries per category
    assert metrics["R@10"] == pytest.approx(sum(metrics[f"{c}/R@10"] for c in ("dress", "shirt", "toptee")) / 3)
    assert metrics["Avg"] == pytest.approx((metrics["R@10"] + metrics["R@50"]) / 2)


def test_fashioniq_ranks_each_query_in_its_own_category_gallery():
    """Known truth: every dress query's target is its best dress image, but 20 shirts score higher than it; ranked
    in the dress gallery the target is first (R@10 100), ranked over every image it would be 21st (R@10 0)."""
    import pyarrow as pa

    from detailfusion.eval.protocols import fashioniq_variant_metrics

    tokens, width = 2, 4  # index embeddings [N, tokens, 2 * width]; branch_max scores each half
    axis = torch.eye(2 * width)
    dress = [F.normalize(axis[0] + 0.1 * (n + 1) * axis[1], dim=0) for n in range(30)]  # d0 nearest axis 0
    shirts = [axis[0] for _ in range(20)] + [axis[5] for _ in range(40)]  # 20 shirts exactly on axis 0
    embeddings = torch.stack([v.expand(tokens, -1) for v in dress + shirts])
    ids = [f"d{n}" for n in range(30)] + [f"s{n}" for n in range(60)]
    index = GalleryIndex(embeddings, ids, "x")
    gallery = pa.table({"image_id": ids, "category": ["dress"] * 30 + ["shirt"] * 60})
    triplets = pa.table({"category": ["dress", "shirt"], "target_id": ["d0", "s45"]})
    queries = {"gm": torch.stack([axis[0], axis[5]])}  # s45: 26th of the 40 shirts tied on axis 5, in gallery order
    metrics = fashioniq_variant_metrics(triplets, gallery, index, queries, ["gm"])["gm"]
    assert metrics["dress/R@10"] == 100.0 and metrics["dress/R@50"] == 100.0
    assert metrics["shirt/R@10"] == 0.0 and metrics["shirt/R@50"] == 100.0
    assert metrics["R@10"] == 50.0


def test_cli_errors_are_clear(tmp_path, capsys, cirr_root):
    assert main(["evaluate", "--dataset", "cirr", "--root", str(cirr_root), "--split", "val",
                 "--checkpoint", str(tmp_path / "absent"), "--out", str(tmp_path / "o")]) == 2
    assert "no exported model there" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": "rc2", "metric": "recall", "1": ["a"]}')
    annotations = str(cirr_root / "captions/cap.rc2.val.json")
    assert main(["score-cirr", "--annotations", annotations, "--recall", str(bad), "--recall-subset", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "pairid(s) missing" in err and "not in the annotations: 1" in err
    broken = tmp_path / "broken.json"
    broken.write_text("[{")
    assert main(["score-cirr", "--annotations", str(broken), "--recall", str(bad), "--recall-subset", str(bad)]) == 2
    assert "malformed JSON" in capsys.readouterr().err


def test_in_process_encoding_equals_the_actor_pool(ray_local, tmp_path, cirr_root, model_dir):
    """A small split with one encoder is encoded in the calling process (no actor start-up); Ray Data's actor pool
    gives the same gallery index (embeddings, order, thumbnails) and the same query features."""
    import pyarrow.parquet as pq

    from detailfusion.config import PrepareConfig
    from detailfusion.data.prepare import prepare
    from detailfusion.eval.encode import EncodeOptions, encode_gallery, encode_queries

    prepared = tmp_path / "prep"
    prepare(PrepareConfig(dataset="cirr", root=str(cirr_root), split="val", out=str(prepared)))
    here, pool = EncodeOptions(batch_size=16), EncodeOptions(batch_size=16, cpus_per_actor=0.5, in_process_max_rows=0)
    assert here.in_process(100) and not pool.in_process(100)
    local, pooled = (encode_gallery(prepared, model_dir, "fp", options) for options in (here, pool))
    assert local.image_ids == pooled.image_ids and local.thumbnails == pooled.thumbnails
    torch.testing.assert_close(local.embeddings, pooled.embeddings, rtol=0, atol=1e-6)
    triplets = pq.read_table(prepared / "triplets")
    a, b = (encode_queries(prepared, model_dir, triplets, options) for options in (here, pool))
    assert a.sample_ids == b.sample_ids == triplets.column("sample_id").to_pylist()
    for name in ("q_gm", "q_di", "text_gm", "unified", "weights"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=1e-6, equal_nan=True)
