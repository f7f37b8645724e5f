"""`.ci/run` sets CI=true itself and finds the shared datasets only through DETAILFUSION_SHARED_DATASETS or beside the
checkout (../shared/datasets), never in one machine's folder. Run on a stand-in checkout whose setup and Python only
print what they were given."""

import os
import shutil
import subprocess

from conftest import REPO


def run_ci(tmp_path, env: dict, beside: bool) -> dict:
    checkout = tmp_path / "checkout"
    (checkout / ".ci").mkdir(parents=True)
    shutil.copy(REPO / ".ci" / "run", checkout / ".ci" / "run")
    (checkout / "scripts").mkdir()
    (checkout / "scripts" / "setup.sh").write_text("true\n")
    (checkout / ".venv" / "bin").mkdir(parents=True)
    tools = tmp_path / "bin"  # chromium and ip present: nothing to install
    tools.mkdir()
    for name, text in {"python": 'echo "CI=$CI"; echo "DATASETS=${DETAILFUSION_SHARED_DATASETS:-}"',
                       "chromium": "true", "ip": "true"}.items():
        path = (checkout / ".venv" / "bin" if name == "python" else tools) / name
        path.write_text(f"#!/bin/sh\n{text}\n")
        path.chmod(0o755)
    if beside:
        (tmp_path / "shared/datasets/cirr/captions").mkdir(parents=True)
        (tmp_path / "shared/datasets/cirr/captions/cap.rc2.val.json").write_text("{}")
    clean = {k: v for k, v in os.environ.items() if k not in ("CI", "DETAILFUSION_SHARED_DATASETS")}
    out = subprocess.run(["bash", str(checkout / ".ci" / "run")], env={**clean, "PATH": f"{tools}:{clean['PATH']}", **env},
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines())


def test_ci_sets_ci_true_and_finds_the_datasets_beside_the_checkout(tmp_path):
    assert run_ci(tmp_path, {}, beside=True) == {"CI": "true", "DATASETS": str(tmp_path / "shared" / "datasets")}


def test_ci_keeps_the_callers_datasets_and_looks_nowhere_else(tmp_path):
    assert run_ci(tmp_path / "a", {"DETAILFUSION_SHARED_DATASETS": "/data/x"}, beside=True)["DATASETS"] == "/data/x"
    # nothing beside the checkout: none found (whatever this machine keeps elsewhere), and the caller's CI is overruled
    assert run_ci(tmp_path / "b", {"CI": "false"}, beside=False) == {"CI": "true", "DATASETS": ""}
