"""The pipeline's report and the ablation's tables from synthetic outcomes (no training, no Ray): the claims with
both intervals (one run: the seed-level half "needs >= 5 seeds"), metrics by edit family, report.json's keys."""

import json

import numpy as np
import pytest

from detailfusion.library.data.query_tags import QueryTag
from detailfusion.library.eval.claims import check_claims, query_set
from detailfusion.library.eval.outcomes import METRICS, Outcomes
from detailfusion.platform.ablate import ROWS, _row, markdown
from detailfusion.platform.report import COLUMNS, write_report

QUERIES = 400
FAMILIES = ["local" if i % 2 else "global" for i in range(QUERIES)]
TAGS = {f"q{i}": QueryTag("recolour" if i % 2 else "mirror", FAMILIES[i], "forward", i // 8) for i in range(QUERIES)}


def outcomes(seed: int, rates: dict) -> Outcomes:
    rng = np.random.default_rng(seed)
    u = rng.random(QUERIES)
    values = {}
    for variant, (local, glob) in rates.items():
        hits = (u < np.where(np.array(FAMILIES) == "local", local, glob)) * 100.0
        values[variant] = {m: hits for m in METRICS}
    a_di = np.where(np.array(FAMILIES) == "local", 0.7, 0.4) + rng.normal(0, 0.02, QUERIES)
    return Outcomes(list(TAGS), values, np.stack([1 - a_di, a_di], 1))


RATES = {"gm": (0.3, 0.5), "di": (0.7, 0.4), "static": (0.5, 0.45), "afc": (0.7, 0.5)}


def test_one_run_report_shows_both_intervals_families_and_keeps_its_keys(tmp_path):
    run = outcomes(0, RATES)
    queries = query_set(run.sample_ids, TAGS)
    claims = check_claims({"main": [run]}, queries, resamples=200)
    variants = {v: {c: 10.0 for c in COLUMNS} for v in RATES}
    evaluation = {"variants": variants, "counts": {"queries": QUERIES, "gallery": 500}, "model_fingerprint": "f00",
                  "protocol": "cirr", "tie_rule": "lowest index", "fusion_weights": {
                      "all": {"n": QUERIES, "mean_a_di": 0.55, "std_a_di": 0.15, "min_a_di": 0.3, "max_a_di": 0.8},
                      "by_family": {f: {"n": 200, "mean_a_di": m, "std_a_di": 0.02, "min_a_di": m - .1,
                                        "max_a_di": m + .1} for f, m in (("local", 0.7), ("global", 0.4))}}}
    by_family = run.family_means(queries.families)
    report = write_report(tmp_path, {"val": evaluation, "test1": evaluation}, {"total": 1.0}, "model", claims,
                          by_family)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert {"preset", "model", "model_fingerprint", "rows", "claims", "fusion_weights", "counts", "seconds",
            "protocol", "tie_rule", "by_family"} <= set(saved)
    assert saved["by_family"]["local"]["di"]["Rs@1"] == pytest.approx(70, abs=7)
    assert saved["by_family"]["global"]["gm"]["R@5"] == pytest.approx(50, abs=8)
    di_gm = report["claims"]["di_above_gm_on_rs1"]
    assert di_gm["interval_95"][0] > 0 and di_gm["verdict"] == "not established" and not di_gm["holds"]
    text = (tmp_path / "report.md").read_text()
    line = next(x for x in text.splitlines() if x.startswith("- **di_above_gm_on_rs1**"))
    assert "NOT ESTABLISHED" in line and "root-level 95 %" in line and "seed-level needs >= 5 seeds (1 given)" in line
    assert "scene_root clusters" in line
    assert "## test1, local edits only" in text and "## test1, global edits only" in text
    assert "| local | 200 | 0.700 |" in text  # a_di by family
    adapts = next(x for x in text.splitlines() if x.startswith("- **compositor_adapts**"))
    assert "by edit type" in adapts and "  - spread:" in text and "  - edit_type:" in text
    assert "- **reference_negative_helps_di**: not measured (needs runs no_reference_negative, no_subset_negatives)" \
        in text


def test_ablation_rows_carry_seed_std_and_families_and_its_table_shows_them():
    runs = [outcomes(seed, RATES) for seed in range(5)]
    row = _row("DI only", "main", "di", {"main": runs}, FAMILIES)
    per_seed = [float(o.values["di"]["Avg"].mean()) for o in runs]
    assert row["mean"]["Avg"] == pytest.approx(np.mean(per_seed), abs=0.01)
    assert row["std"]["Avg"] == pytest.approx(np.std(per_seed, ddof=1), abs=0.01) and row["std"]["Avg"] > 0
    local = [float(o.values["di"]["Avg"][np.array(FAMILIES) == "local"].mean()) for o in runs]
    assert row["by_family"]["local"]["mean"]["Avg"] == pytest.approx(np.mean(local), abs=0.01)
    assert row["by_family"]["local"]["std"]["Avg"] == pytest.approx(np.std(local, ddof=1), abs=0.01)
    assert set(row["by_family"]) == {"local", "global"}
    claims = check_claims({"main": runs}, query_set(runs[0].sample_ids, TAGS), resamples=100)
    assert claims["di_above_gm_on_rs1"]["seed_level"] == "decided over 5 seeds"
    result = {"seeds": list(range(5)), "queries": QUERIES, "clusters": "scene_root", "bootstrap": 100,
              "rows": [row], "claims": claims, "seconds": 1.0}
    text = markdown(result)
    assert "## By edit family" in text and "| local R@5 |" in text
    assert "seed-level 95 % [" in text and "(decided over 5 seeds)" in text
    assert any(label.startswith("DI w/o img_set negatives") for label, _, _ in ROWS)
