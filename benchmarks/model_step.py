"""Forward+backward time of one training step of the tiny DetailFusion model on this machine.

Measures, in the same run: the full DetailFusion step (both branches, L_DI with the reference negative,
gamma * L_GM, AFC composition with L_C) against the baseline of a single-branch BLIP-2 CIR step (GM only,
L_GM, as SPRC-style models train). Prints parameter counts, median ms/step and the ratio.

    python benchmarks/model_step.py [--batch 32] [--steps 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from detailfusion.library.config import LossConfig
from detailfusion.library.losses import ContrastiveLoss, DetailLoss, JointLoss
from detailfusion.library.model import build_model


def make_batch(tokenizer, batch: int, size: int) -> dict[str, torch.Tensor]:
    texts = ["make the red circle blue", "remove the green star", "move the white square to the left"]
    text = tokenizer([texts[i % 3] for i in range(batch)], padding="max_length", truncation=True,
                     max_length=32, return_tensors="pt")
    return dict(input_ids=text.input_ids, attention_mask=text.attention_mask,
                reference_pixel_values=torch.randn(batch, 3, size, size),
                target_pixel_values=torch.randn(batch, 3, size, size))


def full_step(model, inputs) -> torch.Tensor:
    out = model(**inputs, with_reference_targets=True, compose=True)
    joint = JointLoss(DetailLoss(), ContrastiveLoss(), gamma=LossConfig().gamma)
    parts = joint(
        gm=dict(query=out.query_gm, targets=out.target_gm, temperature=model.gm_branch.temperature()),
        di=dict(query=out.query_di, targets=out.target_di, temperature=model.di_branch.temperature(),
                references=out.reference_di),
    )
    unified = ContrastiveLoss()(out.unified_query, out.gallery, model.unified_temperature())["loss"]
    return parts["loss"] + unified


def single_branch_step(model, inputs) -> torch.Tensor:
    out = model(**inputs, branches=("gm",))
    return ContrastiveLoss()(out.query_gm, out.target_gm, model.gm_branch.temperature())["loss"]


def time_steps(step, model, inputs, steps: int, warmup: int) -> float:
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        step(model, inputs).backward()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tokenizer = build_model("tiny")
    model.train()
    size = model.config.vision_config.image_size
    inputs = make_batch(tokenizer, args.batch, size)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads")
    print(f"tiny DetailFusion: {total:,} parameters ({trainable:,} trainable), {size} px, batch {args.batch}")
    baseline = time_steps(single_branch_step, model, inputs, args.steps, args.warmup)
    full = time_steps(full_step, model, inputs, args.steps, args.warmup)
    print(f"baseline single-branch step (GM, L_GM): {baseline:7.1f} ms")
    print(f"DetailFusion step (GM+DI, L_joint + L_C): {full:7.1f} ms   ratio {full / baseline:.2f}x")


if __name__ == "__main__":
    main()
