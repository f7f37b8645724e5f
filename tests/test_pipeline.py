"""The one-command tiny pipeline end to end (small sizes, one epoch per stage): every step runs, the report holds
every split x variant row and the paper's claims with intervals, the plot is a PNG, and a rerun reuses every
finished step."""

import json

import pytest

from detailfusion.platform.pipeline import PipelineConfig, hidden_test1_annotations, run_pipeline

VARIANTS = {"gm", "di", "static", "afc", "image_only", "text_only", "random"}


def check_mlflow_store(work, rows):
    """The run's MLflow store (read with MLflow's own client): a finished run per stage with its per-step loss and
    export, one per evaluation with the report's metrics, and the pipeline report."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("detailfusion")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"tiny-stage0", "tiny-stage1", "tiny-stage2", "tiny-stage3", "evaluate-cirr-val",
                         "evaluate-cirr-test1", "pipeline-report"}, sorted(runs)
    assert all(r.info.status == "FINISHED" for r in runs.values())
    for name, run in runs.items():
        if "-stage" not in name:
            continue
        steps = client.get_metric_history(run.info.run_id, "loss")
        assert len(steps) >= 2 and [m.step for m in steps] == sorted(m.step for m in steps), name
        assert run.data.params["train.stage"] == name.rsplit("stage", 1)[-1]
        exported = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
        assert {"model/config.json", "model/README.md"} <= exported, exported
    val = {r["variant"]: r["metrics"] for r in rows if r["split"] == "val"}
    logged = runs["evaluate-cirr-val"].data.metrics
    assert logged["afc/Avg"] == pytest.approx(val["afc"]["Avg"], abs=0.01)
    assert logged["di/Rs_at_1"] == pytest.approx(val["di"]["Rs@1"], abs=0.01)
    report = {a.path for a in client.list_artifacts(runs["pipeline-report"].info.run_id)}
    assert report == {"report.json", "report.md"}


@pytest.mark.slow
def test_tiny_pipeline_runs_end_to_end_and_reuses_finished_steps(ray_local, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the pipeline's own default store, under its workdir
    config = PipelineConfig(workdir=str(tmp_path / "run"), cirr_pairs=320, test_pairs=120, ipr2pr_pairs=256,
                            bootstrap=200, overrides=("train.epochs=1",))
    report = run_pipeline(config)
    work = tmp_path / "run"
    rows = json.loads((work / "report.json").read_text())["rows"]
    assert {(r["split"], r["variant"]) for r in rows} == {(s, v) for s in ("val", "test1") for v in VARIANTS}
    test1 = {r["variant"]: r["metrics"] for r in rows if r["split"] == "test1"}
    claims = report["claims"]
    measured = {name for name, claim in claims.items() if claim["measured"]}
    assert measured == {"di_above_gm_on_rs1", "afc_at_least_best_branch", "afc_above_static", "compositor_adapts",
                        "di_gm_gap_local_above_global", "gm_at_least_di_on_global_r5", "a_di_local_above_global",
                        "family_explains_a_di_over_root"}
    for name, (metric, a, b) in {"di_above_gm_on_rs1": ("Rs@1", "di", "gm"),
                                 "afc_above_static": ("Avg", "afc", "static")}.items():
        low, high = claims[name]["interval_95"]
        assert low <= claims[name]["difference"] <= high and isinstance(claims[name]["holds"], bool)
        # two paths agree: the claims' per-query outcomes (in process) and the test1 rows (the submission files
        # scored against the hidden targets)
        means = claims[name]["means"]
        assert means == {f"main/{a}": pytest.approx(test1[a][metric], abs=0.01),
                         f"main/{b}": pytest.approx(test1[b][metric], abs=0.01)}, name
        assert claims[name]["difference"] == pytest.approx(test1[a][metric] - test1[b][metric], abs=0.02)
    assert set(claims["compositor_adapts"]["by_edit_type"]) >= {"add", "remove"}  # a_di by edit type was measured
    markdown = (work / "report.md").read_text()
    assert "| afc |" in markdown and "The paper's claims" in markdown and "recall_at_k.png" in markdown
    # the shortcut report of test1, before training: every scorer on every family x direction cell of benchmark v2
    shortcuts = report["shortcuts"]
    assert shortcuts["queries"]["all"] == report["counts"]["test1"]["queries"]
    assert set(shortcuts["pixel_nn"]) == {"all", "local/forward", "local/inverse", "global/forward", "global/inverse"}
    assert shortcuts["oracle"]["all"]["R@1"] == 100.0 and "## Shortcut report" in markdown
    assert (work / "recall_at_k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (work / "index" / "index.json").is_file()
    # test1 was scored from the submission files against the hidden targets, never labelled in evaluation
    assert len(hidden_test1_annotations(work / "data" / "cirr")) == report["counts"]["test1"]["queries"]
    assert json.loads((work / "eval/cirr-test1/metrics.json").read_text()).get("variants") is None
    check_mlflow_store(work, rows)
    card = (work / "stage3" / "model" / "README.md").read_text()  # the export's model card
    assert card.startswith("---\nlibrary_name: detailfusion") and "stage 3" in card and "## Config" in card
    capsys.readouterr()

    run_pipeline(config)
    out = capsys.readouterr().out
    for reused in ("synth: reusing", "shortcuts: reusing", "already holds this split", "[stage 0] already trained", "[stage 3] already trained",
                   "index: reusing", "evaluate: reusing"):
        assert reused in out, reused
