"""`detailfusion ablate`, reduced (one seed, one epoch per stage, a small benchmark): every row trains through the
stage jobs, every claim gets its interval, the report files are written, and a rerun reuses all of it. The claims
themselves are not asserted: a one-epoch model says nothing about them (README: the full run's figures)."""

import json

import pytest

from detailfusion.ablate import CHAINS, ROWS, AblationConfig, run_ablation
from detailfusion.eval.outcomes import METRICS


@pytest.mark.slow
def test_reduced_ablation_trains_every_row_and_writes_the_table(ray_local, tmp_path, capsys):
    config = AblationConfig(workdir=str(tmp_path / "ablate"), seeds=1, cirr_pairs=160, test_pairs=60, ipr2pr_pairs=64,
                            bootstrap=100, overrides=("train.epochs=1", "train.batch_size=16"))
    result = run_ablation(config)
    work = tmp_path / "ablate"
    assert [r["row"] for r in result["rows"]] == [label for label, _, _ in ROWS]
    for row in result["rows"]:
        assert set(row["mean"]) == set(METRICS) and all(0 <= row["mean"][m] <= 100 for m in METRICS)
        assert len(row["per_seed"]["Avg"]) == 1
    for chain, spec in CHAINS.items():  # every chain's stages ran through run_stage and finished
        assert all((work / "seed0" / chain / f"stage{stage}" / "DONE").is_file() for stage, _ in spec.stages), chain
    assert all(claim["measured"] for claim in result["claims"].values())
    for name, claim in result["claims"].items():
        low, high = claim["interval_95"]
        assert low <= high and isinstance(claim["holds"], bool), name
    # the joint_max row really is another fusion rule, and concat_linear another compositor
    joint = json.loads((work / "seed0" / "joint_max" / "stage3" / "model" / "config.json").read_text())
    concat = json.loads((work / "seed0" / "concat_linear" / "stage3" / "model" / "config.json").read_text())
    assert joint["fusion_score"] == "joint_max" and concat["compositor"] == "concat_linear"
    markdown = (work / "ablation.md").read_text()
    assert "± " in markdown and "## Claims" in markdown and "AFC (joint_max)" in markdown
    assert (work / "ablation.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((work / "ablation.json").read_text())["rows"] == result["rows"]
    capsys.readouterr()

    again = run_ablation(config)
    out = capsys.readouterr().out
    assert out.count("already trained") == sum(len(spec.stages) for spec in CHAINS.values())
    assert "scored " not in out  # outcomes reused
    assert again["rows"] == result["rows"]
