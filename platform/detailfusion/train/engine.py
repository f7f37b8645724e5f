"""DeepSpeed engine settings from our typed config: ZeRO stage, precision, clipping, accumulation; AdamW with
METHOD.md's defaults and a one-cycle schedule (torch's, handed to DeepSpeed as the client scheduler)."""

from __future__ import annotations

import torch

from ..config import OptimConfig, TrainConfig


def micro_batch_size(train: TrainConfig, world_size: int) -> int:
    """Per-rank batch of one forward: global batch / (world size x accumulation steps)."""
    per_step = world_size * train.grad_accum
    if train.batch_size % per_step:
        raise ValueError(
            f"train.batch_size={train.batch_size} is not divisible by num_workers x grad_accum = {per_step}"
        )
    return train.batch_size // per_step


def clips_with_torch(train: TrainConfig) -> bool:
    """ZeRO-0 in fp32: the loop clips with torch's fused ``clip_grad_norm_`` (DeepSpeed's own clipping of this case
    takes a norm per parameter in Python and an all-reduce even on one rank: 3-4 ms of a 120 ms tiny step).
    Every other case keeps DeepSpeed's clipping, which its ZeRO and mixed-precision optimizers do internally."""
    return train.zero_stage == 0 and train.precision == "fp32"


def deepspeed_config(train: TrainConfig, optim: OptimConfig, world_size: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size(train, world_size),
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": 0.0 if clips_with_torch(train) else optim.grad_clip,
        "zero_optimization": {"stage": train.zero_stage},
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {"enabled": train.precision == "fp16", "initial_scale_power": 12},
        "steps_per_print": 10**9,  # our own progress line replaces DeepSpeed's
        "wall_clock_breakdown": False,
    }


def build_engine(model: torch.nn.Module, train: TrainConfig, optim: OptimConfig, world_size: int, total_steps: int):
    """(engine, optimizer, scheduler) over the parameters that require gradients."""
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: the stage froze everything")
    optimizer = torch.optim.AdamW(params, lr=optim.lr, betas=optim.betas, eps=optim.eps,
                                  weight_decay=optim.weight_decay)
    total_steps = max(4, total_steps)
    # OneCycleLR divides by its warm-up length in steps (pct_start * total - 1): keep it at least one step
    warmup = min(0.5, max(optim.warmup_fraction, 2.0 / total_steps))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=optim.lr, total_steps=total_steps, pct_start=warmup,
        anneal_strategy="cos", cycle_momentum=False,
    )
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(train, optim, world_size),
        dist_init_required=False,
    )
    if world_size == 1 and train.zero_stage == 0:
        engine.enable_backward_allreduce = False  # one rank: nothing to reduce (saves flattening every gradient)
    return engine, optimizer, scheduler
