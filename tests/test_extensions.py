"""The four extension points, each used from this file alone: a fusion rule, a compositor, a stage objective and a
dataset are defined here and registered once (``library/registry.py``), then run through the index, a stage on Ray
Train + DeepSpeed, and prepare + evaluate on Ray Data, with no change to the package. The Train workers and the
encoder actors get the registrations shipped with the job (``registry.extensions``)."""

import csv
import json

import pytest
import torch
from conftest import REPO
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

from detailfusion.library.config import ConfigError, JobConfig, TrainConfig, load_config
from detailfusion.library.data.reading import ReadResult
from detailfusion.library.datasets import DATASETS, Dataset
from detailfusion.library.eval.metrics import target_ranks
from detailfusion.library.eval.protocols import Protocol, SplitRanks
from detailfusion.library.eval.variants import variant_scores
from detailfusion.library.losses import ContrastiveLoss
from detailfusion.library.model import BranchQueryOutput, CompositorOutput, build_model
from detailfusion.library.model.compositor import COMPOSITORS
from detailfusion.library.model.fusion import FUSION_RULES, FusionRule, fused_query
from detailfusion.library.objectives import OBJECTIVES, Objective

# -- a fusion rule: the branch weights sharpened (a^2, renormalised) before each branch's own max ------------------


def sharpened(weights: torch.Tensor) -> torch.Tensor:
    squared = weights ** 2
    return 2 ** 0.5 * squared / squared.sum(dim=1, keepdim=True).clamp(min=1e-12)


@pytest.fixture
def toy_rule():
    FUSION_RULES.register("toy_sharp", FusionRule(sharpened, joint=False))
    yield "toy_sharp"
    FUSION_RULES.unregister("toy_sharp")


def test_a_fusion_rule_registered_here_runs_through_the_index(toy_rule, tmp_path):
    """The rule scores as defined here (checked by hand), in the model's unified query, in the exact index and in a
    compressed one searching every token, and survives the index's files; configs accept its name."""
    from detailfusion.library.config import CompressedIndexConfig, IndexBackendConfig
    from detailfusion.library.index.exact import GalleryIndex
    from detailfusion.library.index.store import open_index, write_index

    assert load_config(JobConfig, None, [f"model.fusion_score={toy_rule}"]).model.fusion_score == toy_rule
    generator = torch.Generator().manual_seed(0)
    gallery = torch.cat([F.normalize(torch.randn(200, 8, 16, generator=generator), dim=-1) for _ in range(2)], -1)
    gallery = gallery / 2 ** 0.5
    q_gm, q_di = (F.normalize(torch.randn(12, 16, generator=generator), dim=-1) for _ in range(2))
    a = torch.rand(12, 1, generator=generator)
    weights = torch.cat([a, 1 - a], dim=1)
    queries = fused_query(q_gm, q_di, weights, toy_rule)
    by_hand = (sharpened(weights)[:, :1] * torch.einsum("bd,nkd->bnk", q_gm, gallery[..., :16]).amax(-1)
               + sharpened(weights)[:, 1:] * torch.einsum("bd,nkd->bnk", q_di, gallery[..., 16:]).amax(-1))
    exact = GalleryIndex(gallery, [f"img{i}" for i in range(200)], "m", fusion_score=toy_rule)
    assert torch.allclose(exact.scores(queries), by_hand, atol=1e-5)
    top = exact.search(queries, 10)[1]
    assert torch.equal(top, by_hand.topk(10, dim=1).indices)
    everything = CompressedIndexConfig(nlist=8, m=4, nbits=4, nprobe=8, candidates=10**6, rerank=0,
                                       store_dtype="float32")
    write_index(exact, tmp_path / "ivfpq", IndexBackendConfig(kind="ivfpq", ivfpq=everything))
    compressed = open_index(tmp_path / "ivfpq", "m")
    assert compressed.fusion_score == toy_rule and torch.equal(compressed.search(queries, 10)[1], top)
    model, _ = build_model("tiny", fusion_score=toy_rule, compositor="static")
    gm, di = (BranchQueryOutput(q, torch.zeros(12, 3, 64), torch.ones(12, 3)) for q in (q_gm, q_di))
    assert torch.allclose(model.compose(gm, di).query, fused_query(q_gm, q_di, torch.full((12, 2), 0.5), toy_rule))


# -- a compositor: one learned gate per branch, the same for every query ------------------------------------------


class ToyGate(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(2))
        self.rule = config.fusion_score

    def forward(self, gm: BranchQueryOutput, di: BranchQueryOutput) -> CompositorOutput:
        weights = self.gate.softmax(dim=0).to(gm.feature.dtype).expand(gm.feature.shape[0], -1)
        return CompositorOutput(query=fused_query(gm.feature, di.feature, weights, self.rule), weights=weights)


@pytest.fixture
def toy_compositor():
    COMPOSITORS.register("toy_gate", ToyGate)
    yield "toy_gate"
    COMPOSITORS.unregister("toy_gate")


@pytest.fixture(scope="module")
def cirr_split(stage2_data):
    """conftest's random tiny model (standing in for a stage export) and feature-cached synthetic CIRR train split."""
    root, _ = stage2_data
    return root


def test_a_compositor_registered_here_trains_at_stage_3(toy_compositor, cirr_split, tmp_path):
    """Stage 3 builds the compositor named in the config from the registry, in the driver and in every Train
    worker; its gate is what L_C trains (the branches stay frozen) and the export names it."""
    from detailfusion.platform.train.run import run_stage

    config = load_config(JobConfig, REPO / "jobs/configs/stage3_tiny.yaml", [
        f"workdir={tmp_path}", f"data.prepared={cirr_split / 'prep'}", f"model.init_from={cirr_split / 'init'}",
        f"model.compositor={toy_compositor}", "data.holdout_fraction=0", "train.batch_size=64", "train.epochs=1",
        "train.log_every=2"])
    export = run_stage(config)
    assert json.loads((export / "config.json").read_text())["compositor"] == toy_compositor
    before, after = load_file(cirr_split / "init" / "model.safetensors"), load_file(export / "model.safetensors")
    assert not torch.equal(after["compositor.gate"], torch.zeros(2))
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(("gm_branch.", "di_branch.")))


# -- a stage objective: plain in-batch InfoNCE on the DI branch (no hard negatives), with a part of its own ------


def build_in_batch(config, fusion_score):
    return ContrastiveLoss(gather=config.gather_across_ranks)


def in_batch_forward(model, loss_fn, batch, images):
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], branches=("di",),
                **{f"reference_{images}": batch["reference"], f"target_{images}": batch["target"]})
    parts = loss_fn(out.query_di, out.target_di, model.di_branch.temperature())
    return {**parts, "toy_temperature": model.di_branch.temperature().detach()}


@pytest.fixture
def toy_objective():
    OBJECTIVES.register("toy_in_batch", Objective(build_in_batch, in_batch_forward, "triplets", near_duplicates=False))
    yield "toy_in_batch"
    OBJECTIVES.unregister("toy_in_batch")


def test_an_objective_registered_here_trains_a_stage(toy_objective, cirr_split, tmp_path):
    """``train.objective`` swaps the registered objective into stage 2 (it reads the same triplets): every logged step
    carries its own part, and an objective that reads other batches is refused naming both."""
    from detailfusion.platform.train.run import run_stage
    from detailfusion.platform.train.stages import stage_spec

    with pytest.raises(ConfigError, match="reads triplets batches; stage 3 .* feeds branch_outputs"):
        stage_spec(TrainConfig(stage=3, objective=toy_objective))
    with pytest.raises(ConfigError, match="unknown stage objective 'nope'; registered: .*toy_in_batch"):
        stage_spec(TrainConfig(stage=2, objective="nope"))
    config = load_config(JobConfig, REPO / "jobs/configs/stage2_tiny.yaml", [
        f"workdir={tmp_path}", f"data.prepared={cirr_split / 'prep'}", f"model.init_from={cirr_split / 'init'}",
        f"train.objective={toy_objective}", "loss.subset_negatives=0", "data.holdout_fraction=0",
        "train.batch_size=64", "train.epochs=1", "train.log_every=1"])
    export = run_stage(config)
    with open(tmp_path / "stage2" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(float(r["toy_temperature"]) > 0 for r in rows)
    before, after = load_file(cirr_split / "init" / "model.safetensors"), load_file(export / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("di_branch."))


# -- a dataset: a JSON list of queries over a folder of PNGs, scored by Recall@K over the whole gallery -------------


def read_toy(root, split, categories) -> ReadResult:
    result = ReadResult()
    images = sorted(p.stem for p in (root / "images").glob("*.png"))
    result.gallery = [dict(image_id=i, dataset="toy_json", split=split, location=f"images/{i}.png", category=None)
                      for i in images]
    for n, q in enumerate(json.loads((root / f"queries.{split}.json").read_text())):
        result.triplets.append(dict(sample_id=f"toy_json/{split}/{n}", dataset="toy_json", split=split,
                                    reference_id=q["reference"], target_id=q["target"], text=q["text"],
                                    text_variants=[q["text"]], subset_ids=[], category=None))
    return result


class RecallOverTheGallery(Protocol):
    description = "toy: each query ranks the whole gallery without its reference; R@10, R@50"
    predictions_key = "toy_predictions"

    def caption_files(self, split, categories):
        return {None: f"queries.{split}.json"}

    def split_ranks(self, triplets, gallery, index, queries, variants, seed=0):
        rows = triplets.to_pylist()
        targets = torch.tensor([index.position[r["target_id"]] for r in rows])
        is_reference = torch.zeros(len(rows), len(index), dtype=torch.bool)
        is_reference[torch.arange(len(rows)), [index.position[r["reference_id"]] for r in rows]] = True
        ranks = {v: target_ranks(variant_scores(v, queries, index, seed=seed), targets, is_reference) for v in variants}
        return SplitRanks(ranks, categories=["all"] * len(rows))

    def write_predictions(self, out, split, triplets, gallery, index, queries, variants, annotations, main, labelled,
                          seed=0):
        top = variant_scores(main, queries, index, seed=seed).topk(5, dim=1).indices
        path = out / f"toy_{split}.json"
        path.write_text(json.dumps([[index.image_ids[i] for i in row] for row in top.tolist()]))
        assert len(annotations[None]) == len(top)  # every query of the caption file answered
        return {main: str(path)}


@pytest.fixture
def toy_dataset():
    DATASETS.register("toy_json", Dataset("gallery", read=read_toy, protocol=RecallOverTheGallery()))
    yield "toy_json"
    DATASETS.unregister("toy_json")


def test_a_dataset_registered_here_prepares_and_evaluates(toy_dataset, cirr_split, tmp_path):
    """``prepare`` reads the toy layout through its registered reader (Ray Data decodes the PNGs), ``evaluate``
    scores it by the registered protocol and writes its predictions; a protocol-less name is refused."""
    from detailfusion.library.config import EvalConfig, PrepareConfig
    from detailfusion.platform.data.prepare import prepare
    from detailfusion.platform.eval.evaluate import evaluate

    root = tmp_path / "toy"
    (root / "images").mkdir(parents=True)
    colours = [(40 * i % 256, 90 * i % 256, 150 * i % 256) for i in range(12)]
    for i, colour in enumerate(colours):
        Image.new("RGB", (64, 64), colour).save(root / "images" / f"im{i:02d}.png")
    queries = [{"reference": f"im{i:02d}", "target": f"im{(i + 1) % 12:02d}", "text": "make it brighter"}
               for i in range(12)]
    (root / "queries.val.json").write_text(json.dumps(queries))
    manifest = prepare(PrepareConfig(dataset=toy_dataset, root=str(root), split="val", out=str(tmp_path / "prep")))
    assert manifest.dataset == toy_dataset and manifest.counts["triplets"] == 12 and manifest.counts["images"] == 12
    result = evaluate(EvalConfig(dataset=toy_dataset, split="val", checkpoint=str(cirr_split / "init"),
                                 prepared=str(tmp_path / "prep"), out=str(tmp_path / "eval"), cpus_per_actor=0.5))
    assert result["protocol"].startswith("toy:") and result["counts"] == {"queries": 12, "gallery": 12}
    assert {"R@10", "R@50", "Avg"} <= set(result["variants"]["static"])
    assert result["variants"]["static"]["R@50"] == 100.0  # 11 candidates: every target is in the top 50
    predictions = json.loads((tmp_path / "eval" / "toy_val.json").read_text())
    assert len(predictions) == 12 and all(len(row) == 5 for row in predictions)
    with pytest.raises(ConfigError, match="'ipr2pr' has no evaluation protocol"):
        EvalConfig(dataset="ipr2pr")
