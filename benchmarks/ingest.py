"""Images/s of the Ray Data ``prepare`` pipeline against a bare single-process PIL loop doing the same work
(read file, decode, validate, targetpad, bicubic resize, centre crop), measured in the same run on synthetic CIRR,
with the CPU time of every process of the Ray session (its workers, Ray's own processes, the driver) and of the
rest of the machine over each ``prepare`` run.

    python benchmarks/ingest.py [--pairs 10000] [--source-size 256] [--size 224] [--num-cpus 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import psutil


def _role(cmdline: str) -> str:
    program = (cmdline.split() or [""])[0]  # a Ray worker's title: ray::IDLE, ray::MapBatches(...), ray::_StatsActor
    for name in ("gcs_server", "raylet"):  # before the workers: the raylet's arguments name default_worker.py
        if program.endswith(name):
            return f"Ray: {name}"
    if program in ("ray::_StatsActor", "ray::_AutoscalingCoordinatorActor"):
        return "Ray Data's own actors (stats, autoscaling coordinator)"
    if "default_worker.py" in cmdline or (program.startswith("ray::") and not program.endswith("Agent")):
        return "Ray workers running prepare's tasks"
    return "Ray: dashboard/runtime-env agents, monitors"


def _cpu_by_process() -> dict[int, tuple[str, float]]:
    """pid -> (role, user + system CPU seconds) of this process and all its descendants (the local Ray session)."""
    found = {}
    me = psutil.Process()
    for proc in [me, *me.children(recursive=True)]:
        try:
            times, cmdline = proc.cpu_times(), " ".join(proc.cmdline())
        except psutil.Error:
            continue
        role = "driver (Ray Data's executor, annotations, triplets, gallery)" if proc.pid == me.pid else _role(cmdline)
        found[proc.pid] = (role, times.user + times.system)
    return found


def _cpu_report(before: dict, after: dict, wall: float, machine_busy: float) -> list[str]:
    roles: dict[str, float] = {}
    for pid, (role, cpu) in after.items():
        roles[role] = roles.get(role, 0.0) + cpu - before.get(pid, (role, 0.0))[1]
    ours = sum(roles.values())
    roles["rest of the machine (other users' processes, kernel)"] = max(0.0, machine_busy - ours)
    return [f"    {cpu:6.2f} CPU-s = {cpu / wall:4.2f} cores  {role}" for role, cpu in sorted(roles.items(), key=lambda kv: -kv[1])]


def _busy_seconds() -> float:
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=10000, help="synthetic CIRR pairs (10000: 4,800 train images)")
    parser.add_argument("--source-size", type=int, default=256, help="side of the synthetic source images")
    parser.add_argument("--size", type=int, default=224, help="output resolution (224: the blip2 preset)")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count())
    args = parser.parse_args()

    import ray

    from detailfusion.library.config import PrepareConfig
    from detailfusion.library.data.images import load_pixels
    from detailfusion.library.data.synthetic import write_synthetic
    from detailfusion.platform.data.prepare import prepare

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "raw"
        write_synthetic("cirr", root, pairs=args.pairs, seed=0, image_size=args.source_size)
        images = json.loads((root / "image_splits/split.rc2.train.json").read_text())
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {len(images)} train images "
              f"{args.source_size}px -> {args.size}px")

        before, busy, start = _cpu_by_process(), _busy_seconds(), time.perf_counter()
        for rel in images.values():
            load_pixels((root / rel).read_bytes(), args.size)
        wall = time.perf_counter() - start
        bare, bare_report = len(images) / wall, _cpu_report(before, _cpu_by_process(), wall, _busy_seconds() - busy)

        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        rates, reports = [], []
        for run in ("cold", "warm"):  # cold: Ray starts its worker processes; warm: they are up
            before, busy, start = _cpu_by_process(), _busy_seconds(), time.perf_counter()
            manifest = prepare(PrepareConfig(dataset="cirr", root=str(root), split="train",
                                             out=str(Path(tmp) / f"out-{run}"), image_size=args.size))
            wall = time.perf_counter() - start
            reports.append(_cpu_report(before, _cpu_by_process(), wall, _busy_seconds() - busy))
            rates.append(manifest.counts["images"] / wall)
        ray.shutdown()
    print(f"bare single-process PIL loop : {bare:8.1f} images/s")
    print("\n".join(bare_report))
    for run, rate, report in zip(("cold", "warm"), rates, reports):
        print(f"Ray Data prepare, {args.num_cpus} CPUs, {run} : {rate:8.1f} images/s   ratio {rate / bare:.2f}x")
        print("\n".join(report))
    print("(prepare is the whole job: annotations, decode, transform, parquet write, quarantine, manifest)")


if __name__ == "__main__":
    main()
