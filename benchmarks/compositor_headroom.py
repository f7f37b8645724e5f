"""What a per-query branch weight could give on the detail benchmark, and what the trained compositor takes of it.

For a trained tiny run (a pipeline workdir, or one seed's chain of ``detailfusion ablate``), on CIRR val and on
test1 (its hidden targets): the Avg / R@5 / Rs@1 of every constant weight a_di in 0, 0.1, .., 1 (a_di = 0 is
GM-only, 1 DI-only, 0.5 static fusion); the model's own compositor; the constant chosen on val, scored on test1 (a
baseline a learned compositor should beat); and two upper bounds no model can be held to, per-edit-type best
constants (what a compositor that read only the edit type could reach) and the per-query best weight. Then the
compositor's own mean weight used as a constant (what its per-query variation adds or costs), whether its a_di
follows which branch wins each query, and, per edit type on test1, which branch wins.

    python benchmarks/compositor_headroom.py --run runs/tiny [--model runs/tiny/stage3/model]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

GRID = np.round(np.linspace(0.0, 1.0, 11), 2)


def weight_outcomes(run: Path, model_dir: Path, split: str, targets: dict[str, str] | None = None) -> dict:
    """{"grid": {a_di: per-query values}, "model": per-query values, "a_di": [Q], "ids": [Q]} on one split;
    ``targets``: the hidden targets of a split whose annotations hold none (test1)."""
    from detailfusion.library.eval.metrics import target_ranks
    from detailfusion.library.eval.outcomes import per_query
    from detailfusion.library.eval.protocols import CirrQueries
    from detailfusion.library.model import load_model
    from detailfusion.library.model.fusion import fused_query
    from detailfusion.platform.eval.validate import ValidationSplit

    model, tokenizer = load_model(model_dir)
    model.eval()
    data = ValidationSplit(run / "prep" / f"cirr-{split}", targets)
    with torch.no_grad():
        features, index, _ = data.encode(model, tokenizer)
    cirr = CirrQueries(data.triplets, index)

    def values(queries: torch.Tensor) -> dict[str, np.ndarray]:
        scores = index.scores(queries)
        return per_query(target_ranks(scores, cirr.targets, cirr.is_reference),
                         target_ranks(scores, cirr.targets, ~cirr.subset | cirr.is_reference))

    grid = {}
    for a in GRID:
        weights = torch.tensor([1.0 - a, a]).expand(len(features.sample_ids), -1)
        grid[a] = values(fused_query(features.q_gm, features.q_di, weights, index.fusion_score))
    mean = features.weights.mean(dim=0, keepdim=True).expand(len(features.sample_ids), -1)
    return {"grid": grid, "model": values(features.unified), "a_di": features.weights[:, 1].numpy(),
            "its_mean": values(fused_query(features.q_gm, features.q_di, mean, index.fusion_score)),
            "ids": features.sample_ids, "compositor": model.config.compositor}


def report(name: str, found: dict, chosen: float | None, kinds: np.ndarray | None) -> float:
    """Print one split's figures; returns the constant a_di with the best Avg on it."""
    grid, own, a_di = found["grid"], found["model"], found["a_di"]
    best = max(GRID, key=lambda a: grid[a]["Avg"].mean())
    print(f"\n{name}: {len(a_di)} queries")
    print("  a_di    Avg    R@5   Rs@1")
    for a in GRID:
        mark = " <- static" if a == 0.5 else (" <- best constant" if a == best else "")
        print(f"  {a:4.1f} {grid[a]['Avg'].mean():6.2f} {grid[a]['R@5'].mean():6.2f} {grid[a]['Rs@1'].mean():6.2f}{mark}")
    print(f"  {found['compositor']}: Avg {own['Avg'].mean():.2f} R@5 {own['R@5'].mean():.2f} Rs@1 {own['Rs@1'].mean():.2f}; "
          f"a_di mean {a_di.mean():.3f}, std {a_di.std():.3f}")
    print(f"  its mean weight as a constant (a_di {a_di.mean():.3f} for every query): Avg {found['its_mean']['Avg'].mean():.2f}")
    if chosen is not None:
        print(f"  constant chosen on val (a_di {chosen:.1f}): Avg {grid[chosen]['Avg'].mean():.2f}")
    stack = np.stack([grid[a]["Avg"] for a in GRID])
    print(f"  upper bound, best weight per query: Avg {stack.max(axis=0).mean():.2f}")
    preference = grid[1.0]["Avg"] - grid[0.0]["Avg"]  # > 0: DI wins the query, < 0: GM does
    for label, mask in (("GM wins", preference < 0), ("tie", preference == 0), ("DI wins", preference > 0)):
        print(f"  queries where {label:<7}: {mask.sum():5d}, the compositor's a_di mean {a_di[mask].mean():.3f}")
    if kinds is not None:
        typed = sum(max(grid[a]["Avg"][kinds == k].sum() for a in GRID) for k in set(kinds)) / len(kinds)
        print(f"  upper bound, best constant per edit type: Avg {typed:.2f}")
        print("  edit type    n  DI-GM Avg  DI-GM Rs@1  DI-GM R@5  best a_di  its Avg  static Avg  compositor Avg  its a_di")
        for kind in sorted(set(kinds)):
            m = kinds == kind
            top = max(GRID, key=lambda a: grid[a]["Avg"][m].mean())
            print(f"  {kind:<9} {m.sum():4d} {preference[m].mean():+10.1f} "
                  f"{(grid[1.0]['Rs@1'][m] - grid[0.0]['Rs@1'][m]).mean():+11.1f} "
                  f"{(grid[1.0]['R@5'][m] - grid[0.0]['R@5'][m]).mean():+10.1f} {top:10.1f} "
                  f"{grid[top]['Avg'][m].mean():8.1f} {grid[0.5]['Avg'][m].mean():11.1f} "
                  f"{own['Avg'][m].mean():15.1f} {a_di[m].mean():9.2f}")
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, type=Path,
                        help="a tiny pipeline workdir (data/, prep/, stage3/), or an ablation's benchmark/ directory")
    parser.add_argument("--model", type=Path, help="the model to study (default: RUN/stage3/model; for an ablation "
                                                   "e.g. runs/ablate/seed0/main/stage3/model)")
    args = parser.parse_args()
    from detailfusion.platform.data.benchmark import labelled_test1
    from detailfusion.platform.train.stage_run import export_dir

    model_dir = args.model or export_dir(args.run, 3)
    chosen = None  # the ablation's benchmark prepares no val split: then test1 alone, no val-chosen constant
    if (args.run / "prep" / "cirr-val").is_dir():
        chosen = report("val", weight_outcomes(args.run, model_dir, "val"), None, None)
    targets, kinds = labelled_test1({"root": args.run / "data" / "cirr"})
    test1 = weight_outcomes(args.run, model_dir, "test1", targets)
    report("test1", test1, chosen, np.array([kinds[s] for s in test1["ids"]]))


if __name__ == "__main__":
    main()
