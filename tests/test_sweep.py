"""Ray Tune sweeps: space files checked at start; a real ASHA sweep of the tiny stage 2 (every trial a Ray Train
run, scored on validation recall) with its results table and best model; an interrupted sweep resumed without
rerunning its finished trial, continuing the unfinished one from its checkpoint."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import registered_checkpoint_step
from test_interrupts import assert_all_freed, snapshot

from detailfusion.library.config import ConfigError, JobConfig, load_config
from detailfusion.library.model import load_model, model_fingerprint
from detailfusion.platform.tune import SpaceError, SweepSettings, load_space, sweep

REPO = Path(__file__).resolve().parents[1]
STAGE2 = REPO / "jobs/configs/stage2_tiny.yaml"


def write_space(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# -- space files ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gamma", "lr", "hard_negatives", "combined"])
def test_shipped_spaces_load(name):
    space = load_space(REPO / "tune_spaces" / f"{name}.yaml", load_config(JobConfig, STAGE2))
    assert space and all(dist in ("grid", "choice", "uniform", "loguniform") for dist, _ in space.values())


@pytest.mark.parametrize("text, message", [
    ("loss.gamma: {normal: [0, 1]}", "unknown distribution 'normal'"),
    ("loss.gamma: {uniform: [2.0, 1.0]}", "low < high"),
    ("optim.lr: {loguniform: [0, 1.0e-3]}", "must be > 0"),
    ("loss.gama: {grid: [1.0, 2.0]}", "unknown key 'loss.gama'"),
    ("loss.subset_negatives: {choice: [1, two]}", "expects an integer"),
    ("workdir: {choice: [a, b]}", "the sweep sets this key itself"),
    ("loss.gamma: [1, 2]", "expected one distribution"),
    ("loss.gamma: {grid: []}", "non-empty list"),
    ("- just a list", "expected a mapping"),
])
def test_bad_space_files_are_clear_errors(tmp_path, text, message):
    path = write_space(tmp_path / "space.yaml", text)
    with pytest.raises(SpaceError, match=message) as error:
        load_space(path, load_config(JobConfig, STAGE2))
    assert str(path) in str(error.value)


# -- real sweeps --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stage2(stage2_data):
    return stage2_data


def read_rows(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_asha_sweep_stops_the_weak_trials_and_exports_the_best(stage2, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the sweep's own default store, under its out dir
    root, overrides = stage2
    space = write_space(tmp_path / "lr.yaml", "optim.lr: {grid: [3.0e-3, 1.0e-9, 1.0e-10]}\n")
    config = load_config(JobConfig, STAGE2, [*overrides, "train.epochs=3"])
    out = tmp_path / "sweep"
    rows = sweep(config, SweepSettings(stage=2, space=str(space), out=str(out), scheduler="asha",
                                       reduction_factor=2, trial_cpus=0.25))
    table = read_rows(out / "results.csv")
    assert [r["trial"] for r in table] == [r["trial"] for r in rows] and len(table) == 3
    best, *rest = table
    assert best["status"] == "FINISHED" and float(best["optim.lr"]) == 3e-3 and best["epochs"] == "3"
    assert [r["status"] for r in rest] == ["STOPPED", "STOPPED"] and all(r["early_stopped"] == "True" for r in rest)
    assert all(int(r["epochs"]) < 3 for r in rest)
    assert float(best["val_score"]) > max(float(r["val_score"]) for r in rest)
    # the score is validation recall from the evaluation code, also written by the trial itself
    validation = read_rows(out / "trials" / best["trial"] / "stage2" / "validation.csv")
    assert [int(r["epoch"]) for r in validation] == [1, 2, 3]
    assert float(validation[-1]["val_score"]) == pytest.approx(float(best["val_score"]))
    assert float(validation[-1]["val/static/Avg"]) == pytest.approx(float(best["val_score"]))
    # the best model is the best trial's export and loads with from_pretrained
    assert model_fingerprint(out / "best_model") == model_fingerprint(best["export"])
    load_model(out / "best_model")
    assert json.loads((out / "best.json").read_text())["trial"] == best["trial"]
    markdown = (out / "results.md").read_text()
    assert "| trial | status | epochs | optim.lr | val_score |" in markdown and "STOPPED" in markdown
    # every trial is an MLflow run (Ray Tune's MLflowLoggerCallback): its lr and its per-epoch validation score
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("detailfusion").experiment_id])
    by_lr = {float(r.data.params["optim.lr"]): r for r in runs}
    assert len(runs) == 3 and set(by_lr) == {3e-3, 1e-9, 1e-10}
    history = client.get_metric_history(by_lr[3e-3].info.run_id, "val_score")
    assert [m.value for m in history][-1] == pytest.approx(float(best["val_score"])) and len(history) == 3


@pytest.mark.slow
def test_an_interrupted_sweep_keeps_finished_trials_and_continues_the_unfinished_one(stage2, tmp_path, ray_local):
    """Two trials, one at a time: 1 epoch and 4 epochs. Ctrl-C on the driver once the 4-epoch trial's first
    checkpoint is registered (3 epochs still to go: the Ctrl-C cannot land after it ended); the rerun keeps what
    finished as it is and continues the 4-epoch trial from that checkpoint: each of its steps ran once."""
    root, overrides = stage2
    space = write_space(tmp_path / "epochs.yaml", "train.epochs: {grid: [1, 4]}\n")
    out = tmp_path / "sweep"
    args = ["sweep", "--stage", "2", "--space", str(space), "--config", str(STAGE2), "--out", str(out),
            "--scheduler", "fifo", *[a for o in overrides for a in ("--set", o)]]
    # the first run is its own driver process on the session's Ray (as under `ray job submit`), then Ctrl-C
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    log = (tmp_path / "first.log").open("w")
    before = snapshot(ray_local)
    first = subprocess.Popen([sys.executable, "-m", "detailfusion.platform.cli", *args], cwd=REPO, env=env,
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while (long := long_trial_with_a_checkpoint(out)) is None:
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.25)
    long_dir, checkpoint_step = long
    first.send_signal(signal.SIGINT)  # Ctrl-C on the driver
    assert first.wait(timeout=120) != 0  # stopped, not finished
    assert_all_freed(ray_local, before, (tmp_path / "first.log").read_text())  # nothing killed by the test
    assert not (long_dir / "DONE").is_file(), (tmp_path / "first.log").read_text()[-3000:]
    done = sorted(out.glob("trials/*/stage2/DONE"))  # the 1-epoch trial, when Tune ran it first
    before = {d: (d.stat().st_mtime_ns, (d.parent / "metrics.csv").read_text()) for d in done}

    config = load_config(JobConfig, STAGE2, overrides)
    rows = sweep(config, SweepSettings(stage=2, space=str(space), out=str(out), scheduler="fifo"))
    assert sorted(r["status"] for r in rows) == ["FINISHED", "FINISHED"]
    assert sorted(int(r["train.epochs"]) for r in rows) == [1, 4]
    assert {d: (d.stat().st_mtime_ns, (d.parent / "metrics.csv").read_text()) for d in done} == before  # not again
    assert len(list(out.glob("trials/*/stage2/DONE"))) == 2 and (out / "best_model" / "config.json").is_file()
    steps = [int(r["step"]) for r in read_rows(long_dir / "metrics.csv")]
    total = json.loads((long_dir / "DONE").read_text())["metrics"]["step"]
    # continued, not restarted: step 1 ran once; from the last row of the step after the checkpoint (the interrupted
    # run may have gone past it before it died), every remaining step once
    assert steps.count(1) == 1, steps
    resumed = steps[len(steps) - 1 - steps[::-1].index(checkpoint_step + 1):]
    assert resumed == list(range(checkpoint_step + 1, total + 1)), (checkpoint_step, steps)


def long_trial_with_a_checkpoint(out: Path) -> tuple[Path, int] | None:
    """(stage dir, step) of the 4-epoch trial once Ray Train has registered a checkpoint of it; else None."""
    for config_file in out.glob("trials/*/stage2/config.yaml"):
        stage_dir = config_file.parent
        if yaml.safe_load(config_file.read_text())["train"]["epochs"] != 4:
            continue
        for state in stage_dir.glob("ray/*/checkpoint_manager_snapshot.json"):
            step = registered_checkpoint_step(state)
            if step:
                return stage_dir, step
    return None


def test_a_sweep_without_a_validation_split_is_refused(tmp_path):
    config = load_config(JobConfig, STAGE2)
    space = write_space(tmp_path / "g.yaml", "loss.gamma: {grid: [1.0]}\n")
    with pytest.raises(ConfigError, match="data.val_prepared"):
        sweep(config, SweepSettings(stage=2, space=str(space), out=str(tmp_path / "s")))
    with pytest.raises(ConfigError, match="--stage 3"):
        sweep(config, SweepSettings(stage=3, space=str(space), out=str(tmp_path / "s")))
