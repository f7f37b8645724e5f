"""Images/s of the Ray Data ``prepare`` pipeline against a bare single-process PIL loop doing the same work
(read file, decode, validate, targetpad, bicubic resize, centre crop), measured in the same run on synthetic CIRR.

    python benchmarks/ingest.py [--pairs 3000] [--source-size 256] [--size 224] [--num-cpus 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=3000)
    parser.add_argument("--source-size", type=int, default=256, help="side of the synthetic source images")
    parser.add_argument("--size", type=int, default=224, help="output resolution (224: the blip2 preset)")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count())
    args = parser.parse_args()

    import ray

    from detailfusion.config import PrepareConfig
    from detailfusion.data.images import load_pixels
    from detailfusion.data.prepare import prepare
    from detailfusion.data.synthetic import write_synthetic

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "raw"
        write_synthetic("cirr", root, pairs=args.pairs, seed=0, image_size=args.source_size)
        images = json.loads((root / "image_splits/split.rc2.train.json").read_text())
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {len(images)} train images "
              f"{args.source_size}px -> {args.size}px")

        start = time.perf_counter()
        for rel in images.values():
            load_pixels((root / rel).read_bytes(), args.size)
        bare = len(images) / (time.perf_counter() - start)

        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        rates = []
        for run in ("cold", "warm"):  # cold: Ray starts its worker processes; warm: they are up
            start = time.perf_counter()
            manifest = prepare(PrepareConfig(dataset="cirr", root=str(root), split="train",
                                             out=str(Path(tmp) / f"out-{run}"), image_size=args.size))
            rates.append(manifest["counts"]["images"] / (time.perf_counter() - start))
        ray.shutdown()
    print(f"bare single-process PIL loop : {bare:8.1f} images/s")
    for run, rate in zip(("cold", "warm"), rates):
        print(f"Ray Data prepare, {args.num_cpus} CPUs, {run} : {rate:8.1f} images/s   ratio {rate / bare:.2f}x")
    print("(prepare is the whole job: annotations, decode, transform, parquet write, quarantine, manifest)")


if __name__ == "__main__":
    main()
