"""The pipeline's report: ``report.json`` (rows of dataset, split, variant, metrics + the paper's claims),
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


def write_report(work: Path, evaluations: dict[str, dict], seconds: dict[str, float], model: str,
                 claims: dict[str, dict]) -> dict:
    """``claims``: eval/claims.py's checks of this run (test1, one seed)."""
    rows = [{"dataset": "cirr (synthetic detail benchmark)", "split": split, "variant": variant, "metrics": metrics}
            for split, evaluation in evaluations.items() for variant, metrics in evaluation["variants"].items()]
    report = {
        "preset": "tiny", "model": model, "model_fingerprint": evaluations["test1"]["model_fingerprint"],
        "rows": rows, "claims": claims,
        "fusion_weights": evaluations["test1"].get("fusion_weights"),
        "counts": {split: e["counts"] for split, e in evaluations.items()}, "seconds": seconds,
        "protocol": evaluations["test1"]["protocol"], "tie_rule": evaluations["test1"]["tie_rule"],
    }
    (work / "report.json").write_text(json.dumps(report, indent=1))
    plot = _plot(work / "recall_at_k.png", evaluations["test1"]["variants"])
    (work / "report.md").write_text(_markdown(report, evaluations, plot))
    return report


def claim_lines(claims: dict[str, dict]) -> list[str]:
    """One markdown bullet per claim: holds / DOES NOT HOLD / not measured, its rule and numbers."""
    lines = []
    for name, claim in claims.items():
        if not claim["measured"]:
            lines.append(f"- **{name}**: not measured ({claim['detail']}). Rule: {claim['rule']}.")
            continue
        mark = "holds" if claim["holds"] else "DOES NOT HOLD"
        if "difference" in claim:
            low, high = claim["interval_95"]
            numbers = f"difference {claim['difference']:+.2f}, 95 % interval [{low:+.2f}, {high:+.2f}]; means {claim['means']}"
            if len(claim.get("per_seed", ())) > 1:
                numbers += "; per seed " + ", ".join(f"{d:+.2f}" for d in claim["per_seed"])
        else:
            numbers = f"std a_di {claim['std_a_di']:.4f} (interval {claim['interval_95']}), mean {claim['mean_a_di']:.3f}"
            if "p_value" in claim:
                numbers += f", by edit type {claim['by_edit_type']}, permutation p {claim['p_value']}"
        lines.append(f"- **{name}**: {mark}. Rule: {claim['rule']}. {numbers}")
    return lines


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
    parts += ["## The paper's claims (test1, this run's one seed; 95 % paired bootstrap intervals over queries)", "",
              "Rules in `eval/claims.py`; the rows that need other training (no reference negative, no stage 1) are "
              "`detailfusion ablate`'s.", ""]
    parts += claim_lines(report["claims"])
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
