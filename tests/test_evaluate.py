"""evaluate / score-cirr / index end to end on Ray (untrained tiny model): the protocol's invariants on the REAL
CIRR val annotations with placeholder images, submissions scored back equal to the metrics, FashionIQ galleries,
unlabelled CIRR test1 / FashionIQ test answering every query, the index's reuse and model check, clear errors."""

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F

from detailfusion.library.config import EvalConfig
from detailfusion.library.data.synthetic import write_synthetic
from detailfusion.library.datasets import dataset
from detailfusion.library.errors import DataError
from detailfusion.library.eval.fashioniq_predictions import check_predictions, predictions
from detailfusion.library.eval.submission import SubmissionError, check_submission, load_submission, score_cirr
from detailfusion.library.index.exact import GalleryIndex, IndexMismatch
from detailfusion.library.model import load_model, model_fingerprint, save_model
from detailfusion.platform.cli import main
from detailfusion.platform.data.prepare import read_quarantine
from detailfusion.platform.eval.evaluate import evaluate, query_tags
from detailfusion.platform.eval.validate import ValidationSplit


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


def scored_on(records, files, pairids, gallery_size):
    """A variant's submissions scored back (score-cirr, as the server does) on the queries ``pairids`` alone."""
    chosen = [r for r in records if str(r["pairid"]) in pairids]
    recall, subset = (load_submission(files[metric]) for metric in ("recall", "recall_subset"))
    keep = lambda s: {k: v for k, v in s.items() if k in ("version", "metric") or k in pairids}  # noqa: E731
    return score_cirr(chosen, keep(recall), keep(subset), gallery_size=gallery_size)


def test_cirr_val_submissions_score_back_to_the_metrics(ray_local, tmp_path, model_dir):
    # benchmark v2 (tagged by its generator): 30 val queries over 183 images, so that a top 10 is selective and the
    # unimodal-hard set is neither empty nor everything (on the 18-image near-duplicate val, the shipped ViT's
    # image-only ranks every target in its top 10)
    root = tmp_path / "cirr"
    write_synthetic("detail", root, pairs=10, val_pairs=30, test_pairs=10, seed=3)
    annotations = json.loads((root / "captions/cap.rc2.val.json").read_text())
    result, out = run_eval(ray_local, tmp_path, root, "val", model_dir)
    assert set(result["variants"]) == {"gm", "di", "static", "afc", "image_only", "text_only", "random"}
    assert result["model_fingerprint"] == model_fingerprint(model_dir)
    assert "reference removed" in result["protocol"] and "gallery index" in result["tie_rule"]
    gallery, queries = result["counts"]["gallery"], result["counts"]["queries"]
    everything = {str(r["pairid"]) for r in annotations}
    for variant, files in result["submissions"].items():
        assert scored_on(annotations, files, everything, gallery) == pytest.approx(result["variants"][variant]), variant
    # by family / direction: each group's metrics are its own queries' scored back; the count-weighted means of a
    # partition's metrics are the overall metrics
    for key, field in (("by_family", "edit_family"), ("by_direction", "direction")):
        groups = {}
        for r in annotations:
            groups.setdefault(r[field], set()).add(str(r["pairid"]))
        assert result["counts"][key] == {label: len(ids) for label, ids in sorted(groups.items())}
        assert set(result[key]) == set(groups) and all(len(ids) for ids in groups.values())
        for variant, files in result["submissions"].items():
            for label, ids in groups.items():
                assert scored_on(annotations, files, ids, gallery) == pytest.approx(result[key][label][variant])
            for metric, value in result["variants"][variant].items():
                weighted = sum(n * result[key][label][variant][metric] for label, n in result["counts"][key].items())
                assert weighted / queries == pytest.approx(value), (key, variant, metric)
        assert {label: s["n"] for label, s in result["fusion_weights"][key].items()} == result["counts"][key]
    # unimodal-hard: the queries whose target is in the top 10 of neither the image_only nor the text_only lists
    targets = {str(r["pairid"]): r["target_hard"] for r in annotations}
    solved = {v: {p for p, ranked in load_submission(result["submissions"][v]["recall"]).items()
                  if p in targets and targets[p] in ranked[:10]} for v in ("image_only", "text_only")}
    hard = everything - solved["image_only"] - solved["text_only"]
    found = result["unimodal_hard"]
    assert found["queries"] == len(hard) and 0 < len(hard) < queries
    assert found["solved_by"] == {"image_only": len(solved["image_only"]), "text_only": len(solved["text_only"]),
                                  "either": queries - len(hard)}
    assert "neither image_only" in found["definition"] and "top 10" in found["definition"]
    for variant, files in result["submissions"].items():
        assert scored_on(annotations, files, hard, gallery) == pytest.approx(found["variants"][variant]), variant
    assert found["variants"]["image_only"]["R@10"] == found["variants"]["text_only"]["R@10"] == 0.0
    # the untrained AFC starts as static fusion: same rankings, weights (.5, .5)
    assert result["variants"]["afc"] == pytest.approx(result["variants"]["static"])
    assert result["fusion_weights"]["all"]["mean_a_di"] == pytest.approx(0.5)
    assert set(result["fusion_weights"]["by_edit_type"]) == {r["edit_type"] for r in annotations}
    rows = list(csv.DictReader((out / "fusion_weights.csv").open()))
    assert list(rows[0]) == ["sample_id", "a_gm", "a_di", "edit_type", "edit_family", "direction", "scene_root"]
    tags = {f"cirr/val/{r['pairid']}": [r["edit_type"], r["edit_family"], r["direction"], str(r["scene_root"])]
            for r in annotations}
    assert {row["sample_id"]: [row[k] for k in list(row)[3:]] for row in rows} == tags
    # a family outside local / global is refused, naming the file and the query
    annotations[3]["edit_family"] = "Local"
    (root / "captions/cap.rc2.val.json").write_text(json.dumps(annotations))
    with pytest.raises(DataError, match=rf"cap.rc2.val.json: query cirr/val/{annotations[3]['pairid']} has "
                                        r"edit_family 'Local'"):
        query_tags(out / "prepared", dataset("cirr"), list(tags))
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
    weights = result["fusion_weights"]  # benchmark v1's side file (query_tags' fallback): local edits, no direction
    assert set(weights["by_family"]) == {"local"} and weights["by_family"]["local"]["n"] == len(annotations)
    assert "by_direction" not in weights and "by_family" not in result and "unimodal_hard" not in result
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
    hard = result["unimodal_hard"]  # real CIRR carries no tags: no by_family, but the unimodal-hard queries
    assert hard["queries"] + hard["solved_by"]["either"] == 4181 and "by_family" not in result


def test_fashioniq_per_category_galleries(ray_local, tmp_path, model_dir):
    root = tmp_path / "fiq"
    write_synthetic("fashioniq", root, pairs=240, seed=1, image_size=64)
    result, _ = run_eval(ray_local, tmp_path, root, "val", model_dir, dataset="fashioniq")
    metrics = result["variants"]["di"]
    assert {"dress/R@10", "shirt/R@50", "toptee/R@10", "R@10", "R@50", "Avg"} <= set(metrics)
    assert result["counts"]["queries"] == 24  # 8 val queries per category
    assert metrics["R@10"] == pytest.approx(sum(metrics[f"{c}/R@10"] for c in ("dress", "shirt", "toptee")) / 3)
    assert metrics["Avg"] == pytest.approx((metrics["R@10"] + metrics["R@50"]) / 2)
    hard = result["unimodal_hard"]  # ranked in each query's category gallery, as every FashionIQ metric
    assert hard["queries"] + hard["solved_by"]["either"] == 24 and "by_family" not in result
    if hard["queries"]:
        assert hard["variants"]["image_only"]["R@10"] == hard["variants"]["text_only"]["R@10"] == 0.0
        assert set(hard["variants"]) == set(result["variants"])


def test_fashioniq_ranks_each_query_in_its_own_category_gallery():
    """Known truth: every dress query's target is its best dress image, but 20 shirts score higher than it; ranked
    in the dress gallery the target is first (R@10 100), ranked over every image it would be 21st (R@10 0)."""
    import pyarrow as pa

    from detailfusion.library.eval.protocols import FashionIQProtocol

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
    metrics = FashionIQProtocol().split_ranks(triplets, gallery, index, queries, ["gm"]).metrics("gm")
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

    from detailfusion.library.config import PrepareConfig
    from detailfusion.platform.data.prepare import prepare
    from detailfusion.platform.eval.encode import EncodeOptions, encode_gallery, encode_queries

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
