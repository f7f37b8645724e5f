"""DeepSpeed engine settings from our typed config: ZeRO stage, precision, clipping, accumulation; AdamW with
METHOD.md's defaults (no weight decay on the temperatures) and a one-cycle schedule (torch's, handed to DeepSpeed
as the client scheduler).

Precision (METHOD.md): the weights and the optimizer stay fp32 (DeepSpeed's ``bf16``/``fp16`` modes would cast the
whole model); bf16/fp16 is DeepSpeed's ``torch_autocast`` over the forward (``autocast``), with LayerNorm, the
similarity logits and the softmax of the losses in fp32 (``keep_fp32``, losses.py).
"""

from __future__ import annotations

import contextlib

import torch

from detailfusion.library.config import OptimConfig, TrainConfig
from detailfusion.library.errors import ConfigError

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def micro_batch_size(train: TrainConfig, world_size: int) -> int:
    """Per-rank batch of one forward: global batch / (world size x accumulation steps)."""
    per_step = world_size * train.grad_accum
    if train.batch_size % per_step:
        raise ConfigError(
            f"train.batch_size={train.batch_size} is not divisible by num_workers x grad_accum = {per_step}"
        )
    return train.batch_size // per_step


def clips_with_torch(train: TrainConfig) -> bool:
    """ZeRO-0 (fp32 or bf16 autocast): the loop clips with torch's fused ``clip_grad_norm_``, one norm per clip group
    (``optim.clip``). DeepSpeed's own clipping of this case takes a norm per parameter in Python and an all-reduce even
    on one rank (3-4 ms of a 120 ms tiny step) and knows only one global norm. ZeRO-1/2/3 (gradients partitioned) and
    fp16 (the loss scaler unscales inside DeepSpeed's step) keep DeepSpeed's global clipping."""
    return train.zero_stage == 0 and train.precision != "fp16"


def deepspeed_config(train: TrainConfig, optim: OptimConfig, world_size: int) -> dict:
    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size(train, world_size),
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": 0.0 if clips_with_torch(train) else optim.grad_clip,
        "zero_optimization": {"stage": train.zero_stage},
        "steps_per_print": 10**9,  # our own progress line replaces DeepSpeed's
        "wall_clock_breakdown": False,
    }
    if train.precision in AUTOCAST_DTYPES:  # fp32 master weights; fp16 on ZeRO-0 also gets DeepSpeed's GradScaler
        config["torch_autocast"] = {"enabled": True, "dtype": str(AUTOCAST_DTYPES[train.precision]).split(".")[-1]}
    return config


def autocast(precision: str, device: torch.device):
    """The forward's autocast context (a no-op for fp32)."""
    if precision not in AUTOCAST_DTYPES:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[precision])


def keep_fp32(model: torch.nn.Module) -> None:
    """LayerNorm in fp32 under autocast on every device: CUDA's autocast does it already, CPU's keeps a bf16 input in
    bf16; an fp32 input gives an fp32 output on both (the fp32 residual stream then feeds the next bf16 matmul)."""
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.register_forward_pre_hook(lambda _, args: tuple(a.float() for a in args))


def clip_groups(model: torch.nn.Module, clip: str) -> list[list[torch.nn.Parameter]]:
    """Trainable parameters in the groups the loop clips on their own: ``per_branch`` (and ``auto``, where the loop
    clips at all), each branch's (GM, DI) and the rest's (compositor, temperatures) apart; ``global``, all together."""
    groups: dict[str, list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            part = name.split(".")[0]
            groups.setdefault(part if clip != "global" and part.endswith("_branch") else "rest", []).append(param)
    return list(groups.values())


def clipping(train: TrainConfig, optim: OptimConfig) -> str:
    """What clips the gradients: "per branch (torch)", "global (torch)", "global (DeepSpeed)" or "none"."""
    if optim.grad_clip <= 0:
        return "none"
    if not clips_with_torch(train):
        return "global (DeepSpeed)"
    return "global (torch)" if optim.clip == "global" else "per branch (torch)"


def one_cycle(optimizer: torch.optim.Optimizer, optim: OptimConfig, total_steps: int):
    """METHOD.md's one-cycle schedule: cosine warm-up from ``lr / div_factor`` to ``lr`` over ``warmup_fraction`` of
    the steps, cosine decay to ``lr / (div_factor * final_div_factor)``."""
    total_steps = max(4, total_steps)
    # OneCycleLR divides by its warm-up length in steps (pct_start * total - 1): keep it at least one step
    warmup = min(0.5, max(optim.warmup_fraction, 2.0 / total_steps))
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=optim.lr, total_steps=total_steps, pct_start=warmup, anneal_strategy="cos",
        cycle_momentum=False, div_factor=optim.div_factor, final_div_factor=optim.final_div_factor,
    )


def train_step(engine, micro_batches: list, loss_of, clip_groups: list, grad_clip: float, autocast_context
               ) -> dict[str, torch.Tensor]:
    """One optimizer step over ``grad_accum`` micro-batches: forward (under ``autocast_context()``) and backward of
    each, DeepSpeed scaling each loss by 1 / grad_accum, so the applied gradient is that of the micro-batches' mean
    loss (with a row-wise loss: the whole batch's; with in-batch negatives each micro-batch contrasts within itself);
    the accumulated gradient clipped per ``clip_groups`` at the boundary; the step. Returns the loss parts
    (``loss_of(batch)``: {name: 0-d tensor}) averaged over the micro-batches, detached: the step's loss."""
    summed: dict[str, torch.Tensor] = {}
    boundary = False
    for batch in micro_batches:
        with autocast_context():
            parts = loss_of(batch)
        engine.backward(parts["loss"])
        for name, value in parts.items():
            summed[name] = summed.get(name, 0) + value.detach().float()
        boundary = engine.is_gradient_accumulation_boundary()  # before engine.step(), which counts this micro-batch
        if boundary:
            for group in clip_groups:
                torch.nn.utils.clip_grad_norm_(group, grad_clip)
        engine.step()
    if not boundary:
        raise RuntimeError(f"{len(micro_batches)} micro-batches did not end on DeepSpeed's accumulation boundary "
                           f"(gradient_accumulation_steps {engine.gradient_accumulation_steps()})")
    return {name: value / len(micro_batches) for name, value in summed.items()}


def use_environment_extension_cache() -> str:
    """Point torch's JIT-extension cache (DeepSpeed's CPU communication op) into this Python environment
    (``<sys.prefix>/torch_extensions``) unless TORCH_EXTENSIONS_DIR is set: two environments on one machine (two
    checkouts, a CI clone) otherwise share ``~/.cache/torch_extensions`` and each rebuilds the other's op in its first
    stage (36.8 s seen). ``scripts/setup.sh`` builds the op there once. Returns the directory."""
    import os
    import sys

    return os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))


def without_deepspeed_autotuner_mlflow() -> None:
    """DeepSpeed's autotuner (imported with ``deepspeed``, unused here) imports MLflow when it is installed, and MLflow
    imports FastAPI, pandas and its GenAI modules: 0.6-0.7 s of every training worker's start-up. Workers log nothing
    to MLflow (the driver does), so the training worker (``StageRecipe.setup``), when it has not imported MLflow, marks
    it absent before DeepSpeed's import; the autotuner then takes its no-MLflow path. A later ``import mlflow`` in
    that process raises ImportError."""
    import sys

    if "mlflow" not in sys.modules and "deepspeed" not in sys.modules:
        sys.modules["mlflow"] = None  # type: ignore[assignment]  (Python's marker for "not importable")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW's parameter groups over the trainable parameters: the learned temperatures (each branch's ``temp``, the
    model's ``unified_temp``) without weight decay (METHOD.md "Temperatures"; LAVIS's BLIP-2 exempts them too: decay
    pulls tau towards 0, a sharper softmax, whatever the loss says), everything else with ``weight_decay``. Empty
    groups are left out; each group is named (``"name"``)."""
    decayed, temperatures = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (temperatures if name.rsplit(".", 1)[-1] in ("temp", "unified_temp") else decayed).append(param)
    groups = [{"name": "decayed", "params": decayed, "weight_decay": weight_decay},
              {"name": "temperatures", "params": temperatures, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def build_engine(model: torch.nn.Module, train: TrainConfig, optim: OptimConfig, world_size: int, total_steps: int):
    """(engine, optimizer, scheduler) over the parameters that require gradients (``param_groups``)."""
    use_environment_extension_cache()
    import deepspeed

    groups = param_groups(model, optim.weight_decay)
    if not groups:
        raise ValueError("no trainable parameters: the stage froze everything")
    optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps)
    scheduler = one_cycle(optimizer, optim, total_steps)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(train, optim, world_size),
        dist_init_required=False,
    )
    if world_size == 1 and train.zero_stage == 0:
        engine.enable_backward_allreduce = False  # one rank: nothing to reduce (saves flattening every gradient)
    return engine, optimizer, scheduler
