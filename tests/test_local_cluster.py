"""`detailfusion local-cluster` short of a running cluster: the clear refusals (no namespaces, a path too long
for Ray's sockets, a missing or broken cluster.json), a failed `up` removing what it made, the CLI wiring.
The real 2-host cluster is tests/test_multihost.py."""

import json
import tempfile
from pathlib import Path

import pytest
from conftest import missing_prerequisite

from detailfusion.platform import local_cluster
from detailfusion.platform.cli import main


def namespaces_or_skip() -> None:
    try:
        local_cluster.check_supported()
    except local_cluster.NamespacesUnavailable as exc:
        missing_prerequisite(str(exc))


def test_without_root_it_says_so_in_one_line(monkeypatch):
    monkeypatch.setattr(local_cluster.os, "geteuid", lambda: 1000)
    with pytest.raises(local_cluster.NamespacesUnavailable, match="needs root") as caught:
        local_cluster.check_supported()
    assert "\n" not in str(caught.value)


def test_without_iproute2_it_says_so(monkeypatch):
    monkeypatch.setattr(local_cluster.shutil, "which", lambda name: None)
    with pytest.raises(local_cluster.NamespacesUnavailable, match="iproute2"):
        local_cluster.check_supported()


def test_cli_reports_the_reason_and_fails(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(local_cluster.os, "geteuid", lambda: 1000)
    assert main(["local-cluster", "up", "--dir", str(tmp_path)]) == 2
    assert "local-cluster: error: local-cluster needs root" in capsys.readouterr().err


def test_a_directory_too_long_for_ray_sockets_is_refused_before_anything_is_made(tmp_path):
    namespaces_or_skip()
    deep = tmp_path / ("x" * 60)
    with pytest.raises(local_cluster.LocalClusterError, match="too long"):
        local_cluster.up(deep)
    assert not deep.exists()


def test_cluster_json_errors_name_the_file(tmp_path):
    with pytest.raises(local_cluster.LocalClusterError, match="no local cluster here"):
        local_cluster.LocalCluster.load(tmp_path)
    (tmp_path / "cluster.json").write_text(json.dumps({"head_address": "10.77.0.1:6379"}))
    with pytest.raises(local_cluster.LocalClusterError, match="cluster.json: not a local cluster description"):
        local_cluster.LocalCluster.load(tmp_path)


def test_host_commands_carry_the_token_and_interface(tmp_path):
    cluster = local_cluster._describe(tmp_path, 2, 2, "10.77.0", 200)
    argv = cluster.on_host(1, ["python", "-c", "pass"], env={"RAY_ADDRESS": cluster.head_address})
    assert argv[:4] == ["ip", "netns", "exec", cluster.hosts[1].netns]
    assert f"RAY_AUTH_TOKEN_PATH={tmp_path / 'auth_token'}" in argv and "GLOO_SOCKET_IFNAME=dfnet0" in argv
    assert argv[-3:] == ["python", "-c", "pass"] and "RAY_ADDRESS=10.77.0.1:6379" in argv
    assert [h.ip for h in cluster.hosts] == ["10.77.0.1", "10.77.0.2"] and cluster.bridge_ip == "10.77.0.254"
    assert all(len(name) <= 15 for h in cluster.hosts for name in (h.link,)) and len(cluster.bridge) <= 15


def test_a_failed_up_removes_what_it_made():
    namespaces_or_skip()
    directory = tempfile.mkdtemp(prefix="dfbad", dir="/tmp")
    with pytest.raises(local_cluster.LocalClusterError, match="ray start on host0"):
        local_cluster.up(directory, hosts=2, cpus_per_host=-1, subnet="10.78.0")  # Ray refuses negative CPUs
    tag = local_cluster._tag(Path(directory))
    assert local_cluster._namespaces(tag) == [] and local_cluster._links(tag) == []
    assert not (Path(directory) / "cluster.json").exists()


def test_a_subnet_held_by_a_leftover_bridge_is_skipped_by_default_and_refused_when_named():
    """A cluster left up by a killed run holds 10.77.0: a new `up` takes the next free /24 (a CI run once failed
    on exactly this), and naming the held one is a clear refusal before anything is made."""
    namespaces_or_skip()
    held = next(f"10.77.{n}" for n in range(256) if f"10.77.{n}" not in local_cluster._subnets_in_use())
    bridge = "dftestheld"
    local_cluster._ip("link", "add", bridge, "type", "bridge")
    try:
        local_cluster._ip("addr", "add", f"{held}.254/24", "dev", bridge)
        assert local_cluster._free_subnet() != held
        with pytest.raises(local_cluster.LocalClusterError, match=f"subnet {held}.0/24 is already in use here "
                                                                  f"\\({bridge}\\)"):
            local_cluster.up(tempfile.mkdtemp(prefix="dfbad", dir="/tmp"), subnet=held)
    finally:
        local_cluster._ip("link", "del", bridge, check=False)
