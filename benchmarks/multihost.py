"""Tiny stage 2 with 2 Ray Train workers on 1 host vs 2 hosts, in the same run, on a local 2-host cluster
(`detailfusion local-cluster`: network namespaces, root on Linux). Prints samples/s of each, the ratio, and the
bytes on the hosts' links per optimizer step (sent + received on every host's veth: a byte from one host to the
other is counted on both links; the 1-host run's figure is the traffic that is not the collectives: data blocks
from the other host, heartbeats, metrics, logs).

    python benchmarks/multihost.py [--pairs 256] [--epochs 3] [--batch 16] [--dir /tmp/dfbench]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_stage2(cluster, data: Path, workdir: Path, strategy: str, epochs: int, batch: int) -> dict:
    from detailfusion.platform import local_cluster

    sets = [f"workdir={workdir}", f"data.prepared={data / 'prep'}", f"model.init_from={data / 'init'}",
            "train.num_workers=2", f"train.placement_strategy={strategy}", "train.zero_stage=2",
            f"train.epochs={epochs}", f"train.batch_size={batch}", "train.log_every=1000"]
    entry = [sys.executable, "jobs/stage2_joint.py", "--config", "jobs/configs/stage2_tiny.yaml",
             *[a for s in sets for a in ("--set", s)]]
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **cluster.ray_env()}
    before, started = cluster.link_bytes(), time.perf_counter()
    done = subprocess.run([local_cluster.RAY, "job", "submit", "--address", cluster.dashboard_url, "--working-dir",
                           str(REPO), "--", *entry], env=env, cwd=REPO, capture_output=True, text=True)
    wall, crossed = time.perf_counter() - started, cluster.link_bytes() - before
    if done.returncode != 0:
        raise SystemExit(f"{strategy} job failed:\n{(done.stdout + done.stderr)[-3000:]}")
    stage = workdir / "stage2"
    with open(stage / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    nodes = sorted({w["node_ip"] for w in json.loads((stage / "workers.json").read_text())})
    return {"strategy": strategy, "nodes": nodes, "steps": len(rows), "samples_per_s": float(rows[-1]["samples_per_s"]),
            "job_wall_s": wall, "link_bytes": crossed, "bytes_per_step": crossed / len(rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=256, help="synthetic CIRR pairs (all splits)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16, help="global batch (split over the 2 workers)")
    parser.add_argument("--dir", help="cluster directory (default: a new short one under /tmp)")
    args = parser.parse_args()

    import ray
    import torch

    from detailfusion.library.config import PrepareConfig
    from detailfusion.library.data.synthetic import write_synthetic
    from detailfusion.library.model import build_model, save_model
    from detailfusion.platform import local_cluster
    from detailfusion.platform.data.prepare import prepare

    local_cluster.check_supported()
    directory = Path(args.dir or tempfile.mkdtemp(prefix="dfbench", dir="/tmp"))
    data = directory / "data"
    torch.manual_seed(0)
    save_model(*build_model("tiny"), data / "init")
    write_synthetic("cirr", data / "raw", pairs=args.pairs, seed=0, image_size=64)
    prepare(PrepareConfig(dataset="cirr", root=str(data / "raw"), split="train", out=str(data / "prep"), num_cpus=2))
    ray.shutdown()
    rows = json.loads((data / "prep" / "manifest.json").read_text())["counts"]["triplets"]

    cluster = local_cluster.up(directory / "cluster", hosts=2, cpus_per_host=2)
    try:
        results = [run_stage2(cluster, data, directory / strategy.lower(), strategy, args.epochs, args.batch)
                   for strategy in ("STRICT_PACK", "STRICT_SPREAD")]
    finally:
        local_cluster.down(directory / "cluster", quiet=True)

    print(f"\n{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {rows} triplets x {args.epochs} "
          f"epochs, global batch {args.batch}, 2 workers, ZeRO-2, gloo over the hosts' veth link\n")
    print("| placement | hosts used | steps | samples/s | job wall s | link MB per step |")
    print("|---|---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['strategy']} | {len(r['nodes'])} ({', '.join(r['nodes'])}) | {r['steps']} | {r['samples_per_s']:.1f} | "
              f"{r['job_wall_s']:.0f} | {r['bytes_per_step'] / 1e6:.2f} |")
    one, two = results
    print(f"\n2 hosts / 1 host samples/s: {two['samples_per_s'] / one['samples_per_s']:.2f}x; link traffic per step "
          f"above the 1-host run: {(two['bytes_per_step'] - one['bytes_per_step']) / 1e6:.2f} MB")
    shutil.rmtree(directory / "strict_pack", ignore_errors=True)
    shutil.rmtree(directory / "strict_spread", ignore_errors=True)


if __name__ == "__main__":
    main()
