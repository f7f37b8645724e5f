"""The one front door: every command `detailfusion <command> [--config FILE] [--set key=value]...`, the scripts in
jobs/ and `python -m detailfusion` going through it, refusing bad keys before doing any work."""

import subprocess
import sys

import pytest
from conftest import REPO


def run(*args):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_prepare_job_help_and_bad_keys():
    assert run("jobs/prepare_data.py", "--help").returncode == 0
    bad = run("jobs/prepare_data.py", "--config", "jobs/configs/prepare_cirr_val.yaml", "--set", "max_bad_fractio=1")
    assert bad.returncode == 2 and "unknown key 'max_bad_fractio'" in bad.stderr
    missing = run("jobs/prepare_data.py", "--config", "jobs/configs/prepare_cirr_val.yaml", "--set", "root=/nonexistent/x",
                  "--set", "out=/tmp/never")
    assert missing.returncode == 2 and "dataset root /nonexistent/x does not exist" in missing.stderr


def test_cli_prepare_refuses_a_wrong_dataset_name():
    result = run("-m", "detailfusion.platform.cli", "prepare", "--dataset", "coco", "--root", ".", "--split", "val", "--out", "x")
    assert result.returncode == 2 and "unknown dataset 'coco'; registered: cirr, fashioniq, ipr2pr" in result.stderr


def test_stage_paths_become_absolute_for_the_workers(tmp_path, monkeypatch):
    """Train workers run in other working directories: a relative workdir / prepared / init_from must not reach them."""
    from detailfusion.library.config import JobConfig, load_config
    from detailfusion.platform.train.run import absolute_paths

    monkeypatch.chdir(tmp_path)
    config = absolute_paths(load_config(JobConfig, None, ["workdir=runs/x", "data.prepared=prep/a",
                                                          "model.init_from=runs/x/stage1/model"]))
    assert config.workdir == str(tmp_path / "runs/x") and config.data.prepared == str(tmp_path / "prep/a")
    assert config.model.init_from == str(tmp_path / "runs/x/stage1/model") and config.model.pretrained is None


def test_sweep_job_help_and_bad_space(tmp_path):
    assert run("jobs/sweep.py", "--help").returncode == 0
    space = tmp_path / "space.yaml"
    space.write_text("loss.gamma: {normal: [1.0, 2.0]}\n")
    bad = run("jobs/sweep.py", "--stage", "2", "--space", str(space), "--config", "jobs/configs/stage2_tiny.yaml",
              "--set", f"data.val_prepared={tmp_path}")
    assert bad.returncode == 2 and "unknown distribution 'normal'" in bad.stderr and str(space) in bad.stderr


def test_a_refusal_is_one_line_and_a_failure_elsewhere_keeps_its_traceback(capsys):
    """A UserError (here a ConfigError from a reader's check) is one line; a ValueError from a library, and one from
    our own code that is not a refusal (a bug: top-k asked of a gallery too small), keep their tracebacks."""
    import torch

    from detailfusion.platform.cli import report_error

    def ours():
        from detailfusion.library.data.cirr import read_cirr

        read_cirr("/nonexistent", "bogus")  # refused by a check of the package

    def library():
        import json

        json.loads("{not json")  # a ValueError from a library: a failure, not a refusal

    def bug():
        from detailfusion.library.ranking import top_k

        top_k(torch.zeros(1, 2), 5)

    for raise_it in (ours, library, bug):
        try:
            raise_it()
        except ValueError as exc:
            report_error("detailfusion x", exc)
    err = capsys.readouterr().err
    first, rest = err.split("detailfusion x: error: CIRR split must be one of train, val, test1, got 'bogus'\n")
    second, third = rest.split("detailfusion x: error: Expecting property name enclosed in double quotes: "
                               "line 1 column 2 (char 1)\n")
    assert first == "" and "Traceback (most recent call last)" in second and "json" in second
    assert "Traceback (most recent call last)" in third and "ranking.py" in third
    assert third.rstrip().endswith("detailfusion x: error: the gallery holds 2 images, fewer than k=5")


def test_train_refuses_another_stage_s_config_through_every_door():
    """`detailfusion train`, `python -m detailfusion train` and jobs/stage2_joint.py are one code path."""
    for argv in (["-m", "detailfusion", "train", "--stage", "2", "--config", "jobs/configs/stage1_tiny.yaml"],
                 ["jobs/stage2_joint.py", "--config", "jobs/configs/stage1_tiny.yaml"]):
        result = run(*argv)
        assert result.returncode == 2, result.stderr
        assert "train.stage is 1, but the command is `train --stage 2`" in result.stderr
        assert "Traceback" not in result.stderr  # a refusal is one line
    assert "--stage" in run("-m", "detailfusion", "train", "--help").stdout


def test_a_command_s_config_file_then_flags_then_set(tmp_path):
    """Each config-backed command reads --config first, its flags override the file, --set overrides both; a
    required field left empty is refused naming the flag and the file key."""
    from detailfusion.library.config import ConfigError
    from detailfusion.platform.cli import build_parser, command_config

    file = tmp_path / "eval.yaml"
    file.write_text("dataset: fashioniq\nsplit: val\ncheckpoint: runs/a/model\nout: runs/a/eval\nbatch_size: 8\n")
    args = build_parser().parse_args(["evaluate", "--config", str(file), "--checkpoint", "runs/b/model",
                                      "--set", "batch_size=4", "--categories", "dress"])
    config = command_config(args)
    assert (config.dataset, config.checkpoint, config.out, config.batch_size, config.categories) == (
        "fashioniq", "runs/b/model", "runs/a/eval", 4, ("dress",))
    with pytest.raises(ConfigError, match=r"checkpoint is not set \(--checkpoint or 'checkpoint:' in the --config"):
        command_config(build_parser().parse_args(["index", "--dataset", "cirr", "--split", "val", "--out", "x"]))
    stage = command_config(build_parser().parse_args(["train", "--stage", "3", "--set", "train.epochs=1"]))
    assert stage.train.stage == 3 and stage.train.epochs == 1  # no file: --stage sets the stage
