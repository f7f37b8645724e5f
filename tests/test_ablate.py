"""`detailfusion ablate`, reduced (one seed, one epoch per stage, a small benchmark): every row trains through the
stage jobs with its own loss switches, every row's figures are its per-query outcomes' means, every claim gets its
root-level interval and says that one seed cannot decide it, the report files are written, and a rerun reuses all
of it. The claims' verdicts are not asserted: a one-epoch model says nothing about them (docs/results.md)."""

import json

import numpy as np
import pytest
import yaml

from detailfusion.library.eval.outcomes import METRICS
from detailfusion.platform.ablate import CHAINS, PRETRAINED, ROWS, AblationConfig, run_ablation


@pytest.mark.slow
def test_reduced_ablation_trains_every_row_and_writes_the_table(ray_local, tmp_path, capsys):
    config = AblationConfig(workdir=str(tmp_path / "ablate"), seeds=1, cirr_pairs=160, test_pairs=60, ipr2pr_pairs=64,
                            bootstrap=100, overrides=("train.epochs=1", "train.batch_size=16"))
    result = run_ablation(config)
    work = tmp_path / "ablate"
    assert [r["row"] for r in result["rows"]] == [label for label, _, _ in ROWS]
    for row in result["rows"]:  # each row's figures are its chain's per-query outcomes, averaged
        with np.load(work / "seed0" / row["chain"] / "outcomes.npz") as saved:
            for m in METRICS:
                assert row["mean"][m] == pytest.approx(saved[f"{row['variant']}/{m}"].mean(), abs=0.006), (row, m)
        assert row["mean"]["Avg"] == pytest.approx((row["mean"]["R@5"] + row["mean"]["Rs@1"]) / 2, abs=0.011)
        assert row["per_seed"]["Avg"] == [row["mean"]["Avg"]] and row["std"]["Avg"] == 0.0  # one seed
        assert row["by_family"] and set(row["by_family"]) <= {"local", "global"}, row
        if set(row["by_family"]) == {"local"}:  # benchmark v1: the LOCAL figures are all of them
            assert row["by_family"]["local"]["mean"] == row["mean"]
    for chain, spec in CHAINS.items():  # every chain's stages ran through run_stage and finished
        assert all((work / "seed0" / chain / f"stage{stage}" / "DONE").is_file() for stage, _ in spec.stages), chain
    # stage 0 once for every seed (its seed the data seed): where main, no_stage1 and no_reference_negative start
    assert (work / PRETRAINED / "stage0" / "DONE").is_file() and not (work / "seed0" / "main" / "stage0").exists()
    assert yaml.safe_load((work / PRETRAINED / "stage0" / "config.yaml").read_text())["train"]["seed"] == 0
    loss = {chain: yaml.safe_load((work / "seed0" / chain / "stage2" / "config.yaml").read_text())["loss"]
            for chain in ("main", "no_subset_negatives", "no_reference_negative")}
    assert loss["main"]["subset_negatives"] > 0 and loss["main"]["reference_negative"]
    assert loss["no_subset_negatives"]["subset_negatives"] == 0 and loss["no_subset_negatives"]["reference_negative"]
    assert loss["no_reference_negative"]["subset_negatives"] == 0
    assert not loss["no_reference_negative"]["reference_negative"]
    both_families = {"local", "global"} <= set(result["rows"][0]["by_family"])
    arms = {f"{r['chain']}/{r['variant']}": r["mean"] for r in result["rows"]}
    for name, claim in result["claims"].items():
        family_level = name in ("di_gm_gap_local_above_global", "gm_at_least_di_on_global_r5",
                                "a_di_local_above_global", "family_explains_a_di_over_root")
        assert claim["measured"] == (both_families or not family_level), name
        for part in claim.get("parts", {"": claim}).values() if claim["measured"] else ():
            low, high = part["interval_95"]
            assert np.isfinite([low, high]).all() and part["seed_interval_95"] is None, (name, part)
            assert "means" not in part or low <= part["difference"] <= high, (name, part)
            if "means" in part:  # compared arms: their means are the table's rows, the difference the first less the best
                first, *others = part["means"].values()
                assert part["difference"] == pytest.approx(first - max(others), abs=0.02), (name, part)
                for arm, mean in part["means"].items():
                    if arm in arms:  # over all queries (a family's are in by_family)
                        assert mean == pytest.approx(arms[arm][part["metric"]], abs=0.02), (name, arm, part)
                assert any(arm in arms for arm in part["means"]) or name == "gm_at_least_di_on_global_r5", (name, part)
            assert part["seed_level"] == "needs >= 5 seeds (1 given)" and part["holds"] is False, name
            assert part["verdict"] in ("does not hold", "not established"), name
    # the joint_max row really is another fusion rule, and concat_linear another compositor
    joint = json.loads((work / "seed0" / "joint_max" / "stage3" / "model" / "config.json").read_text())
    concat = json.loads((work / "seed0" / "concat_linear" / "stage3" / "model" / "config.json").read_text())
    assert joint["fusion_score"] == "joint_max" and concat["compositor"] == "concat_linear"
    markdown = (work / "ablation.md").read_text()
    assert "± " in markdown and "## Claims" in markdown and "AFC (joint_max)" in markdown
    assert "## By edit family" in markdown and "needs >= 5 seeds (1 given)" in markdown
    assert (work / "ablation.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((work / "ablation.json").read_text())["rows"] == result["rows"]
    capsys.readouterr()

    again = run_ablation(config)
    out = capsys.readouterr().out
    assert out.count("already trained") == 1 + sum(len(spec.stages) for spec in CHAINS.values())  # + stage 0
    assert "scored " not in out  # outcomes reused
    assert again["rows"] == result["rows"]
