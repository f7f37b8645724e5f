"""Ctrl-C (SIGINT) or SIGTERM to a driver on a persistent cluster frees everything its job held.

The session's Ray plays the shared cluster (as after ``ray start --head``): each driver is its own process joining it
through RAY_ADDRESS, as under ``ray job submit``. The test signals it at a point of its run, waits for it to exit and
then only watches: every actor and placement group the driver's job created must be gone and every CPU free again
within a bound, with nothing killed by the test."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

STAGE2 = REPO / "jobs/configs/stage2_tiny.yaml"
FREED_WITHIN_S = 60


def live(ray) -> tuple[list, list]:
    """(actors not dead, placement groups not removed) of the cluster, by its state API."""
    from ray.util.state import list_actors, list_placement_groups

    address = ray.get_runtime_context().gcs_address
    return (list_actors(address, filters=[("state", "!=", "DEAD")], limit=10_000),
            [g for g in list_placement_groups(address, limit=10_000) if g.state != "REMOVED"])


def snapshot(ray) -> tuple[set, set]:
    actors, groups = live(ray)
    return {a.actor_id for a in actors}, {g.placement_group_id for g in groups}


def held_by_others(ray, before: tuple[set, set]) -> tuple[list, list]:
    """(actors, placement groups) alive now that were not ``before`` (a pair of id sets)."""
    actors, groups = live(ray)
    return [a for a in actors if a.actor_id not in before[0]], [g for g in groups if g.placement_group_id not in before[1]]


def assert_all_freed(ray, before: tuple[set, set], log: str) -> None:
    total, deadline = ray.cluster_resources().get("CPU", 0), time.monotonic() + FREED_WITHIN_S
    while True:
        actors, groups = held_by_others(ray, before)
        free = ray.available_resources().get("CPU", 0)
        if not actors and not groups and free >= total:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"{FREED_WITHIN_S} s after the driver exited: {total - free} of {total} CPUs held, actors "
                        f"{[(a.class_name, a.state, a.pid) for a in actors]}, placement groups "
                        f"{[(g.placement_group_id, g.state) for g in groups]}\n{log[-3000:]}", pytrace=False)
        time.sleep(0.5)


def cpus_held(ray) -> bool:
    return ray.available_resources().get("CPU", 0) < ray.cluster_resources().get("CPU", 0)


def interrupt(ray, args: list[str], when, sig: int, log_path: Path, timeout_s: float = 240) -> str:
    """Run ``detailfusion <args>`` as a driver of the session's cluster, send ``sig`` once ``when()`` holds, wait for it
    to exit; every actor and placement group it made must then be freed. Returns its output."""
    before = snapshot(ray)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    with log_path.open("w") as log:
        driver = subprocess.Popen([sys.executable, "-m", "detailfusion.platform.cli", *args], cwd=REPO, env=env, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while not when():
        assert driver.poll() is None, f"the driver ended before the signal:\n{log_path.read_text()[-3000:]}"
        assert time.monotonic() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.05)
    driver.send_signal(sig)
    code = driver.wait(timeout=120)
    text = log_path.read_text()
    assert code != 0, f"an interrupted driver must not exit 0 (it did not finish):\n{text[-3000:]}"
    assert_all_freed(ray, before, text)
    return text


def test_sigterm_takes_the_path_of_ctrl_c():
    """stop_on_sigterm (init_ray installs it): SIGTERM calls the SIGINT handler in force, and a handler that exits 0
    (Ray Train's, once it has aborted the run) still ends the driver as interrupted, not as a success."""
    code = """if True:
        import os, signal
        from detailfusion.platform.ray_setup import stop_on_sigterm
        calls = []
        signal.signal(signal.SIGINT, lambda signum, frame: calls.append(signum))
        stop_on_sigterm()
        os.kill(os.getpid(), signal.SIGTERM)
        assert calls == [signal.SIGINT], calls
        def aborted(signum, frame):
            raise SystemExit(0)
        signal.signal(signal.SIGINT, aborted)
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        except KeyboardInterrupt:
            print("interrupted")
        """
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == "interrupted\n", done.stderr


@pytest.fixture(scope="module")
def stage_args(stage2_data):
    root, overrides = stage2_data
    return lambda workdir, *more: ["train", "--stage", "2", "--config", str(STAGE2),
                                    *[a for o in [*overrides, f"workdir={workdir}", *more] for a in ("--set", o)]]


def stage_run_statuses(workdir: Path) -> list[str]:
    """The MLflow statuses of the stage runs of ``workdir`` (the session's store, MLFLOW_TRACKING_URI)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("detailfusion")
    return [r.info.status for r in client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`detailfusion.workdir` = '{workdir}'")]


def test_a_stage_job_interrupted_while_training_frees_its_workers(ray_local, stage_args, tmp_path):
    metrics = tmp_path / "run" / "stage2" / "metrics.csv"
    interrupt(ray_local, stage_args(tmp_path / "run", "train.log_every=1", "train.epochs=20"),
              lambda: metrics.is_file() and len(metrics.read_text().splitlines()) > 2, signal.SIGINT, tmp_path / "log")
    assert not (tmp_path / "run" / "stage2" / "DONE").exists()
    assert stage_run_statuses(tmp_path / "run") == ["FAILED"]  # closed by the driver on its way out, not left RUNNING


def test_a_stage_job_terminated_while_its_train_run_starts_frees_it(ray_local, stage_args, tmp_path):
    """The moment the worker group's placement group has reserved its CPUs, before any step; the driver closes its
    MLflow run on the way out."""
    interrupt(ray_local, stage_args(tmp_path / "run", "train.epochs=20"), lambda: cpus_held(ray_local),
              signal.SIGTERM, tmp_path / "log")
    assert stage_run_statuses(tmp_path / "run") == ["FAILED"]


def test_a_sweep_terminated_during_a_trial_frees_the_trial_and_its_train_run(ray_local, stage2_data, tmp_path):
    root, overrides = stage2_data
    space = tmp_path / "space.yaml"
    space.write_text("optim.lr: {grid: [1.0e-3, 1.0e-4]}\n")
    out = tmp_path / "sweep"
    args = ["sweep", "--stage", "2", "--space", str(space), "--config", str(STAGE2), "--out", str(out),
            "--scheduler", "fifo", *[a for o in [*overrides, "train.epochs=20", "train.log_every=1"]
                                     for a in ("--set", o)]]
    training = lambda: any(len(m.read_text().splitlines()) > 2 for m in out.glob("trials/*/stage2/metrics.csv"))  # noqa: E731
    log = interrupt(ray_local, args, training, signal.SIGTERM, tmp_path / "log")
    assert "sweep interrupted; rerun the same command to resume" in log  # Tune's own stop: trials resumable


def test_the_pipeline_terminated_while_preparing_its_data_frees_its_tasks(ray_local, tmp_path):
    """SIGTERM once the pipeline's Ray Data preparation holds CPUs (its first work on the cluster)."""
    interrupt(ray_local, ["pipeline", "--workdir", str(tmp_path / "run"), "--cirr-pairs", "200", "--test-pairs", "40",
                          "--ipr2pr-pairs", "32"], lambda: cpus_held(ray_local), signal.SIGTERM, tmp_path / "log")
