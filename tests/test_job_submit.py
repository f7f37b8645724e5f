"""A tiny stage submitted with `ray job submit` to a head this test starts (token auth, explicit resources and
ports, its own temp dir) and stops again by its own process ids: `ray stop` would stop every Ray here."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest
import torch

from conftest import REPO
from detailfusion.config import PrepareConfig
from detailfusion.data.prepare import prepare
from detailfusion.data.synthetic import write_synthetic
from detailfusion.model import build_model, save_model

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]
RAY = str(Path(sys.executable).parent / "ray")


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def stop_head(temp_dir: str) -> None:
    """Terminate the processes of the head whose session lives in ``temp_dir``, and their children."""
    procs = {}
    for root in psutil.process_iter(["cmdline"]):
        if temp_dir not in " ".join(root.info["cmdline"] or []):
            continue
        try:
            procs.update({p.pid: p for p in [root, *root.children(recursive=True)]})
        except psutil.NoSuchProcess:
            pass
    for p in procs.values():
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(procs.values()), timeout=15)
    for p in alive:
        p.kill()


@pytest.fixture
def head(tmp_path):
    temp_dir = tempfile.mkdtemp(prefix="dfray", dir="/tmp")  # short: Ray's socket paths must fit 107 chars
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    subprocess.run([RAY, "get-auth-token", "--generate"], env={**env, "HOME": str(home)}, check=True,
                   capture_output=True, timeout=60)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(home / ".ray" / "auth_token"))
    gcs, dash, client, node, obj, agent, agent_grpc, runtime_env, metrics = free_ports(9)
    start = [RAY, "start", "--head", "--num-cpus=2", f"--temp-dir={temp_dir}", f"--port={gcs}",
             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
             f"--ray-client-server-port={client}", f"--node-manager-port={node}", f"--object-manager-port={obj}",
             f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
             f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
             "--min-worker-port=24000", "--max-worker-port=24200", "--disable-usage-stats",
             "--object-store-memory=200000000"]
    try:
        started = subprocess.run(start, env=env, capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, started.stdout + started.stderr
        yield f"http://127.0.0.1:{dash}", env
    finally:
        stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_stage1_runs_through_ray_job_submit(head, tmp_path):
    address, env = head
    torch.manual_seed(0)
    save_model(*build_model("tiny"), tmp_path / "init")
    write_synthetic("ipr2pr", tmp_path / "raw", pairs=32, seed=0, image_size=64)
    prepare(PrepareConfig(dataset="ipr2pr", root=str(tmp_path / "raw"), split="train", out=str(tmp_path / "prep")))
    entry = [sys.executable, "jobs/stage1_pretrain_detail.py", "--config", "jobs/configs/stage1_tiny.yaml",
             "--set", f"workdir={tmp_path / 'run'}", "--set", f"data.prepared={tmp_path / 'prep'}",
             "--set", f"model.init_from={tmp_path / 'init'}", "--set", "train.epochs=1",
             "--set", "train.batch_size=16"]
    submit = subprocess.run([RAY, "job", "submit", "--address", address, "--working-dir", str(REPO), "--", *entry],
                            env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    output = submit.stdout + submit.stderr
    assert submit.returncode == 0, output[-3000:]
    assert re.search(r"Job '\S+' succeeded", output), output[-3000:]
    assert (tmp_path / "run/stage1/model/model.safetensors").is_file()
    assert (tmp_path / "run/stage1/DONE").is_file()
