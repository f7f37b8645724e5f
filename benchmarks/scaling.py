"""How cost grows with gallery size, dataset size and workers: measured points with the tiny preset on this
machine's CPUs, in one run (the smallest size of each series is its baseline).

- search: exact top-50 over N gallery images (``GalleryIndex.search``, the tiny model's Nq x 2D tokens), ms/query;
- gallery encoding: ``encode_gallery`` (Ray Data actor pool, 1 actor) of prepared synthetic CIRR galleries;
- training: stage 2 (Ray Train + DeepSpeed, fp32) samples/s and s/epoch at two dataset sizes, 1 and 2 workers.

    python benchmarks/scaling.py [--pairs 160 640] [--gallery 1000 4000 16000] [--epochs 2]
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def search_points(sizes: list[int], tokens: int, dim: int, queries: int = 200) -> list[dict]:
    import torch
    from torch.nn import functional as F

    from detailfusion.library.index.exact import GalleryIndex

    rows = []
    for n in sizes:
        g = torch.Generator().manual_seed(n)
        index = GalleryIndex(F.normalize(torch.randn(n, tokens, dim, generator=g), dim=-1), [str(i) for i in range(n)],
                             model_fingerprint="bench")
        q = F.normalize(torch.randn(queries, dim, generator=g), dim=-1)
        index.search(q[:8], k=50)  # warm up
        start = time.perf_counter()
        index.search(q, k=50)
        rows.append({"N": n, "ms_per_query": 1000 * (time.perf_counter() - start) / queries})
    return rows


def prepared_split(root: Path, pairs: int) -> Path:
    from detailfusion.library.config import PrepareConfig
    from detailfusion.library.data.synthetic import write_synthetic
    from detailfusion.platform.data.prepare import prepare

    write_synthetic("cirr", root / f"raw{pairs}", pairs=pairs, seed=0, image_size=64)
    out = root / f"prep{pairs}"
    prepare(PrepareConfig(dataset="cirr", root=str(root / f"raw{pairs}"), split="train", out=str(out)))
    return out


def encode_point(prepared: Path, model_dir: Path) -> dict:
    from detailfusion.platform.eval.encode import EncodeOptions, encode_gallery

    start = time.perf_counter()
    index = encode_gallery(prepared, model_dir, "bench", EncodeOptions(actors=1, cpus_per_actor=1, batch_size=32))
    seconds = time.perf_counter() - start
    return {"images": len(index), "seconds": seconds, "images_per_s": len(index) / seconds}


def train_point(root: Path, prepared: Path, model_dir: Path, workers: int, epochs: int) -> dict:
    import json

    from detailfusion.library.config import JobConfig, load_config
    from detailfusion.platform.train.run import run_stage

    workdir = root / f"train-{prepared.name}-{workers}w"
    config = load_config(JobConfig, REPO / "jobs/configs/stage2_tiny.yaml", [
        f"workdir={workdir}", f"data.prepared={prepared}", f"model.init_from={model_dir}", f"train.epochs={epochs}",
        "train.batch_size=16", "train.log_every=1000", f"train.num_workers={workers}",
        f"train.zero_stage={2 if workers > 1 else 0}"])
    start = time.perf_counter()
    run_stage(config)
    wall = time.perf_counter() - start
    with open(workdir / "stage2" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    triplets = json.loads((prepared / "manifest.json").read_text())["counts"]["triplets"]
    rate = float(rows[-1]["samples_per_s"])
    return {"triplets": triplets, "workers": workers, "steps": len(rows), "samples_per_s": rate,
            "s_per_epoch": len(rows) * 16 / rate / epochs, "stage_wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, nargs="+", default=[160, 640], help="synthetic CIRR pairs per dataset size")
    parser.add_argument("--gallery", type=int, nargs="+", default=[1000, 4000, 16000], help="search gallery sizes")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()

    import torch

    from detailfusion.library.model import build_model, save_model
    from detailfusion.platform.ray_setup import init_ray

    torch.manual_seed(0)
    model, tokenizer = build_model("tiny")
    tokens, dim = model.config.num_query_tokens, 2 * model.config.embed_dim
    root = Path(tempfile.mkdtemp(prefix="dfscale"))
    save_model(model, tokenizer, root / "init")
    init_ray(num_cpus=os.cpu_count(), object_store_mb=512)

    search = search_points(args.gallery, tokens, dim)
    splits = [prepared_split(root, pairs) for pairs in args.pairs]
    encoding = [encode_point(split, root / "init") for split in splits]
    training = [train_point(root, split, root / "init", 1, args.epochs) for split in splits]
    training.append(train_point(root, splits[-1], root / "init", 2, args.epochs))

    print(f"\n{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, tiny preset "
          f"({tokens} x {dim} gallery tokens)\n")
    print("| gallery images | search ms/query (top 50) | ratio |\n|---:|---:|---:|")
    for row in search:
        print(f"| {row['N']} | {row['ms_per_query']:.3f} | {row['ms_per_query'] / search[0]['ms_per_query']:.2f} |")
    print("\n| gallery images encoded | seconds | images/s |\n|---:|---:|---:|")
    for row in encoding:
        print(f"| {row['images']} | {row['seconds']:.1f} | {row['images_per_s']:.1f} |")
    print("\n| stage 2 triplets | workers | steps | samples/s | s/epoch | stage wall s |\n|---:|---:|---:|---:|---:|---:|")
    for row in training:
        print(f"| {row['triplets']} | {row['workers']} | {row['steps']} | {row['samples_per_s']:.1f} | "
              f"{row['s_per_epoch']:.1f} | {row['stage_wall_s']:.0f} |")


if __name__ == "__main__":
    main()
