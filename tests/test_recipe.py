"""The training recipe of METHOD.md, point by point, without Ray: precision (fp32 master weights under bf16 autocast,
fp32 LayerNorm / logits, fp32 exports and loads), temperatures (clamped in place, never without a gradient; no weight
decay), per-branch clipping, the one-cycle divisors, the independent hard-negative switches, stage 3's compositor
from its own config, the blip2 configs' values, and seeded per-epoch data order."""

from pathlib import Path

import pytest
import torch

from detailfusion.library.config import JobConfig, load_config, with_value
from detailfusion.library.losses import ContrastiveLoss, DetailLoss, max_similarity
from detailfusion.library.model import build_model, load_model, save_model
from detailfusion.library.model.branch import TEMPERATURE_BOUNDS
from detailfusion.platform.train.engine import (
    autocast,
    clip_groups,
    deepspeed_config,
    keep_fp32,
    one_cycle,
    param_groups,
)
from detailfusion.platform.train.loop import dealt, epoch_seed
from detailfusion.platform.train.run import (
    StageError,
    check_optimisation,
    compositor_fields,
    initial_model,
    subset_negatives,
)
from detailfusion.platform.train.stages import STAGES, build_loss, freeze_for_stage, stage_loss


def batch(size=4, text=6, image=64, subset=2):
    torch.manual_seed(1)
    return {"input_ids": torch.randint(5, 500, (size, text)), "attention_mask": torch.ones(size, text, dtype=torch.long),
            "reference": torch.randn(size, 3, image, image), "target": torch.randn(size, 3, image, image),
            "subset": torch.randn(size, subset, 3, image, image)}


def job(*overrides):
    config = JobConfig()
    for item in overrides:
        key, value = item.split("=", 1)
        import yaml

        config = with_value(config, key, yaml.safe_load(value))
    return config


# -- precision -----------------------------------------------------------------------------------------


def test_deepspeed_never_casts_the_model_and_autocasts_bf16():
    config = job("train.precision=bf16", "train.zero_stage=2")
    ds = deepspeed_config(config.train, config.optim, world_size=1)
    assert "bf16" not in ds and "fp16" not in ds  # DeepSpeed's bf16 mode would cast every weight
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert "torch_autocast" not in deepspeed_config(job("train.precision=fp32").train, config.optim, 1)


def test_bf16_autocast_keeps_fp32_weights_layernorm_and_logits():
    model, _ = build_model("tiny")
    spec = STAGES[2]
    freeze_for_stage(model, spec)
    keep_fp32(model)
    seen = []
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.register_forward_hook(lambda _, __, out: seen.append(out.dtype))
    matmul_dtypes = []
    model.gm_branch.qformer.encoder.layer[0].attention.attention.query.register_forward_hook(
        lambda _, __, out: matmul_dtypes.append(out.dtype))
    loss_fn = build_loss(spec, job().loss)
    with autocast("bf16", torch.device("cpu")):
        parts = stage_loss(spec, model, loss_fn, batch(), "pixel_values")
    parts["loss"].backward()
    assert matmul_dtypes and set(matmul_dtypes) == {torch.bfloat16}  # the matmuls do run in bf16
    assert seen and set(seen) == {torch.float32}  # every LayerNorm in fp32
    assert all(v.dtype == torch.float32 for v in parts.values()) and torch.isfinite(parts["loss"])
    trained = [p for p in model.parameters() if p.requires_grad]
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.grad.dtype for p in trained if p.grad is not None} == {torch.float32}


def test_keep_fp32_runs_layernorm_in_fp32_even_on_a_bf16_input():
    layers = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))  # Linear -> bf16 under autocast
    with autocast("bf16", torch.device("cpu")):
        assert layers(torch.randn(2, 8)).dtype == torch.bfloat16  # CPU autocast keeps LayerNorm's bf16 input in bf16
        keep_fp32(layers)
        assert layers(torch.randn(2, 8)).dtype == torch.float32


def test_similarity_logits_are_fp32_under_autocast():
    q, t = torch.randn(3, 8).to(torch.bfloat16), torch.randn(5, 2, 8).to(torch.bfloat16)
    with autocast("bf16", torch.device("cpu")):
        assert max_similarity(q, t).dtype == torch.float32


def test_exports_are_fp32_unless_asked_and_loads_take_an_explicit_dtype(tmp_path):
    model, tokenizer = build_model("tiny")
    save_model(model, tokenizer, tmp_path / "bf16", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # the model itself is left fp32
    save_model(model, tokenizer, tmp_path / "fp32")
    from safetensors import safe_open

    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        with safe_open(str(next((tmp_path / name).glob("*.safetensors"))), "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {dtype}
    loaded, _ = load_model(tmp_path / "bf16")  # default fp32: a bf16 export is upcast, never trained as bf16
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    assert {p.dtype for p in load_model(tmp_path / "bf16", dtype=torch.bfloat16)[0].parameters()} == {torch.bfloat16}


# -- temperatures -----------------------------------------------------------------------------------------------


def temperatures(model):
    """(parameter, its accessor) of every learned temperature: the branches' tau_g / tau_d and L_C's tau_u."""
    return [(model.gm_branch.temp, model.gm_branch.temperature), (model.di_branch.temp, model.di_branch.temperature),
            (model.unified_temp, model.unified_temperature)]


@pytest.mark.parametrize("raw, solvable", [(-0.0186, False), (0.9, True)])
def test_a_temperature_past_its_bound_keeps_its_gradient_and_steps_back_inside(raw, solvable):
    """BLIP/ALBEF's in-place clamp: a raw value past the bound (seen: unified_temp at -0.0186, tau pinned at 0.001) is
    clamped, gets a gradient there, and one optimizer step moves it inside when the loss asks it to: a larger tau where
    the positives are not on top (random features), a smaller one where every query is its own target."""
    low, high = TEMPERATURE_BOUNDS
    model, _ = build_model("tiny")
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    t = q[:, None, :] if solvable else torch.nn.functional.normalize(torch.randn(8, 2, 16), dim=-1)
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3)
    for param, _ in temperatures(model):
        param.data.fill_(raw)
    loss = sum(ContrastiveLoss()(q, t, temperature())["loss"] for _, temperature in temperatures(model))
    loss.backward()
    for param, temperature in temperatures(model):
        assert param.item() == pytest.approx(high if raw > high else low)  # clamped in place by the forward
        assert param.grad is not None and param.grad.abs().item() > 0 and torch.isfinite(param.grad).all()
        assert (param.grad.item() > 0) == solvable  # solvable: the loss falls with tau
    optimizer.step()
    for param, temperature in temperatures(model):
        assert low < temperature().item() < high  # moved back inside, not clamped again


def test_temperatures_have_no_weight_decay_and_every_stage_groups_its_own():
    """One AdamW group decays, the other holds the stage's temperatures at weight decay 0."""
    model, _ = build_model("tiny")
    expected = {0: {"gm_branch.temp"}, 1: {"di_branch.temp"}, 2: {"gm_branch.temp", "di_branch.temp"},
                3: {"unified_temp"}}
    names = {id(p): n for n, p in model.named_parameters()}
    for stage, temps in expected.items():
        freeze_for_stage(model, STAGES[stage])
        groups = {g["name"]: g for g in param_groups(model, 0.05)}
        assert {names[id(p)] for p in groups["temperatures"]["params"]} == temps
        assert groups["temperatures"]["weight_decay"] == 0.0 and groups["decayed"]["weight_decay"] == 0.05
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert {names[id(p)] for g in groups.values() for p in g["params"]} == trainable


def _engine_worker(rank, init_file, results):
    """One DeepSpeed rank (gloo, world 1): stage 3 on ZeRO-0 and stage 2 on ZeRO-2, each with its temperature set past
    the bound; reports each optimizer group's weight decay and the raw temperature after one step."""
    import os

    from detailfusion.platform.train.engine import build_engine

    os.environ.update(LOCAL_RANK="0", RANK="0", WORLD_SIZE="1", DS_ACCELERATOR="cpu")
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=0, world_size=1)
    torch.manual_seed(0)
    for stage, zero, name in ((3, 0, "unified_temp"), (2, 2, "gm_branch.temp")):
        config = job(f"train.zero_stage={zero}", "optim.lr=1e-3", "optim.div_factor=1")
        model, _ = build_model("tiny")
        freeze_for_stage(model, STAGES[stage])
        param = dict(model.named_parameters())[name]
        param.data.fill_(-0.0186)  # before the engine: ZeRO-2's fp32 master copy starts there too
        engine, optimizer, _ = build_engine(model, config.train, config.optim, world_size=1, total_steps=10)
        param = dict(model.named_parameters())[name]
        accessor = model.unified_temperature if stage == 3 else model.gm_branch.temperature
        q = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
        t = torch.nn.functional.normalize(torch.randn(8, 2, 16), dim=-1)
        engine.backward(ContrastiveLoss()(q, t, accessor())["loss"])
        engine.step()
        results[(stage, zero)] = ([g["weight_decay"] for g in optimizer.param_groups], param.item())
    torch.distributed.destroy_process_group()


def test_deepspeed_keeps_the_temperature_group_and_its_gradient(tmp_path):
    """Through build_engine: DeepSpeed keeps both AdamW groups (ZeRO-0 and ZeRO-2 alike), and a temperature past its
    bound takes a step. ZeRO-0 steps the clamped parameter inside; ZeRO-2 steps its own fp32 master copy (never
    clamped: the forward clamps the model's copy each time) and writes it back: -0.0186 moves towards the bound by
    one step (lr 1e-3), the gradient having reached it."""
    import torch.multiprocessing as mp

    with mp.get_context("spawn").Manager() as manager:
        shared = manager.dict()
        mp.spawn(_engine_worker, args=(str(tmp_path / "init"), shared), nprocs=1, join=True)
        results = dict(shared)
    low, high = TEMPERATURE_BOUNDS
    for key in ((3, 0), (2, 2)):
        assert results[key][0] == [0.05, 0.0]
    assert low < results[(3, 0)][1] < high
    assert results[(2, 2)][1] == pytest.approx(-0.0186 + 1e-3, abs=1e-5)


# -- clipping, schedule ---------------------------------------------------------------------------------


def test_per_branch_clipping_keeps_one_branch_from_shrinking_the_other():
    model, _ = build_model("tiny")
    freeze_for_stage(model, STAGES[2])
    for name, param in model.named_parameters():
        if param.requires_grad:
            param.grad = torch.full_like(param, 10.0 if name.startswith("gm_branch") else 1e-4)
    di_before = [p.grad.clone() for n, p in model.named_parameters() if n.startswith("di_branch")]
    groups = clip_groups(model, "per_branch")
    assert len(groups) == 2
    for group in groups:
        torch.nn.utils.clip_grad_norm_(group, 1.0)
    di_after = [p.grad for n, p in model.named_parameters() if n.startswith("di_branch")]
    assert all(torch.equal(a, b) for a, b in zip(di_before, di_after))  # DI's small gradient untouched
    gm_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for n, p in model.named_parameters()
                                                    if n.startswith("gm_branch")]))
    assert gm_norm == pytest.approx(1.0, rel=1e-4)
    (one,) = clip_groups(model, "global")
    torch.nn.utils.clip_grad_norm_(one, 1.0)
    assert not torch.equal(di_before[0], next(p.grad for n, p in model.named_parameters() if n.startswith("di_branch")))


def test_stage2_per_branch_clipping_needs_zero0_and_fp16_needs_zero0():
    check_optimisation(job("train.stage=2", "train.zero_stage=0", "train.precision=bf16"))
    with pytest.raises(StageError, match="per_branch"):
        check_optimisation(job("train.stage=2", "train.zero_stage=2", "optim.clip=per_branch"))
    check_optimisation(job("train.stage=2", "train.zero_stage=2"))  # auto: DeepSpeed's global norm there
    from detailfusion.platform.train.engine import clipping

    assert clipping(job("train.zero_stage=2").train, job().optim) == "global (DeepSpeed)"
    assert clipping(job("train.zero_stage=0").train, job().optim) == "per branch (torch)"
    assert clipping(job("train.zero_stage=0").train, job("optim.clip=global").optim) == "global (torch)"
    check_optimisation(job("train.stage=2", "train.zero_stage=2", "optim.clip=global"))
    check_optimisation(job("train.stage=1", "train.zero_stage=2"))  # one branch: per-branch is global
    with pytest.raises(StageError, match="loss\\s*scaler"):
        check_optimisation(job("train.use_gpu=true", "train.precision=fp16", "train.zero_stage=2", "optim.clip=global"))


def test_one_cycle_divisors_are_options():
    config = job("optim.lr=1e-3", "optim.div_factor=10", "optim.final_div_factor=100")
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=config.optim.lr)
    scheduler = one_cycle(optimizer, config.optim, total_steps=20)
    rates = [scheduler.get_last_lr()[0]]
    for _ in range(19):
        optimizer.step()
        scheduler.step()
        rates.append(scheduler.get_last_lr()[0])
    assert rates[0] == pytest.approx(1e-4)
    assert max(rates) == pytest.approx(1e-3)
    assert rates[-1] == pytest.approx(1e-6, rel=1e-3)


# -- the ablation switches ------------------------------------------------------------------------------------


def test_reference_negative_and_subset_negatives_are_independent_switches():
    """reference_negative drops the own reference only: with K img_set negatives it still uses them (the driver still
    draws them), and L_DI equals L_GM exactly only with both off (the paper's ablation, img_set negatives off in both
    arms)."""
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    t, r = (torch.nn.functional.normalize(torch.randn(4, 3, 8), dim=-1) for _ in range(2))
    subset = torch.nn.functional.normalize(torch.randn(4, 2, 3, 8), dim=-1)
    tau = torch.tensor(0.1)
    gm = ContrastiveLoss()(q, t, tau)["loss"]
    off = DetailLoss(reference_negative=False, hard_negative_scale=3.0)
    assert off(q, t, tau, references=r)["loss"] == gm
    ref_off_subset_on = off(q, t, tau, references=r, subset_negatives=subset)["loss"]
    assert ref_off_subset_on > gm
    on = DetailLoss()
    assert on(q, t, tau, references=r, subset_negatives=subset)["loss"] > on(q, t, tau, references=r)["loss"] > gm
    for reference in ("true", "false"):
        assert subset_negatives(job("loss.subset_negatives=2", f"loss.reference_negative={reference}")) == 2
    assert subset_negatives(job("loss.subset_negatives=2", "train.stage=3")) == 2  # L_C's img_set negatives
    assert subset_negatives(job("loss.subset_negatives=2", "train.stage=0")) == 0  # image-text: no such negatives
    spec = STAGES[2]  # the DI branch encodes the reference only where the loss reads it, the subset whenever given
    model, _ = build_model("tiny")
    freeze_for_stage(model, spec)
    calls = []
    original = model.di_branch.encode_target
    model.di_branch.encode_target = lambda embeds: calls.append(embeds.shape[0]) or original(embeds)
    loss_fn = build_loss(spec, job("loss.reference_negative=false").loss)
    stage_loss(spec, model, loss_fn, batch(), "pixel_values")
    assert calls == [4, 8]  # the targets, then 4 x 2 subset images; no reference
    calls.clear()
    stage_loss(spec, model, build_loss(spec, job().loss), {k: v for k, v in batch().items() if k != "subset"},
                "pixel_values")
    assert calls == [4, 4]  # the targets, then the references


# -- stage 3's compositor ----------------------------------------------------------------------------------


def test_stage3_builds_the_compositor_its_config_names(tmp_path):
    model, tokenizer = build_model("tiny", compositor="static")
    save_model(model, tokenizer, tmp_path / "stage2")
    config = job("train.stage=3", f"model.init_from={tmp_path / 'stage2'}", "model.compositor=afc",
                 "model.compositor_layers=2", "model.compositor_heads=2")
    made, _ = load_model(initial_model(config, tmp_path / "init"))
    assert made.config.compositor == "afc" and type(made.compositor).__name__ == "AdaptiveFeatureCompositor"
    assert len(made.compositor.blocks.layers) == 2 and made.compositor.blocks.layers[0].self_attn.num_heads == 2
    assert torch.equal(made.di_branch.query_tokens, model.di_branch.query_tokens)  # the branches are stage 2's
    # unset layers/heads keep the model's own (the preset's): no silent override
    assert compositor_fields(job()) == {"compositor": "afc", "static_weights": [0.5, 0.5]}
    # a new stage 2 export is not hidden by the earlier init
    other, _ = build_model("tiny", compositor="static")
    save_model(other, tokenizer, tmp_path / "stage2")
    again, _ = load_model(initial_model(config, tmp_path / "init"))
    assert torch.equal(again.di_branch.query_tokens, other.di_branch.query_tokens)


def test_the_blip2_configs_keep_method_values():
    cirr = load_config(JobConfig, "jobs/configs/stage2_blip2_cirr.yaml")
    fiq = load_config(JobConfig, "jobs/configs/stage2_blip2_fashioniq.yaml")
    assert cirr.loss.subset_negatives > 0 and fiq.loss.subset_negatives == 0  # SPN on CIRR's img_set only
    for config in (cirr, fiq):
        assert (config.optim.betas, config.optim.eps, config.optim.weight_decay) == ((0.9, 0.98), 1e-7, 0.05)
        assert config.train.batch_size == 128 and config.train.precision == "bf16" and config.loss.reference_negative
        check_optimisation(config)
    assert (cirr.loss.gamma, cirr.optim.lr, cirr.train.epochs) == (2.0, 1e-5, 50)
    assert (fiq.optim.lr, fiq.train.epochs) == (2e-5, 30)
    stages = [load_config(JobConfig, path) for path in sorted(Path("jobs/configs").glob("stage*_blip2*.yaml"))]
    assert len(stages) >= 4 and all(1e-5 <= c.optim.lr <= 2e-5 for c in stages)  # [paper] every stage, 3 included
    stage3 = load_config(JobConfig, "jobs/configs/stage3_blip2_cirr.yaml")
    assert stage3.loss.reference_negative and stage3.loss.subset_negatives > 0  # L_C's hard negatives (METHOD.md)


# -- data order ---------------------------------------------------------------------------------------------


def test_cached_rows_are_dealt_into_new_batches_every_epoch():
    rows = {"x": torch.arange(40), "y": torch.arange(40) * 2}
    size = 8
    epochs = [list(dealt(rows, size, epoch_seed(0, e, 0))) for e in range(2)]
    for batches in epochs:
        assert sorted(torch.cat([b["x"] for b in batches]).tolist()) == list(range(40))
        assert all(torch.equal(b["y"], b["x"] * 2) for b in batches)
    assert {tuple(sorted(b["x"].tolist())) for b in epochs[0]} != {tuple(sorted(b["x"].tolist())) for b in epochs[1]}
    again = list(dealt(rows, size, epoch_seed(0, 0, 0)))
    assert all(torch.equal(a["x"], b["x"]) for a, b in zip(again, epochs[0]))
    assert len({epoch_seed(s, e, r) for s in (0, 1) for e in range(3) for r in range(2)}) == 12


# -- stage 0: the tiny Q-Former's image-text pre-training ------------------------------------------------


def test_image_text_loss_is_symmetric_infonce_by_hand():
    from detailfusion.library.losses import ImageTextContrastiveLoss

    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    images = torch.tensor([[[1.0, 0.0], [0.6, 0.8]], [[0.0, 1.0], [0.8, 0.6]]])  # [B=2, Nq=2, D=2]
    # s(t_i, I_j) = max_k <t_i, i_jk>: [[1, .8], [.8, 1]]
    import math

    ce = lambda row, label: math.log(sum(math.exp(x) for x in row)) - row[label]  # noqa: E731
    out = ImageTextContrastiveLoss()(text, images, torch.tensor(1.0))
    t2i = (ce([1, .8], 0) + ce([.8, 1], 1)) / 2
    assert out["loss_t2i"].item() == pytest.approx(t2i, abs=1e-6) and out["loss_i2t"].item() == pytest.approx(t2i, abs=1e-6)
    scores = torch.tensor([[1.0, 0.5, 0.0], [0.2, 1.0, 0.1], [0.9, 0.0, 1.0]])  # <t_i, I_j>, not symmetric
    out = ImageTextContrastiveLoss()(torch.eye(3), scores.T[:, None, :], torch.tensor(1.0))  # I_j's one token: column j
    rows, columns = scores.tolist(), scores.T.tolist()
    assert out["loss_t2i"].item() == pytest.approx(sum(ce(rows[i], i) for i in range(3)) / 3, abs=1e-6)
    assert out["loss_i2t"].item() == pytest.approx(sum(ce(columns[i], i) for i in range(3)) / 3, abs=1e-6)
    assert out["loss_t2i"].item() != pytest.approx(out["loss_i2t"].item())


def test_stage0_trains_the_gm_qformer_on_captions_and_exports_it_into_both_branches():
    import numpy as np

    from detailfusion.library.data.schema import pixels_to_arrow
    from detailfusion.platform.data.training_input import TripletBatcher

    model, tokenizer = build_model("tiny")
    spec = STAGES[0]
    freeze_for_stage(model, spec)
    images = [np.full((64, 64, 3), i, dtype=np.uint8) for i in range(4)]
    rows = {"text_variants": np.array([["edit"]] * 4, dtype=object), "sample_id": np.array([f"s{i}" for i in range(4)]),
            "reference_caption": np.array([f"a red circle at the top {i}" for i in range(4)]),
            "target_caption": np.array([f"a blue square at the left {i}" for i in range(4)]),
            "reference_pixels": pixels_to_arrow(images, 64).to_numpy(zero_copy_only=False),
            "target_pixels": pixels_to_arrow(images[::-1], 64).to_numpy(zero_copy_only=False)}
    out = TripletBatcher(tokenizer, 32, "pixels", captions=True)(rows)
    assert out["input_ids"].shape == out["target_input_ids"].shape == (4, 32)
    assert not np.array_equal(out["input_ids"], out["target_input_ids"])
    assert "target_input_ids" not in TripletBatcher(tokenizer, 32, "pixels")(rows)
    batch = {k: torch.from_numpy(v) for k, v in out.items()}
    from detailfusion.library.pixels import normalize_pixels

    batch["reference"], batch["target"] = normalize_pixels(batch["reference"]), normalize_pixels(batch["target"])
    parts = stage_loss(spec, model, build_loss(spec, job().loss), batch, "pixel_values")
    parts["loss"].backward()
    assert set(parts) == {"loss", "loss_t2i", "loss_i2t"} and torch.isfinite(parts["loss"])
    assert all(p.grad is not None for p in model.gm_branch.parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.di_branch.parameters())
