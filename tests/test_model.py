"""The DetailFusion model: shapes, frozen ViT, compositors, save/load round trip, and the real BLIP-2 loading path."""

import math

import pytest
import torch
from transformers import Blip2Config, Blip2ForImageTextRetrieval

from detailfusion.library.losses import max_similarity
from detailfusion.library.model import (
    build_model,
    list_compositors,
    list_presets,
    load_model,
    save_model,
)
from detailfusion.library.model.fusion import fused_scores

B = 4


def batch(tokenizer, size=64, n=B, seed=0):
    g = torch.Generator().manual_seed(seed)
    texts = ["make the red circle blue", "remove the green star", "add a small white cross", "move the square"][:n]
    text = tokenizer(texts, padding="max_length", truncation=True, max_length=32, return_tensors="pt")
    return dict(
        input_ids=text.input_ids,
        attention_mask=text.attention_mask,
        reference_pixel_values=torch.randn(n, 3, size, size, generator=g),
        target_pixel_values=torch.randn(n, 3, size, size, generator=g),
    )


def test_presets_and_compositors_are_listed_and_unknown_names_say_what_exists():
    assert {"tiny", "blip2"} <= set(list_presets())
    assert list_compositors() == ["afc", "concat_linear", "static"]
    with pytest.raises(ValueError, match="known: .*tiny"):
        build_model("huge")
    with pytest.raises(ValueError, match="unknown compositor .mean.; registered: afc, concat_linear, static"):
        build_model("tiny", compositor="mean")


def test_forward_shapes_and_frozen_vision(tiny):
    model, tokenizer = tiny
    cfg = model.config
    out = model(**batch(tokenizer), with_reference_targets=True, compose=True)
    d, nq = cfg.embed_dim, cfg.num_query_tokens
    assert out.query_gm.shape == out.query_di.shape == (B, d)
    assert out.target_gm.shape == out.target_di.shape == out.reference_di.shape == (B, nq, d)
    assert out.unified_query.shape == (B, 2 * d) and out.gallery.shape == (B, nq, 2 * d)
    assert torch.allclose(out.query_gm.norm(dim=-1), torch.ones(B), atol=1e-5)
    assert torch.allclose(out.gallery.norm(dim=-1), torch.ones(B, nq), atol=1e-5)
    # query tokens are distinct (zeros, HF's default, would make all Nq target features identical)
    assert (out.target_gm[:, 0] - out.target_gm[:, 1]).abs().max() > 1e-4
    assert not any(p.requires_grad for p in model.vision_model.parameters())
    model.train()
    assert not model.vision_model.training
    model.eval()


def test_branches_have_separate_weights_and_text_changes_the_query(tiny):
    model, tokenizer = tiny
    assert model.gm_branch.query_tokens.data_ptr() != model.di_branch.query_tokens.data_ptr()
    inputs = batch(tokenizer)
    with torch.no_grad():
        a = model(**inputs, branches=("di",))
        inputs["input_ids"] = inputs["input_ids"].flip(0)
        inputs["attention_mask"] = inputs["attention_mask"].flip(0)
        b = model(**inputs, branches=("di",))
    assert a.query_gm is None
    assert not torch.allclose(a.query_di, b.query_di)
    assert torch.allclose(a.target_di, b.target_di)  # target path ignores text


def test_branch_max_score_is_the_weighted_sum_of_each_branch_max_sim(tiny):
    """METHOD.md's default: s(k) = a_g max_j <q_g, t_g,k,j> + a_d max_j <q_d, t_d,k,j>, each branch its own max."""
    model, tokenizer = tiny
    with torch.no_grad():
        out = model(**batch(tokenizer), compose=True)
    a = out.fusion_weights
    expected = (a[:, :1] * max_similarity(out.query_gm, out.target_gm)
                + a[:, 1:] * max_similarity(out.query_di, out.target_di))
    assert model.config.fusion_score == "branch_max"
    assert torch.allclose(fused_scores(out.unified_query, out.gallery, "branch_max"), expected, atol=1e-5)
    # an untrained AFC starts as static (.5, .5) fusion
    assert torch.allclose(a, torch.full_like(a, 0.5))


def test_joint_max_score_blends_token_by_token():
    """The ablation's rule: <u, t> = (sqrt(a_g) <q_g,t_g> + sqrt(a_d) <q_d,t_d>) / sqrt 2 per token, one max."""
    torch.manual_seed(0)
    model, tokenizer = build_model("tiny", fusion_score="joint_max")
    with torch.no_grad():
        out = model.eval()(**batch(tokenizer), compose=True)
        unified = torch.einsum("bd,nkd->bnk", out.unified_query, out.gallery)
        a = out.fusion_weights
        expected = (
            a[:, 0, None, None].sqrt() * torch.einsum("bd,nkd->bnk", out.query_gm, out.target_gm)
            + a[:, 1, None, None].sqrt() * torch.einsum("bd,nkd->bnk", out.query_di, out.target_di)
        ) / math.sqrt(2)
    assert torch.allclose(unified, expected, atol=1e-5)
    assert torch.allclose(fused_scores(out.unified_query, out.gallery, "joint_max"), expected.amax(-1), atol=1e-5)
    with pytest.raises(ValueError, match="fusion_score: unknown fusion rule 'best_max'; registered: branch_max, joint_max"):
        build_model("tiny", fusion_score="best_max")


@pytest.mark.parametrize("rule", ["branch_max", "joint_max"])
@pytest.mark.parametrize("weights, branch", [((1.0, 0.0), "gm"), ((0.0, 1.0), "di")])
def test_static_single_branch_weights_rank_like_that_branch(weights, branch, rule):
    torch.manual_seed(0)
    model, tokenizer = build_model("tiny", compositor="static", static_weights=list(weights), fusion_score=rule)
    with torch.no_grad():
        out = model.eval()(**batch(tokenizer), compose=True)
    unified = fused_scores(out.unified_query, out.gallery, rule)
    single = max_similarity(out[f"query_{branch}"], out[f"target_{branch}"])
    assert torch.allclose(unified, single if rule == "branch_max" else single / math.sqrt(2), atol=1e-5)


def test_afc_weights_depend_on_the_query_once_trained():
    torch.manual_seed(0)
    model, tokenizer = build_model("tiny")
    torch.nn.init.normal_(model.compositor.head[-1].weight, std=1.0)  # as if trained
    with torch.no_grad():
        out = model.eval()(**batch(tokenizer), compose=True)
    assert torch.allclose(out.fusion_weights.sum(-1), torch.ones(B))
    assert out.fusion_weights[:, 0].std() > 1e-3


def test_concat_linear_starts_as_static_fusion():
    torch.manual_seed(0)
    model, tokenizer = build_model("tiny", compositor="concat_linear")
    with torch.no_grad():
        out = model.eval()(**batch(tokenizer), compose=True)
    static = torch.cat([out.query_gm, out.query_di], dim=-1) / math.sqrt(2)
    assert out.fusion_weights is None
    assert torch.allclose(out.unified_query, static, atol=1e-6)
    # ... which under branch_max scores (s_gm + s_di) / 2, the static blend's score
    halves = (max_similarity(out.query_gm, out.target_gm) + max_similarity(out.query_di, out.target_di)) / 2
    assert torch.allclose(fused_scores(out.unified_query, out.gallery, "branch_max"), halves, atol=1e-5)


def test_save_and_load_round_trip_gives_the_same_outputs(tiny, tmp_path):
    model, tokenizer = tiny
    save_model(model, tokenizer, tmp_path / "m")
    files = {p.name for p in (tmp_path / "m").iterdir()}
    assert "model.safetensors" in files and "config.json" in files and "tokenizer.json" in files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    loaded, loaded_tok = load_model(tmp_path / "m")
    inputs = batch(tokenizer)
    assert loaded_tok.tokenize("make the red circle blue") == tokenizer.tokenize("make the red circle blue")
    with torch.no_grad():
        a = model(**inputs, with_reference_targets=True, compose=True)
        b = loaded.eval()(**inputs, with_reference_targets=True, compose=True)
    for key in a.keys():
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    with pytest.raises(FileNotFoundError, match="not a DetailFusion model"):
        load_model(tmp_path / "nothing")


def test_fusion_score_survives_save_and_load_and_old_configs_read_as_branch_max(tiny, tmp_path):
    """The rule travels in config.json; a config.json written before the key existed loads as METHOD.md's default."""
    import copy
    import json

    model, tokenizer = tiny
    joint = copy.deepcopy(model)
    joint.config.fusion_score = "joint_max"
    save_model(joint, tokenizer, tmp_path / "joint")
    assert json.loads((tmp_path / "joint" / "config.json").read_text())["fusion_score"] == "joint_max"
    assert load_model(tmp_path / "joint")[0].config.fusion_score == "joint_max"
    save_model(model, tokenizer, tmp_path / "old")
    config_file = tmp_path / "old" / "config.json"
    config = json.loads(config_file.read_text())
    del config["fusion_score"]
    config_file.write_text(json.dumps(config))
    assert load_model(tmp_path / "old")[0].config.fusion_score == "branch_max"
    config["fusion_score"] = "token_max"
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="fusion_score: unknown fusion rule 'token_max'"):
        load_model(tmp_path / "old")


def tiny_blip2_checkpoint(path):
    config = Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        qformer_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            vocab_size=300, max_position_embeddings=64, use_qformer_text_input=True),
        num_query_tokens=4,
        image_text_hidden_size=16,
    )
    torch.manual_seed(1)
    source = Blip2ForImageTextRetrieval(config)
    with torch.no_grad():  # HF zero-initialises query tokens; make them distinguishable
        source.query_tokens.normal_()
    source.eval().save_pretrained(path)
    from detailfusion.library.model.tokenizer import build_tiny_tokenizer

    build_tiny_tokenizer(300).save_pretrained(path)
    return source


def test_blip2_preset_loads_a_saved_blip2_retrieval_checkpoint(tmp_path):
    source = tiny_blip2_checkpoint(tmp_path / "blip2")
    model, tokenizer = build_model("blip2", pretrained=str(tmp_path / "blip2"))
    assert model.config.backbone_source == str(tmp_path / "blip2")
    assert model.config.num_query_tokens == 4 and model.config.embed_dim == 16
    src = source.state_dict()
    for name, tensor in model.vision_model.state_dict().items():
        assert torch.equal(tensor, src[f"vision_model.{name}"]), name
    mapping = {"query_tokens": "query_tokens", "embeddings.": "embeddings.", "qformer.": "qformer.",
               "vision_proj.": "vision_projection.", "text_proj.": "text_projection."}
    for branch in ("gm_branch", "di_branch"):
        compared = 0
        for name, tensor in getattr(model, branch).state_dict().items():
            if name == "temp":
                continue
            prefix = next(p for p in mapping if name.startswith(p))
            assert torch.equal(tensor, src[mapping[prefix] + name[len(prefix):]]), f"{branch}.{name}"
            compared += 1
        assert compared > 20
    assert torch.equal(model.gm_branch.qformer.encoder.layer[0].attention.attention.query.weight,
                       model.di_branch.qformer.encoder.layer[0].attention.attention.query.weight)
    assert model.gm_branch.qformer.encoder.layer[0].attention.attention.query.weight.data_ptr() != \
        model.di_branch.qformer.encoder.layer[0].attention.attention.query.weight.data_ptr()
    # and the loaded model runs and reproduces BLIP-2's own image features through the target path
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = model.eval().encode_targets(model.encode_image(pixels), branches=("gm",))["gm"]
        vision = source.vision_model(pixel_values=pixels).last_hidden_state
        hidden = source.qformer(query_embeds=source.query_tokens.expand(2, -1, -1), encoder_hidden_states=vision)
        theirs = torch.nn.functional.normalize(source.vision_projection(hidden.last_hidden_state), dim=-1)
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert tokenizer.tokenize("make it red") == ["make", "it", "red"]


def test_tiny_backward_of_32_triplets_reaches_both_branches_and_compositor(capsys):
    """Speed (well under a second on CPU) is measured in benchmarks/model_step.py, not here."""
    torch.manual_seed(0)
    model, tokenizer = build_model("tiny")
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    inputs = batch(tokenizer, n=4)
    inputs = {k: v.repeat(8, *([1] * (v.dim() - 1))) for k, v in inputs.items()}
    out = model(**inputs, with_reference_targets=True, compose=True)
    loss = max_similarity(out.unified_query, out.gallery).logsumexp(-1).sum() + out.reference_di.sum()
    loss.backward()
    for part in (model.gm_branch.query_tokens, model.di_branch.query_tokens, model.compositor.head[-1].weight,
                 model.di_branch.qformer.encoder.layer[0].crossattention.attention.key.weight):
        assert part.grad is not None and part.grad.abs().sum() > 0
    with capsys.disabled():
        print(f"\ntiny DetailFusion: {total:,} parameters, {trainable:,} trainable")
