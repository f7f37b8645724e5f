"""The `blip2`-sized model (ViT-G/14 + two BERT-base Q-Formers, random weights, same shapes) on this machine's
accelerator, or its CPU: stage 2 training step with and without the frozen-ViT feature cache (the same
``stage_loss`` the training loop runs), achieved TFLOP/s (FLOPs counted by torch's FlopCounterMode) and MFU,
peak memory, and gallery encoding images/s.

    python benchmarks/gpu_path.py [--batch 32] [--steps 5] [--peak-tflops 989]

On CUDA the step runs in bf16 autocast (DeepSpeed's bf16 mode keeps bf16 weights; autocast is the same math
for a single-device benchmark). The baseline of the same run is the step without the feature cache.
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from detailfusion.library.config import LossConfig
from detailfusion.library.model import DetailFusionConfig, DetailFusionModel
from detailfusion.platform.train.stages import STAGES, build_loss, freeze_for_stage, stage_loss

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, per GPU (vendor figures)


def blip2_shaped(device) -> DetailFusionModel:
    torch.manual_seed(0)
    model = DetailFusionModel(DetailFusionConfig(compositor_heads=8))  # BLIP-2 ViT-g + Q-Former defaults
    freeze_for_stage(model, STAGES[2])
    return model.to(device)


def batch_of(model, size: int, device, cached: bool) -> dict[str, torch.Tensor]:
    ids = torch.randint(1000, 20000, (size, 32), device=device)
    mask = torch.ones_like(ids)
    if cached:  # what the feature cache holds per image: ViT tokens [257, 1408]
        width, tokens = model.config.vision_config.hidden_size, (224 // 14) ** 2 + 1
        images = {k: torch.randn(size, tokens, width, device=device) for k in ("reference", "target")}
    else:
        images = {k: torch.randn(size, 3, 224, 224, device=device) for k in ("reference", "target")}
    return {"input_ids": ids, "attention_mask": mask, **images}


def step(model, loss_fn, batch, cached: bool, autocast) -> None:
    with autocast():
        parts = stage_loss(STAGES[2], model, loss_fn, dict(batch), "embeds" if cached else "pixel_values")
    parts["loss"].backward()
    model.zero_grad(set_to_none=True)


def timed(fn, steps: int, sync) -> float:
    fn()  # warm-up
    sync()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=None, help="per step (default 32 on GPU, 2 on CPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 5 on GPU, 1 on CPU)")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak (default: by GPU name)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    batch_size = args.batch or (32 if cuda else 2)
    steps = args.steps or (5 if cuda else 1)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else (lambda: torch.autocast("cpu", enabled=False))
    name = torch.cuda.get_device_name() if cuda else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)

    model = blip2_shaped(device)
    counts = {part: sum(p.numel() for p in getattr(model, part).parameters())
              for part in ("vision_model", "gm_branch", "di_branch", "compositor")}
    print(f"{name}; torch {torch.__version__}; {'bf16 autocast' if cuda else 'fp32'}; batch {batch_size}")
    print("parameters: " + ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in counts.items()))
    loss_fn = build_loss(STAGES[2], LossConfig(gather_across_ranks=False))
    rows = []
    for cached in (False, True):
        batch = batch_of(model, batch_size, device, cached)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        with FlopCounterMode(display=False) as counter:
            step(model, loss_fn, batch, cached, autocast)
        flops = counter.get_total_flops()
        seconds = timed(lambda: step(model, loss_fn, batch, cached, autocast), steps, sync)
        memory = (torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
        tflops = flops / seconds / 1e12
        rows.append(("stage 2 step, " + ("feature cache" if cached else "pixels (baseline)"), batch_size / seconds,
                     tflops, 100 * tflops / peak if peak else None, memory))

    with torch.no_grad():
        pixels = torch.randn(batch_size, 3, 224, 224, device=device)

        def encode():
            with autocast():
                targets = model.encode_targets(model.encode_image(pixels))
                model.gallery_embedding(targets["gm"], targets["di"])

        gallery_rate = batch_size / timed(encode, steps, sync)
    print()
    print("| measure | samples/s | TFLOP/s | MFU % | peak memory GiB |")
    print("|---|---:|---:|---:|---:|")
    for label, rate, tflops, mfu, memory in rows:
        print(f"| {label} | {rate:.2f} | {tflops:.2f} | {'n/a' if mfu is None else f'{mfu:.1f}'} | {memory:.1f} |")
    print(f"\nfeature cache / pixels: {rows[1][1] / rows[0][1]:.2f}x samples/s")
    print(f"gallery encoding (ViT + both target paths): {gallery_rate:.2f} images/s")
    if peak is None:
        print("MFU: no peak figure for this device (give --peak-tflops)")


if __name__ == "__main__":
    main()
