"""MLflow tracking without Ray: where runs go, what a run holds, a bad store refused with a clear error, and the
model card of an export. (Whole stages, a sweep and a pipeline in MLflow: test_pipeline.py, test_sweep.py.)"""

import csv

import pytest
from mlflow import MlflowClient

from detailfusion.library.config import JobConfig, TrackingConfig
from detailfusion.library.data.manifest import Manifest
from detailfusion.platform.tracking import TrackingError, open_run, store_uri
from detailfusion.platform.train.model_card import model_card


def test_store_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert store_uri(TrackingConfig(), tmp_path) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/x.db")
    assert store_uri(TrackingConfig(), tmp_path) == "sqlite:////elsewhere/x.db"
    assert store_uri(TrackingConfig(uri="http://mlflow:5000"), tmp_path) == "http://mlflow:5000"


def test_a_run_holds_params_step_metrics_and_artifacts(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with (tmp_path / "metrics.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "epoch", "wall_time", "loss", "val/afc/R@1"])
        writer.writerows([[1, 0, 1000.0, 2.0, "nan"], [2, 0, 1001.0, 1.5, 30.0]])
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "config.json").write_text("{}")
    run = open_run(TrackingConfig(), tmp_path, "tiny-stage2", JobConfig(), tags={"detailfusion.stage": "2"})
    assert run.log_csv(tmp_path / "metrics.csv", skip=("epoch",)) == 2
    run.log_artifacts(tmp_path / "export", "model")
    run.end()
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    stored = client.get_run(run.run_id)
    assert stored.info.status == "FINISHED" and stored.info.run_name == "tiny-stage2"
    assert stored.data.params["optim.lr"] == str(JobConfig().optim.lr) and stored.data.tags["detailfusion.stage"] == "2"
    assert [(m.step, m.value) for m in client.get_metric_history(run.run_id, "loss")] == [(1, 2.0), (2, 1.5)]
    assert [(m.step, m.value) for m in client.get_metric_history(run.run_id, "val/afc/R_at_1")] == [(2, 30.0)]
    assert "epoch" not in stored.data.metrics
    assert [a.path for a in client.list_artifacts(run.run_id, "model")] == ["model/config.json"]
    assert (tmp_path / "mlartifacts").is_dir()  # beside the store, not in the working directory


def test_tracking_off_and_a_bad_store(tmp_path):
    assert open_run(TrackingConfig(enabled=False), tmp_path, "x", JobConfig()) is None
    with pytest.raises(TrackingError, match=r"'nosuchscheme://x' cannot be used.*tracking.enabled=false"):
        open_run(TrackingConfig(uri="nosuchscheme://x"), tmp_path, "x", JobConfig())


def test_model_card_names_the_stage_data_config_and_metrics():
    manifest = Manifest(schema_version=3, dataset="cirr", split="train", source="/data/cirr", image_size=64,
                        pixel_format="uint8", config_hash="abc", counts={"triplets": 96}, layout="gallery")
    card = model_card(JobConfig(), manifest, {"loss": 0.25, "val_score": 41.5, "note": "text"},
                      {"steps": 10, "train_s": 2.0, "ms_per_step": 200.0})
    assert card.startswith("---\nlibrary_name: detailfusion\n") and "- cirr" in card.split("---")[1]
    assert "# DetailFusion: stage 2" in card and "96 triplets at 64 px" in card and "10 steps" in card
    assert "| loss | 0.2500 |" in card and "| val_score | 41.5000 |" in card and "note" not in card.split("## Config")[0]
    assert "```yaml\nname: detailfusion" in card
