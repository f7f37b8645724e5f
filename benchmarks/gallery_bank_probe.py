"""Does a gallery bank in L_C (``loss.gallery_negatives``) make the compositor worth more than the fixed blend?

A finished ``detailfusion ablate`` leaves each seed's stage 2 export (``seed<s>/main/stage2``) and the claims of its
stage 3 (the AFC trained with the reference and img_set negatives only). This probe trains stage 3 again from the
same exports, the one change being a bank of G gallery items per step, scores test1, and judges every claim of
docs/claims.md with the bank's AFC in place of the ablation's (the other chains' outcomes are the ablation's own).

    python benchmarks/gallery_bank_probe.py --ablation runs/ablate --bank 256 --out runs/bank-probe

Writes ``gallery_bank_probe.json``: per seed the AFC and static Avg with and without the bank, mean a_di by edit
family, and the claims (both intervals) with the bank.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from detailfusion.library.eval.claims import check_claims, query_set, read_img_sets
from detailfusion.platform.ablate import CHAINS, ROWS, AblationConfig, _stage_config
from detailfusion.platform.data.benchmark import labelled_test1
from detailfusion.platform.eval.model_outcomes import model_outcomes
from detailfusion.platform.ray_setup import init_ray
from detailfusion.platform.train.run import run_stage
from detailfusion.platform.train.stage_run import export_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ablation", type=Path, required=True, help="a finished `detailfusion ablate` workdir")
    parser.add_argument("--bank", type=int, default=256, help="gallery items per step (loss.gallery_negatives)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--num-cpus", type=int)
    args = parser.parse_args()
    ablation = json.loads((args.ablation / "ablation.json").read_text())
    seeds, bench = ablation["seeds"], args.ablation / "benchmark"
    data = {"root": bench / "data" / "cirr"}
    targets, tags = labelled_test1(data)
    test1, train = bench / "prep" / "cirr-test1", bench / "prep" / "cirr-train"
    config = AblationConfig(workdir=str(args.ablation.resolve()), overrides=tuple(ablation.get("overrides", ())))
    variants = {chain: [v for _, c, v in ROWS if c == chain] for chain in CHAINS}
    init_ray(args.num_cpus)
    outcomes = {chain: [model_outcomes(args.ablation / f"seed{s}" / chain / "outcomes.npz",
                                       export_dir(args.ablation / f"seed{s}" / chain, CHAINS[chain].stages[-1][0]),
                                       test1, targets, variants[chain]) for s in seeds] for chain in CHAINS}
    without = outcomes["main"]
    banked = []
    for seed in seeds:
        stage = _stage_config(config, "main", 3, ("model.compositor=afc", f"loss.gallery_negatives={args.bank}"),
                              seed, train, export_dir(args.ablation / f"seed{seed}" / "main", 2),
                              work=args.out / f"seed{seed}")
        model = run_stage(stage)
        banked.append(model_outcomes(args.out / f"seed{seed}" / "outcomes.npz", model, test1, targets,
                                     variants["main"]))
    queries = query_set(banked[0].sample_ids, tags, read_img_sets(data["root"], "test1"))
    claims = check_claims({**outcomes, "main": banked}, queries, args.bootstrap)
    families = np.array([f or "" for f in queries.families])
    per_seed = []
    for seed, old, new in zip(seeds, without, banked):
        row = {"seed": seed, **{f"{name} {v}": round(float(o.values[v]["Avg"].mean()), 2)
                                for name, o in (("without", old), ("bank", new)) for v in ("afc", "static")}}
        row.update({f"{name} a_di {f}": round(float(o.weights[families == f, 1].mean()), 3)
                    for name, o in (("without", old), ("bank", new)) for f in sorted(set(families) - {""})})
        per_seed.append(row)
        print(json.dumps(row), flush=True)
    for name, claim in claims.items():
        for part_name, part in claim.get("parts", {"": claim}).items():
            if claim.get("measured", True):
                print(f"{name}{'/' + part_name if part_name else ''}: d {part.get('difference')} "
                      f"root {part.get('interval_95')} seeds {part.get('seed_interval_95')} -> {part.get('verdict')}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gallery_bank_probe.json").write_text(json.dumps(
        {"bank": args.bank, "seeds": seeds, "per_seed": per_seed, "claims_with_bank": claims,
         "claims_without": ablation["claims"]}, indent=1, default=float))


if __name__ == "__main__":
    main()
