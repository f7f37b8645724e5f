"""Scripts in jobs/ take --config FILE and --set key=value, and refuse bad keys before doing any work."""

import subprocess
import sys

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
    result = run("-m", "detailfusion.cli", "prepare", "--dataset", "coco", "--root", ".", "--split", "val", "--out", "x")
    assert result.returncode == 2 and "invalid choice: 'coco'" in result.stderr
