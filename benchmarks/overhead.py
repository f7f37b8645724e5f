"""The platform's own cost: a bare torch training loop against the platform's stage 2 (Ray Train worker +
DeepSpeed + the split's input held in the object store) on the same model, batch, loss and cores, in one run.

Both train the tiny model's stage 2 (L_DI with the reference and ``--subset`` near-duplicate negatives +
gamma L_GM, pixels, no feature cache) with AdamW, one-cycle schedule and gradient clipping, batch ``--batch``,
on synthetic CIRR prepared once. The bare loop builds its batches in the same process (tokenise, gather
images, normalise) and uses every core; the platform runs ``run_stage`` with the tiny stage 2 config.

Printed per loop: ms per step (steady state: the mean step-to-step wall time after the first 10 steps, so
epoch-end checkpoints and the input pipeline's work beside the steps are included), their median, start-up
seconds (the call until the first step began), the finish (last step to the call's return: checkpoint, export,
shut-down), the hypervisor's steal share of the machine's CPU time during the run (a slow host shows here when
its neighbours take the CPU) and the ratio to the bare loop; the header names torch's CPU kernels (AVX2/AVX512).
The platform's stage runs twice on one Ray session: the second start-up is what a pipeline's later stages pay. Then the same stage with ``--workers`` ranks and ZeRO-2.
The bare loop runs before, between and after the platform's runs (with no Ray on the machine), and each platform
run is compared with the mean of the bare runs on either side of it: a small machine's speed drifts by 10-20 %
over minutes (seen: 118-158 ms for the same bare loop in one hour), which a single baseline at the start reads as
the platform's cost.

    python benchmarks/overhead.py [--pairs 2000] [--epochs 4] [--batch 32] [--workers 2] [--bare-steps 150] [--rounds 2]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def bare_loop(model_dir: Path, prepared: Path, batch_size: int, steps: int, subset: int, gamma: float, lr: float,
              threads: int) -> dict:
    """A plain torch loop of stage 2: returns {"ms": [per-step wall ms], "startup_s": model load to first step}."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from detailfusion.library.config import LossConfig
    from detailfusion.library.model import load_model
    from detailfusion.library.pixels import normalize_pixels
    from detailfusion.platform.data.training_input import PIXELS, load_image_store
    from detailfusion.platform.train.stages import STAGES, build_loss, freeze_for_stage, stage_loss

    torch.set_num_threads(threads)
    started = time.perf_counter()
    torch.manual_seed(0)
    model, tokenizer = load_model(str(model_dir))
    spec = STAGES[2]
    freeze_for_stage(model, spec)
    model.train()
    loss_fn = build_loss(spec, LossConfig(gamma=gamma, subset_negatives=subset))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), eps=1e-7, weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1,
                                                    anneal_strategy="cos", cycle_momentum=False)
    rows = pq.read_table(prepared / "triplets").to_pylist()
    index, store = load_image_store(prepared, PIXELS)
    rng = np.random.default_rng(0)

    def batch_at(step: int) -> dict:
        chosen = [rows[i] for i in rng.choice(len(rows), batch_size, replace=False)]
        text = tokenizer([str(rng.choice(r["text_variants"])) for r in chosen], padding="max_length", truncation=True,
                         max_length=model.config.max_text_length, return_tensors="pt")
        pick = lambda ids: normalize_pixels(torch.from_numpy(store[[index[i] for i in ids]]))  # noqa: E731
        batch = {"input_ids": text["input_ids"], "attention_mask": text["attention_mask"],
                 "reference": pick([r["reference_id"] for r in chosen]), "target": pick([r["target_id"] for r in chosen])}
        if subset:
            members = [[m for m in r["subset_ids"] if m not in (r["reference_id"], r["target_id"])] for r in chosen]
            ids = [(list(rng.permutation(m)[:subset]) + [r["reference_id"]] * subset)[:subset]
                   for m, r in zip(members, chosen)]
            batch["subset"] = pick([i for row in ids for i in row]).unflatten(0, (batch_size, subset))
        return batch

    times, first = [], None
    for step in range(steps):
        t0 = time.perf_counter()
        first = first or t0
        parts = stage_loss(spec, model, loss_fn, batch_at(step), "pixel_values")
        optimizer.zero_grad(set_to_none=True)
        parts["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        parts["loss"].item()
        times.append((time.perf_counter() - t0) * 1000)
    return {"ms": times, "startup_s": first - started}


def platform_stage(workdir: Path, prepared: Path, init: Path, epochs: int, batch_size: int, overrides: list[str]) -> dict:
    """``run_stage`` of the tiny stage 2 config: per-step wall ms from its metrics.csv, start-up and finish seconds."""
    from detailfusion.library.config import JobConfig, load_config
    from detailfusion.platform.train.run import run_stage

    store = f"sqlite:///{workdir.parent / 'mlflow.db'}"  # one MLflow store for every run, as a pipeline's stages share one
    config = load_config(JobConfig, REPO / "jobs/configs/stage2_tiny.yaml", [
        f"workdir={workdir}", f"data.prepared={prepared}", f"model.init_from={init}", f"train.epochs={epochs}",
        f"train.batch_size={batch_size}", "data.use_feature_cache=false", "train.log_every=100000",
        f"tracking.uri={store}", *overrides])
    run_stage(config)
    cost = json.loads((workdir / "stage2" / "DONE").read_text())["cost"]  # start-up and finish, as the stage printed
    with open(workdir / "stage2" / "metrics.csv") as f:
        ends = [float(row["wall_time"]) for row in csv.DictReader(f)]
    ms = [(b - a) * 1000 for a, b in zip(ends, ends[1:])]
    return {"ms": ms[WARMUP_STEPS:], "startup_s": cost["startup_s"], "finish_s": cost["finish_s"]}


def cpu_jiffies() -> list[int] | None:
    """The machine's CPU time counters (/proc/stat: user nice system idle iowait irq softirq steal), or None."""
    try:
        return [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None


def steal_share(before: list[int] | None, after: list[int] | None) -> float | None:
    """Per cent of the machine's CPU time the hypervisor gave to other guests between two ``cpu_jiffies``: a
    virtual machine's slow days show here (a busy neighbour), not in this benchmark's own figures."""
    if not before or not after:
        return None
    spent = [b - a for a, b in zip(before, after)]
    return 100 * spent[7] / max(1, sum(spent))


def measured(run, *args) -> dict:
    """``run(*args)`` with the steal share of its wall time added as ``steal``."""
    before = cpu_jiffies()
    result = run(*args)
    return {**result, "steal": steal_share(before, cpu_jiffies())}


WARMUP_STEPS = 10  # steps left out of the steady state (the first batches, allocator warm-up)


def summary(name: str, result: dict, baseline: float | None) -> str:
    steady = statistics.fmean(result["ms"])
    steal = "" if result.get("steal") is None else f"{result['steal']:.1f}"
    line = (f"{name:<50} {steady:8.1f} {statistics.median(result['ms']):8.1f} {result['startup_s']:8.1f} "
            f"{result.get('finish_s', 0.0):7.1f} {steal:>7}")
    return line + (f"   {steady / baseline:5.2f}x" if baseline else "   (baseline)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=2000, help="synthetic CIRR pairs (the tiny pipeline's 2000)")
    parser.add_argument("--epochs", type=int, default=4, help="platform epochs (the first is not steady state)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--subset", type=int, default=2, help="near-duplicate negatives per query (tiny config: 2)")
    parser.add_argument("--bare-steps", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=2,
                        help="Ray sessions of two platform stages each, every one followed by a bare-loop run")
    parser.add_argument("--workers", type=int, default=2, help="ranks of the ZeRO-2 run (0: skip it)")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="cores for both loops")
    parser.add_argument("--keep", help="keep the data and the runs in this directory (default: a temporary one)")
    args = parser.parse_args()

    import ray
    import torch

    from detailfusion.library.config import PrepareConfig
    from detailfusion.library.data.synthetic import write_synthetic
    from detailfusion.library.model import build_model, save_model
    from detailfusion.platform.data.prepare import prepare
    from detailfusion.platform.ray_setup import init_ray

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        torch.manual_seed(0)
        save_model(*build_model("tiny"), root / "init")
        write_synthetic("cirr", root / "raw", pairs=args.pairs, seed=0)
        init_ray(args.num_cpus)
        ray.data.DataContext.get_current().enable_progress_bars = False
        prepare(PrepareConfig(dataset="cirr", root=str(root / "raw"), split="train", out=str(root / "prep")))
        ray.shutdown()
        bares: list[dict] = []

        def bare_run() -> None:  # with no Ray on the machine
            print(f"bare loop ({len(bares) + 1}) ...", file=sys.stderr, flush=True)
            result = measured(bare_loop, root / "init", root / "prep", args.batch, args.bare_steps, args.subset, 1.0,
                              1e-3, args.num_cpus)
            bares.append({**result, "ms": result["ms"][WARMUP_STEPS:]})

        runs = []  # (name, result, index of the bare run before it)
        bare_run()
        for round_ in range(1, args.rounds + 1):
            init_ray(args.num_cpus, dashboard=True)  # as the pipeline runs it (Train's cleaner polls the state API)
            for name in ("first", "second"):
                print(f"platform stage 2 ({name}, round {round_}) ...", file=sys.stderr, flush=True)
                runs.append((f"platform stage 2, 1 worker ({name} stage, round {round_})", measured(
                    platform_stage, root / f"{name}{round_}", root / "prep", root / "init", args.epochs, args.batch, []),
                    len(bares) - 1))
            ray.shutdown()
            bare_run()
        if args.workers > 1:
            init_ray(args.num_cpus, dashboard=True)
            print(f"platform stage 2 ({args.workers} workers, ZeRO-2) ...", file=sys.stderr, flush=True)
            runs.append((f"platform stage 2, {args.workers} workers ZeRO-2 (first)", measured(
                platform_stage, root / "zero2", root / "prep", root / "init", args.epochs, args.batch,
                [f"train.num_workers={args.workers}", "train.zero_stage=2", "train.cpus_per_worker=0.5",
                 f"train.threads_per_worker={max(1, args.num_cpus // args.workers)}"]), len(bares) - 1))
            ray.shutdown()
            bare_run()
    print(f"\nmachine: {platform.machine()} ({torch.backends.cpu.get_cpu_capability()} kernels), {os.cpu_count()} cores "
          f"({args.num_cpus} used), torch {torch.__version__}, "
          f"ray {ray.__version__}; tiny stage 2, batch {args.batch}, {args.subset} subset negatives, pixels, AdamW")
    print("bare loop runs (ms/step, in order): " + ", ".join(f"{statistics.fmean(b['ms']):.1f}" for b in bares)
          + " -- each platform run is compared with the mean of the bare runs just before and after it")
    print(f"{'loop':<50} {'ms/step':>8} {'median':>8} {'start s':>8} {'finish s':>7} {'steal %':>7}   ratio")
    for i, bare in enumerate(bares):
        print(summary(f"bare torch loop ({i + 1}), {args.num_cpus} threads", bare, None))
    ratios = []
    for name, result, before in runs:
        base = statistics.fmean([statistics.fmean(bares[before]["ms"]), statistics.fmean(bares[before + 1]["ms"])])
        print(summary(name, result, base))
        if "1 worker" in name:
            ratios.append(statistics.fmean(result["ms"]) / base)
    if len(ratios) > 1:
        print(f"1 worker, all {len(ratios)} runs: ratio mean {statistics.fmean(ratios):.2f}x, sd {statistics.stdev(ratios):.2f}, "
              f"range {min(ratios):.2f}-{max(ratios):.2f}x")


if __name__ == "__main__":
    main()
