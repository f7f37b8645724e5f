"""The pipeline's report: ``report.json`` (rows of dataset, split, variant, metrics + the method checks),
``report.md`` (tables, AFC weights by edit type, step times) and ``recall_at_k.png`` (Recall@K per variant)."""

from __future__ import annotations

import json
from pathlib import Path

COLUMNS = ("R@1", "R@5", "R@10", "R@50", "Rs@1", "Rs@2", "Rs@3", "Avg")
LEARNED = ("gm", "di", "static", "afc", "concat_linear")
SPLIT_NOTES = {
    "val": "CIRR val protocol on the labelled synthetic val split (metrics computed by `evaluate`)",
    "test1": "held-out synthetic test1: submission files scored against the generator's hidden targets, as the "
             "CIRR server scores them (`score-cirr`)",
}


def method_checks(variants: dict[str, dict]) -> dict:
    """The claims the tiny run should show (issue 6), with the numbers behind each, measured not assumed."""
    learned = [v for v in LEARNED if v in variants]
    baseline = max(variants["image_only"]["Avg"], variants["random"]["Avg"])
    compositor = next((v for v in learned if v not in ("gm", "di", "static")), "static")
    best_branch = max(variants["gm"]["Avg"], variants["di"]["Avg"])
    return {
        "learned_above_baselines": {
            "holds": all(variants[v]["Avg"] >= baseline + 10 for v in learned),
            "detail": {v: round(variants[v]["Avg"] - baseline, 2) for v in learned},
            "rule": "every learned variant's Avg >= 10 points above max(image_only, random)",
        },
        "di_above_gm_on_rs1": {
            "holds": variants["di"]["Rs@1"] > variants["gm"]["Rs@1"],
            "detail": {"di": variants["di"]["Rs@1"], "gm": variants["gm"]["Rs@1"]},
            "rule": "DI-only Rs@1 > GM-only Rs@1",
        },
        "compositor_at_least_best_branch": {
            "holds": variants[compositor]["Avg"] >= best_branch,
            "detail": {compositor: variants[compositor]["Avg"], "best_branch": best_branch},
            "rule": f"{compositor} Avg >= max(GM-only, DI-only) Avg",
        },
    }


def write_report(work: Path, evaluations: dict[str, dict], seconds: dict[str, float], model: str) -> dict:
    rows = [{"dataset": "cirr (synthetic)", "split": split, "variant": variant, "metrics": metrics}
            for split, evaluation in evaluations.items() for variant, metrics in evaluation["variants"].items()]
    report = {
        "preset": "tiny", "model": model, "model_fingerprint": evaluations["test1"]["model_fingerprint"],
        "rows": rows, "checks": method_checks(evaluations["test1"]["variants"]),
        "fusion_weights": evaluations["test1"].get("fusion_weights"),
        "counts": {split: e["counts"] for split, e in evaluations.items()}, "seconds": seconds,
        "protocol": evaluations["test1"]["protocol"], "tie_rule": evaluations["test1"]["tie_rule"],
    }
    (work / "report.json").write_text(json.dumps(report, indent=1))
    plot = _plot(work / "recall_at_k.png", evaluations["test1"]["variants"])
    (work / "report.md").write_text(_markdown(report, evaluations, plot))
    return report


def metrics_table(variants: dict[str, dict]) -> str:
    lines = ["| variant | " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    for variant, metrics in variants.items():
        lines.append(f"| {variant} | " + " | ".join(f"{metrics[c]:.2f}" for c in COLUMNS) + " |")
    return "\n".join(lines)


def _markdown(report: dict, evaluations: dict[str, dict], plot: str | None) -> str:
    parts = ["# DetailFusion tiny pipeline report", "",
             f"Model `{report['model']}` (fingerprint `{report['model_fingerprint']}`).", "",
             f"Protocol: {report['protocol']}. Ties: {report['tie_rule']}.", ""]
    for split, evaluation in evaluations.items():
        counts = evaluation["counts"]
        parts += [f"## {split}: {SPLIT_NOTES.get(split, split)}", "",
                  f"{counts['queries']} queries, {counts['gallery']} gallery images.", "",
                  metrics_table(evaluation["variants"]), ""]
    parts += ["## Method checks (test1)", ""]
    for name, check in report["checks"].items():
        mark = "holds" if check["holds"] else "DOES NOT HOLD"
        parts.append(f"- **{name}**: {mark}. Rule: {check['rule']}. Numbers: `{json.dumps(check['detail'])}`")
    weights = report.get("fusion_weights")
    if weights:
        parts += ["", "## AFC branch weights a_di per query (test1)", "", "| edit type | n | mean | std | min | max |",
                  "|---|---:|---:|---:|---:|---:|"]
        for kind, s in [("all", weights["all"])] + sorted(weights.get("by_edit_type", {}).items()):
            parts.append(f"| {kind} | {s['n']} | {s['mean_a_di']:.3f} | {s['std_a_di']:.3f} | {s['min_a_di']:.3f} | "
                         f"{s['max_a_di']:.3f} |")
    if plot:
        parts += ["", f"![Recall@K per variant]({plot})"]
    parts += ["", "## Step times (s)", "", "| step | s |", "|---|---:|"]
    parts += [f"| {step} | {s:.1f} |" for step, s in report["seconds"].items()]
    return "\n".join(parts) + "\n"


def _plot(path: Path, variants: dict[str, dict]) -> str | None:
    """Recall@K (K = 1, 5, 10, 50) per variant as a PNG; returns its file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = (1, 5, 10, 50)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for variant, metrics in variants.items():
        style = "-" if variant in LEARNED else "--"
        ax.plot(ks, [metrics[f"R@{k}"] for k in ks], style, marker="o", label=variant)
    ax.set_xscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K (%)")
    ax.set_title("held-out synthetic CIRR test1")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path.name
