"""A real multi-host Ray cluster on one Linux machine, for testing what only shows across hosts.

Each host is a network namespace with one interface named ``SOCKET_IFNAME`` (the same name on every host, so one
``GLOO_SOCKET_IFNAME`` fits all) on a private bridge: host ``i`` is ``<subnet>.<i + 1>``, this machine's side of
the bridge is ``<subnet>.254``. Host 0 runs the Ray head (GCS on 6379, dashboard on 8265), every other host a Ray
worker node; each has explicit CPUs, a custom resource naming it (``host0``, ``host1`` ...) and its Ray temp dir
under the cluster directory. One generated token authenticates everything (Ray's token auth mode). The
namespaces have no route out: traffic only goes to the addresses made here. All hosts share this machine's file
system, so any path stands in for the shared storage a real cluster needs.

Hosts are stopped by the process ids in their namespace, never by process name or ``ray stop`` (which would stop
every Ray on the machine). ``DIR/cluster.json`` describes the cluster to tests, benchmarks and users.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from detailfusion.library.errors import UserError

SOCKET_IFNAME = "dfnet0"
GCS_PORT = 6379
DASHBOARD_PORT = 8265
RAY = str(Path(sys.executable).parent / "ray")
MAX_SOCKET_PATH = 107  # Unix socket paths; Ray puts sockets at <temp>/session_<date>_<pid>/sockets/plasma_store
SESSION_SUFFIX = len("/session_2026-01-01_00-00-00_000000_1234567/sockets/plasma_store")


class LocalClusterError(UserError, RuntimeError):
    """A local cluster that cannot be made, reached or described."""


class NamespacesUnavailable(LocalClusterError):
    """This machine does not let us make network namespaces (not root, no iproute2, or a locked-down container)."""


@dataclass(frozen=True)
class Host:
    name: str  # also the custom resource that pins work to it
    ip: str
    netns: str
    link: str  # this machine's end of the host's veth pair (on the bridge)
    temp_dir: str  # Ray's --temp-dir of the host


@dataclass(frozen=True)
class LocalCluster:
    directory: str
    head_address: str  # <ip>:<port> of the GCS, for RAY_ADDRESS / ray.init
    dashboard_url: str  # for `ray job submit --address`
    token_path: str  # RAY_AUTH_TOKEN_PATH
    socket_ifname: str  # GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME
    bridge: str
    bridge_ip: str
    cpus_per_host: float
    object_store_mb: int
    hosts: tuple[Host, ...]

    @classmethod
    def load(cls, directory: str | Path) -> LocalCluster:
        path = Path(directory) / "cluster.json"
        try:
            raw = json.loads(path.read_text())
            return cls(**{**raw, "hosts": tuple(Host(**h) for h in raw["hosts"])})
        except FileNotFoundError:
            raise LocalClusterError(f"{path}: no local cluster here (run `detailfusion local-cluster up`)") from None
        except (ValueError, TypeError, KeyError) as exc:
            raise LocalClusterError(f"{path}: not a local cluster description ({exc})") from None

    def ray_env(self) -> dict[str, str]:
        """What a Ray process or CLI needs to join or reach this cluster (token auth, the interface to use)."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": self.token_path,
                "GLOO_SOCKET_IFNAME": self.socket_ifname, "NCCL_SOCKET_IFNAME": self.socket_ifname}

    def on_host(self, index: int, argv: list[str], env: dict[str, str] | None = None) -> list[str]:
        """``argv`` run inside host ``index``'s namespace with the cluster's Ray environment (plus ``env``)."""
        pairs = [f"{k}={v}" for k, v in {**self.ray_env(), **(env or {})}.items()]
        return ["ip", "netns", "exec", self.hosts[index].netns, "env", *pairs, *argv]

    def link_bytes(self) -> int:
        """Bytes sent + received so far on every host's link (host-to-host traffic counts once on each link)."""
        total = 0
        for host in self.hosts:
            stats = Path("/sys/class/net") / host.link / "statistics"
            total += int((stats / "tx_bytes").read_text()) + int((stats / "rx_bytes").read_text())
        return total


# ---------------------------------------------------------------------------------------------------
# up / down


def up(directory: str | Path, hosts: int = 2, cpus_per_host: float = 2, subnet: str | None = None,
       object_store_mb: int = 200, timeout_s: float = 180) -> LocalCluster:
    """Make ``hosts`` namespaces on a bridge, start Ray on each, wait until the head sees all of them alive, and
    write ``DIR/cluster.json``. ``subnet`` (three octets) defaults to the first free ``10.77.N``, so a cluster
    left up elsewhere on this machine does not stop a new one. A failure removes everything made so far."""
    check_supported()
    directory = Path(directory).resolve()
    if not 1 <= hosts <= 250:
        raise LocalClusterError(f"--hosts must be between 1 and 250, got {hosts}")
    if len(str(directory)) + len("/ray/h000") + SESSION_SUFFIX > MAX_SOCKET_PATH:
        raise LocalClusterError(f"{directory}: path too long for Ray's Unix sockets (107 characters with the "
                                "session path): use a shorter --dir, e.g. under /tmp")
    if (directory / "cluster.json").exists() or _namespaces(_tag(directory)):
        raise LocalClusterError(f"{directory}: a local cluster is already up here; run `detailfusion local-cluster "
                                f"down --dir {directory}` first")
    subnet = _check_subnet_free(subnet) if subnet else _free_subnet()
    directory.mkdir(parents=True, exist_ok=True)
    cluster = _describe(directory, hosts, cpus_per_host, subnet, object_store_mb)
    try:
        _write_token(Path(cluster.token_path))
        _make_network(cluster)
        for index in range(hosts):
            start_host(cluster, index)
        (directory / "cluster.json").write_text(json.dumps(asdict(cluster), indent=2) + "\n")
        wait_for_nodes(cluster, hosts, timeout_s)
    except BaseException:
        down(directory, quiet=True)
        raise
    return cluster


def down(directory: str | Path, quiet: bool = False) -> list[str]:
    """Stop every host's processes (by the pids in its namespace), delete namespaces, links and cluster.json.
    Safe to run twice and after a failed ``up``; returns what was removed."""
    check_supported()
    directory = Path(directory).resolve()
    tag = _tag(directory)
    removed = []
    for netns in _namespaces(tag):
        killed = _kill_namespace(netns)
        _ip("netns", "del", netns, check=False)
        removed.append(f"host namespace {netns} ({killed} processes)")
    for link in _links(tag):
        _ip("link", "del", link, check=False)
        removed.append(f"link {link}")
    description = directory / "cluster.json"
    if description.exists():
        description.unlink()
        removed.append(str(description))
    if not quiet:
        print("\n".join(f"removed {item}" for item in removed) if removed else f"no local cluster at {directory}")
    return removed


def start_host(cluster: LocalCluster, index: int) -> None:
    """Start Ray on host ``index`` (the head on host 0). Also how a stopped host is brought back."""
    host = cluster.hosts[index]
    common = [f"--node-ip-address={host.ip}", f"--num-cpus={cluster.cpus_per_host:g}",
              f"--resources={json.dumps({host.name: 1})}", f"--temp-dir={host.temp_dir}",
              f"--object-store-memory={cluster.object_store_mb * 1024 * 1024}", "--disable-usage-stats"]
    if index == 0:
        role = ["--head", f"--port={GCS_PORT}", "--include-dashboard=true", f"--dashboard-host={host.ip}",
                f"--dashboard-port={DASHBOARD_PORT}"]
    else:
        role = [f"--address={cluster.head_address}"]
    Path(host.temp_dir).mkdir(parents=True, exist_ok=True)
    # RAY_ADDRESS in every Ray process of the host: Ray's own "auto" lookups (e.g. Train's placement-group cleaner)
    # otherwise scan this machine's processes and also find Rays of other hosts or of the machine itself
    env = {"RAY_ADDRESS": cluster.head_address}
    started = subprocess.run(cluster.on_host(index, [RAY, "start", *role, *common], env=env), capture_output=True,
                             text=True, timeout=300, stdin=subprocess.DEVNULL)
    if started.returncode != 0:
        raise LocalClusterError(f"ray start on {host.name} ({host.ip}) failed:\n{(started.stdout + started.stderr)[-3000:]}")


def stop_host(cluster: LocalCluster, index: int, sig: int = signal.SIGKILL) -> int:
    """Kill every process of host ``index`` (what losing the machine looks like); returns how many."""
    return _kill_namespace(cluster.hosts[index].netns, sig)


def alive_nodes(cluster: LocalCluster) -> list[dict]:
    """The head's view: [{node_ip, node_id, resources_total}] of the nodes it sees alive (dashboard state API,
    with the cluster's token)."""
    import urllib.request

    request = urllib.request.Request(f"{cluster.dashboard_url}/api/v0/nodes?limit=1000&detail=1",
                                     headers={"Authorization": f"Bearer {Path(cluster.token_path).read_text().strip()}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        nodes = json.load(response)["data"]["result"]["result"]
    return [{"node_ip": n["node_ip"], "node_id": n["node_id"], "resources_total": n["resources_total"]}
            for n in nodes if n["state"] == "ALIVE"]


def wait_for_nodes(cluster: LocalCluster, count: int, timeout_s: float = 180) -> list[dict]:
    """Poll the head until ``count`` nodes are alive."""
    deadline, nodes, error = time.monotonic() + timeout_s, [], None
    while time.monotonic() < deadline:
        try:
            nodes = alive_nodes(cluster)
            error = None
        except Exception as exc:  # the dashboard is still starting
            error = exc
        if len(nodes) == count:
            return nodes
        time.sleep(1.0)
    seen = ", ".join(n["node_ip"] for n in nodes) or "none"
    raise LocalClusterError(f"the head at {cluster.dashboard_url} sees {len(nodes)} of {count} nodes alive after "
                            f"{timeout_s:.0f} s ({seen}){f'; last error: {error}' if error else ''}")


def usage(cluster: LocalCluster) -> str:
    """How to use the cluster from this machine's shell (printed by ``up``)."""
    hosts = "\n".join(f"  {h.name}: {h.ip} (netns {h.netns})" for h in cluster.hosts)
    return (f"local cluster of {len(cluster.hosts)} hosts up:\n{hosts}\n"
            f"  dashboard {cluster.dashboard_url}   head {cluster.head_address}\n\n"
            f"export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={cluster.token_path}\n"
            f"ray job submit --address {cluster.dashboard_url} --working-dir . -- \"$(which python)\" "
            "jobs/stage2_joint.py --config jobs/configs/stage2_tiny.yaml --set train.num_workers=2 "
            "--set train.placement_strategy=STRICT_SPREAD ...   (absolute paths: every host sees this file system)\n"
            f"a driver on the head host: ip netns exec {cluster.hosts[0].netns} env RAY_ADDRESS={cluster.head_address} "
            f"RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={cluster.token_path} <command>\n"
            f"stop it: detailfusion local-cluster down --dir {cluster.directory}")


# ---------------------------------------------------------------------------------------------------
# machinery


def check_supported() -> None:
    """Raise ``NamespacesUnavailable`` (one line saying why) where network namespaces cannot be made."""
    if not sys.platform.startswith("linux"):
        raise NamespacesUnavailable(f"local-cluster needs Linux network namespaces; this is {sys.platform}")
    if shutil.which("ip") is None:
        raise NamespacesUnavailable("local-cluster needs the `ip` command (iproute2), which is not installed")
    if os.geteuid() != 0:
        raise NamespacesUnavailable("local-cluster needs root to make network namespaces (run as root or in CI)")
    probe = f"dfprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        raise NamespacesUnavailable(f"this machine does not allow network namespaces: {made.stderr.strip()}")
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)


def _tag(directory: Path) -> str:
    """Short name stem of one cluster's namespaces and links (interface names hold 15 characters)."""
    return hashlib.sha1(str(directory).encode()).hexdigest()[:6]


def _describe(directory: Path, hosts: int, cpus: float, subnet: str, object_store_mb: int) -> LocalCluster:
    tag = _tag(directory)
    members = tuple(Host(name=f"host{i}", ip=f"{subnet}.{i + 1}", netns=f"df-{tag}-h{i}", link=f"df{tag}h{i}",
                         temp_dir=str(directory / "ray" / f"h{i}")) for i in range(hosts))
    return LocalCluster(
        directory=str(directory), head_address=f"{members[0].ip}:{GCS_PORT}",
        dashboard_url=f"http://{members[0].ip}:{DASHBOARD_PORT}", token_path=str(directory / "auth_token"),
        socket_ifname=SOCKET_IFNAME, bridge=f"dfbr{tag}", bridge_ip=f"{subnet}.254", cpus_per_host=cpus,
        object_store_mb=object_store_mb, hosts=members,
    )


def _write_token(path: Path) -> None:
    from ray._private.authentication.authentication_token_generator import generate_new_authentication_token

    path.write_text(generate_new_authentication_token())
    path.chmod(0o600)


def _make_network(cluster: LocalCluster) -> None:
    _ip("link", "add", cluster.bridge, "type", "bridge")
    _ip("addr", "add", f"{cluster.bridge_ip}/24", "dev", cluster.bridge)
    _ip("link", "set", cluster.bridge, "up")
    for index, host in enumerate(cluster.hosts):
        peer = f"{host.link[:-len(str(index)) - 1]}p{index}"
        _ip("netns", "add", host.netns)
        _ip("link", "add", host.link, "type", "veth", "peer", "name", peer)
        _ip("link", "set", host.link, "master", cluster.bridge)
        _ip("link", "set", host.link, "up")
        _ip("link", "set", peer, "netns", host.netns)
        inside = ["-n", host.netns]
        _ip(*inside, "link", "set", peer, "name", cluster.socket_ifname)
        _ip(*inside, "addr", "add", f"{host.ip}/24", "dev", cluster.socket_ifname)
        _ip(*inside, "link", "set", cluster.socket_ifname, "up")
        _ip(*inside, "link", "set", "lo", "up")


def _subnets_in_use() -> dict[str, str]:
    """Three-octet IPv4 prefixes of this machine's addresses -> the interface holding one."""
    shown = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True).stdout
    used = {}
    for line in shown.splitlines():
        fields = line.split()
        address = fields[fields.index("inet") + 1].split("/")[0]
        used[address.rsplit(".", 1)[0]] = fields[1]
    return used


def _check_subnet_free(subnet: str) -> str:
    holder = _subnets_in_use().get(subnet)
    if holder:
        raise LocalClusterError(f"subnet {subnet}.0/24 is already in use here ({holder}): another local cluster is up "
                                "(stop it with `local-cluster down`) or choose another --subnet")
    return subnet


def _free_subnet() -> str:
    used = _subnets_in_use()
    for third in range(256):
        if f"10.77.{third}" not in used:
            return f"10.77.{third}"
    raise LocalClusterError("every subnet 10.77.0-255.0/24 is in use here: stop old clusters with "
                            "`local-cluster down` or choose --subnet")


def _namespaces(tag: str) -> list[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return sorted(line.split()[0] for line in listed.splitlines() if line.startswith(f"df-{tag}-h"))


def _links(tag: str) -> list[str]:
    listed = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    names = [line.split(":")[1].strip().split("@")[0] for line in listed.splitlines() if ":" in line]
    return [name for name in names if name in (f"dfbr{tag}",) or name.startswith(f"df{tag}h")]


def _kill_namespace(netns: str, sig: int = signal.SIGTERM, grace_s: float = 10.0) -> int:
    """Signal every process in ``netns``; after ``grace_s`` SIGKILL what is left. Returns how many there were."""
    pids = _pids(netns)
    for pid in pids:
        _signal(pid, sig)
    deadline = time.monotonic() + grace_s
    while _pids(netns) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in _pids(netns):
        _signal(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _pids(netns) and time.monotonic() < deadline:
        time.sleep(0.2)
    return len(pids)


def _pids(netns: str) -> list[int]:
    listed = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True).stdout
    return [int(p) for p in listed.split() if p.isdigit() and int(p) != os.getpid()]


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _ip(*args: str, check: bool = True) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise LocalClusterError(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")
