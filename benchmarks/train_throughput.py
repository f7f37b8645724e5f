"""Training samples/s of stage 1 (tiny preset, 1 Ray Train worker, DeepSpeed ZeRO-0, CPU) with and without
the frozen-ViT feature cache, measured in the same run on the same prepared synthetic IPr2Pr split.

    python benchmarks/train_throughput.py [--pairs 512] [--epochs 2] [--batch 32]
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import tempfile
from pathlib import Path


def samples_per_second(stage_dir: Path) -> float:
    with open(stage_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return float(rows[-1]["samples_per_s"])  # cumulative rate over the whole run, as the progress line shows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()

    import ray
    import torch

    from detailfusion.library.config import JobConfig, PrepareConfig, load_config
    from detailfusion.library.data.synthetic import write_synthetic
    from detailfusion.library.model import build_model, save_model
    from detailfusion.platform.data.prepare import prepare
    from detailfusion.platform.train.run import run_stage

    repo = Path(__file__).resolve().parents[1]
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        torch.manual_seed(0)
        save_model(*build_model("tiny"), root / "init")
        write_synthetic("ipr2pr", root / "raw", pairs=args.pairs, seed=0, image_size=64)
        prepare(PrepareConfig(dataset="ipr2pr", root=str(root / "raw"), split="train", out=str(root / "prep"),
                              cache_vision_features=True, model=str(root / "init")))
        rates = {}
        for cached in (False, True):
            work = root / ("cached" if cached else "online")
            config = load_config(JobConfig, repo / "jobs/configs/stage1_tiny.yaml", [
                f"workdir={work}", f"data.prepared={root / 'prep'}", f"model.init_from={root / 'init'}",
                f"data.use_feature_cache={str(cached).lower()}", f"train.epochs={args.epochs}",
                f"train.batch_size={args.batch}", "train.log_every=1000",
            ])
            run_stage(config)
            rates[cached] = samples_per_second(work / "stage1")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; stage 1 tiny, "
          f"{args.pairs} pairs x {args.epochs} epochs, batch {args.batch}, 1 worker, ZeRO-0 fp32")
    print(f"baseline: online ViT each step : {rates[False]:7.1f} samples/s")
    print(f"frozen-ViT feature cache       : {rates[True]:7.1f} samples/s   ratio {rates[True] / rates[False]:.2f}x")


if __name__ == "__main__":
    main()
