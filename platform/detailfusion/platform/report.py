"""The pipeline's report: ``report.json`` (rows of dataset, split, variant, metrics + the paper's claims + test1's
metrics by edit family), ``report.md`` (tables, the claims with both intervals, AFC weights by edit type and
family, step times) and ``recall_at_k.png`` (Recall@K per variant)."""

from __future__ import annotations

import json
from pathlib import Path

from detailfusion.library.eval.variants import BASELINES

COLUMNS = ("R@1", "R@5", "R@10", "R@50", "Rs@1", "Rs@2", "Rs@3", "Avg")
FAMILY_COLUMNS = ("R@1", "R@5", "R@10", "Rs@1", "Rs@2", "Avg")  # the per-query outcomes' metrics
SPLIT_NOTES = {
    "val": "CIRR val protocol on the labelled synthetic val split (metrics computed by `evaluate`)",
    "test1": "held-out synthetic test1: submission files scored against the generator's hidden targets, as the "
             "CIRR server scores them (`score-cirr`)",
}


def write_report(work: Path, evaluations: dict[str, dict], seconds: dict[str, float], model: str,
                 claims: dict[str, dict], by_family: dict | None = None, shortcuts: dict | None = None) -> dict:
    """``claims``: eval/claims.py's judgements of this run (test1, one seed); ``by_family``: test1's
    {edit family: {variant: {metric: value}}} from the per-query outcomes; ``shortcuts``: test1's shortcut report
    (data/shortcut_report.py: model-free scorers by edit family and direction)."""
    rows = [{"dataset": "cirr (synthetic detail benchmark)", "split": split, "variant": variant, "metrics": metrics}
            for split, evaluation in evaluations.items() for variant, metrics in evaluation["variants"].items()]
    report = {
        "preset": "tiny", "model": model, "model_fingerprint": evaluations["test1"]["model_fingerprint"],
        "rows": rows, "claims": claims, "by_family": by_family or {}, "shortcuts": shortcuts or {},
        "fusion_weights": evaluations["test1"].get("fusion_weights"),
        "counts": {split: e["counts"] for split, e in evaluations.items()}, "seconds": seconds,
        "protocol": evaluations["test1"]["protocol"], "tie_rule": evaluations["test1"]["tie_rule"],
    }
    (work / "report.json").write_text(json.dumps(report, indent=1))
    plot = _plot(work / "recall_at_k.png", evaluations["test1"]["variants"])
    (work / "report.md").write_text(_markdown(report, evaluations, plot))
    return report


def _numbers(claim: dict) -> str:
    """A judged claim's estimate, its two intervals and per-seed values."""
    low, high = claim["interval_95"]
    text = (f"d {claim['difference']:+} (bar {claim['bar']:+g}); root-level 95 % [{low:+}, {high:+}] over "
            f"{claim['n_clusters']} {claim['clusters']} clusters; seed-level ")
    seeds = claim["seed_interval_95"]
    text += (f"95 % [{seeds[0]:+}, {seeds[1]:+}]" if seeds else "") + (
        f" ({claim['seed_level']})" if seeds else claim["seed_level"])
    if len(claim["per_seed"]) > 1:
        text += "; per seed " + ", ".join(f"{d:+}" for d in claim["per_seed"])
    if "means" in claim:
        text += f"; means {claim['means']}"
    return text


def claim_lines(claims: dict[str, dict]) -> list[str]:
    """One markdown bullet per claim (docs/claims.md): its verdict, rule, estimate and both intervals; a claim of
    several parts gets one sub-bullet per part."""
    lines = []
    for name, claim in claims.items():
        if not claim["measured"]:
            lines.append(f"- **{name}**: not measured ({claim['detail']}). Rule: {claim['rule']}.")
            continue
        mark = "**holds**" if claim["holds"] else claim["verdict"].upper()
        if "parts" not in claim:
            lines.append(f"- **{name}**: {mark}. Rule: {claim['rule']}. {_numbers(claim)}")
            continue
        extra = f"mean a_di {claim['mean_a_di']}" + (f", by edit type {claim['by_edit_type']}"
                                                     if "by_edit_type" in claim else "")
        lines.append(f"- **{name}**: {mark}. Rule: {claim['rule']}. {extra}")
        for part, judged in claim["parts"].items():
            if not judged["measured"]:
                lines.append(f"  - {part}: not measured ({judged['detail']})")
            else:
                lines.append(f"  - {part}: {judged['verdict']}. {judged['rule']}: {_numbers(judged)}")
    return lines


def metrics_table(variants: dict[str, dict], columns: tuple[str, ...] = COLUMNS) -> str:
    lines = ["| variant | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for variant, metrics in variants.items():
        lines.append(f"| {variant} | " + " | ".join(f"{metrics[c]:.2f}" for c in columns) + " |")
    return "\n".join(lines)


def _markdown(report: dict, evaluations: dict[str, dict], plot: str | None) -> str:
    parts = ["# DetailFusion tiny pipeline report", "",
             f"Model `{report['model']}` (fingerprint `{report['model_fingerprint']}`).", "",
             f"Protocol: {report['protocol']}. Ties: {report['tie_rule']}.", ""]
    if report["shortcuts"]:
        from detailfusion.library.data.shortcut_report import shortcut_table

        parts += ["## Shortcut report (test1, before any training)", "",
                  "Model-free scorers by edit family / direction (`docs/data.md`): a benchmark that needs composition "
                  "keeps pixel NN, text only and late fusion well below the oracle.", "",
                  shortcut_table(report["shortcuts"]), ""]
    for split, evaluation in evaluations.items():
        counts = evaluation["counts"]
        parts += [f"## {split}: {SPLIT_NOTES.get(split, split)}", "",
                  f"{counts['queries']} queries, {counts['gallery']} gallery images.", "",
                  metrics_table(evaluation["variants"]), ""]
    for family, variants in report["by_family"].items():
        parts += [f"## test1, {family} edits only (per-query outcomes)", "", metrics_table(variants, FAMILY_COLUMNS),
                  ""]
    parts += ["## The paper's claims (test1, this run's one seed)", "",
              "Rules: `docs/claims.md`. A claim holds only when its root-level interval (a bootstrap over scene "
              "roots) and its seed-level interval (over >= 5 seeds) both clear its bar: one run cannot give the "
              "second (\"needs >= 5 seeds\"), so its claims are at best \"not established\"; `detailfusion ablate "
              "--seeds 5` decides them, and trains the rows this run lacks (no reference negative, no stage 1).", ""]
    parts += claim_lines(report["claims"])
    weights = report.get("fusion_weights")
    if weights:
        parts += ["", "## AFC branch weights a_di per query (test1)", "", "| queries | n | mean | std | min | max |",
                  "|---|---:|---:|---:|---:|---:|"]
        groups = [("all", weights["all"])] + [(kind, s) for key in ("by_family", "by_direction", "by_edit_type")
                                              for kind, s in sorted(weights.get(key, {}).items())]
        for kind, s in groups:
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
        style = "--" if variant in BASELINES else "-"  # learned: the fixed blends and the model's compositor
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
