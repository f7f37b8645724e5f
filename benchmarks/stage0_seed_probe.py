"""Where does GM's seed spread come from? Stage 2 (100 % of benchmark v2's train rows, 4 epochs, the tiny preset)
from ONE stage-0 export, with stage 2's seed varied, on the data-efficiency study's benchmark; its `no_stage1` arm
at 100 % is the same run with each seed's own stage 0, so the two spreads compare a per-seed stage 0 with a shared
one. Prints and writes {seed: {gm, di}} (test1 Avg).

    python benchmarks/stage0_seed_probe.py --study runs/data-efficiency --out runs/stage0-probe [--seeds 0 1 2 3 4]

Needs a finished `detailfusion ablate --study data-efficiency` in --study (its benchmark and seed 0's stage 0).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from detailfusion.library.config import JobConfig, load_config
from detailfusion.platform.data.benchmark import labelled_test1
from detailfusion.platform.eval.model_outcomes import model_outcomes
from detailfusion.platform.pipeline import CONFIGS
from detailfusion.platform.ray_setup import init_ray
from detailfusion.platform.train.run import run_stage
from detailfusion.platform.train.stage_run import export_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", type=Path, required=True, help="the data-efficiency study's workdir")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--num-cpus", type=int)
    args = parser.parse_args()
    bench, stage0 = args.study / "benchmark", export_dir(args.study / "seed0" / "pretrain", 0)
    init_ray(args.num_cpus)
    targets, _ = labelled_test1({"root": bench / "data" / "cirr"})
    found = {}
    for seed in args.seeds:
        work = args.out / f"seed{seed}"
        items = [f"workdir={work}", f"name=stage0-probe-seed{seed}", f"data.prepared={bench / 'prep' / 'cirr-train-100pct'}",
                 f"train.seed={seed}", f"tracking.uri=sqlite:///{args.out.resolve() / 'mlflow.db'}",
                 f"model.init_from={stage0}", "train.epochs=4"]
        model = run_stage(load_config(JobConfig, CONFIGS / "stage2_tiny.yaml", items))
        means = model_outcomes(work / "outcomes.npz", model, bench / "prep" / "cirr-test1", targets, ["gm", "di"]).means()
        found[seed] = {v: means[v]["Avg"] for v in ("gm", "di")}
        print(f"seed {seed}: GM Avg {found[seed]['gm']:.2f}, DI Avg {found[seed]['di']:.2f}", flush=True)
    for variant in ("gm", "di"):
        values = [found[s][variant] for s in args.seeds]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{variant}: mean {statistics.mean(values):.2f}, seed std {spread:.2f} over {len(values)} seeds")
    (args.out / "stage0_seed_probe.json").write_text(json.dumps(found, indent=1))


if __name__ == "__main__":
    main()
