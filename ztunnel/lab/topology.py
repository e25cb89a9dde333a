"""Lab topologies made of network namespaces: a bridged "network", nodes, and pods per node.

Every namespace, pin directory and state file of a lab is named with the lab's id
(`zt<6 hex>`), so parallel runs and leftovers of killed runs never collide, and `teardown` /
`cleanup_all` find everything by that prefix. Hard rules (shared/PLATFORM.md): nothing is
added to the root network namespace, and no lab namespace has a route off the machine.

Addressing (lab-only, inside the lab's own namespaces):
  node i        10.77.0.(i+1)/24 on its uplink `eth0`, bridged in the network namespace;
  pods of node i 10.77.(i+1).0/24; pod j = 10.77.(i+1).(j+2)/32 on its `eth0`, default route
                via the node address (onlink); the node side of its veth is `vpod<j>`;
  node routes   /32 to each own pod via its veth, each other node's pod /24 via that node.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pyroute2 import netns as pyroute2_netns

from ztunnel.errors import ZtunnelError

T = TypeVar("T")

LAB_ID_RE = re.compile(r"^zt[0-9a-f]{6}$")
LAB_NETNS_RE = re.compile(r"^(zt[0-9a-f]{6})-")
STATE_DIR = Path("/run/ztunnel-lab")
# bpffs as seen by every lab process. `ip netns exec` mounts a fresh /sys for the command,
# which hides /sys/fs/bpf, so the host's bpffs is also bind-mounted here, outside /sys.
BPFFS_DIR = STATE_DIR / "bpf"
HOST_BPFFS = Path("/sys/fs/bpf")
NETNS_DIR = Path("/run/netns")

NODE_NETWORK = ipaddress.IPv4Network("10.77.0.0/24")
POD_SUPERNET = ipaddress.IPv4Network("10.77.0.0/16")
UPLINK_IFNAME = "eth0"
POD_IFNAME = "eth0"
BRIDGE_IFNAME = "br0"
MAX_NODES = 200
MAX_PODS_PER_NODE = 200
KILL_GRACE_SECONDS = 3.0


class LabError(ZtunnelError):
    """The lab could not be built, found or torn down."""


@dataclass(frozen=True, slots=True)
class PodSpec:
    """A pod: its own namespace with `ifname`, and `host_ifname` on its node's side."""

    name: str
    netns: str
    node: str
    ip: ipaddress.IPv4Address
    host_ifname: str
    ifname: str = POD_IFNAME


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """A node: a namespace with an uplink on the lab bridge, its pods and its bpffs pin dir."""

    name: str
    netns: str
    ip: ipaddress.IPv4Address
    pod_cidr: ipaddress.IPv4Network
    pin_dir: Path
    bridge_port: str
    pods: tuple[PodSpec, ...]
    uplink_ifname: str = UPLINK_IFNAME


@dataclass(frozen=True, slots=True)
class Topology:
    """A whole lab, as written to its state file."""

    lab_id: str
    network_netns: str
    nodes: tuple[NodeSpec, ...]
    bridge: str = BRIDGE_IFNAME

    @property
    def prefix(self) -> str:
        return f"{self.lab_id}-"

    @property
    def state_file(self) -> Path:
        return state_file(self.lab_id)

    def node(self, name: str) -> NodeSpec:
        for node in self.nodes:
            if name in (node.name, node.netns):
                return node
        raise LabError(f"lab {self.lab_id} has no node {name!r}")

    def pod(self, name: str) -> PodSpec:
        for pod in self.pods():
            if name in (pod.name, pod.netns):
                return pod
        raise LabError(f"lab {self.lab_id} has no pod {name!r}")

    def pods(self) -> tuple[PodSpec, ...]:
        return tuple(pod for node in self.nodes for pod in node.pods)

    def namespaces(self) -> tuple[str, ...]:
        names = [self.network_netns]
        for node in self.nodes:
            names.append(node.netns)
            names.extend(pod.netns for pod in node.pods)
        return tuple(names)

    def to_json(self) -> dict[str, Any]:
        return {
            "lab_id": self.lab_id,
            "network_netns": self.network_netns,
            "bridge": self.bridge,
            "nodes": [
                {
                    "name": n.name,
                    "netns": n.netns,
                    "ip": str(n.ip),
                    "pod_cidr": str(n.pod_cidr),
                    "pin_dir": str(n.pin_dir),
                    "bridge_port": n.bridge_port,
                    "uplink_ifname": n.uplink_ifname,
                    "pods": [
                        {
                            "name": p.name,
                            "netns": p.netns,
                            "node": p.node,
                            "ip": str(p.ip),
                            "host_ifname": p.host_ifname,
                            "ifname": p.ifname,
                        }
                        for p in n.pods
                    ],
                }
                for n in self.nodes
            ],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Topology:
        try:
            return cls(
                lab_id=str(data["lab_id"]),
                network_netns=str(data["network_netns"]),
                bridge=str(data["bridge"]),
                nodes=tuple(
                    NodeSpec(
                        name=str(n["name"]),
                        netns=str(n["netns"]),
                        ip=ipaddress.IPv4Address(n["ip"]),
                        pod_cidr=ipaddress.IPv4Network(n["pod_cidr"]),
                        pin_dir=Path(n["pin_dir"]),
                        bridge_port=str(n["bridge_port"]),
                        uplink_ifname=str(n["uplink_ifname"]),
                        pods=tuple(
                            PodSpec(
                                name=str(p["name"]),
                                netns=str(p["netns"]),
                                node=str(p["node"]),
                                ip=ipaddress.IPv4Address(p["ip"]),
                                host_ifname=str(p["host_ifname"]),
                                ifname=str(p["ifname"]),
                            )
                            for p in n["pods"]
                        ),
                    )
                    for n in data["nodes"]
                ),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise LabError(f"malformed lab state: {exc!r}") from exc


def new_lab_id() -> str:
    return "zt" + secrets.token_hex(3)


def lab_id_of(prefix: str) -> str:
    """Accepts a lab id (`zt1a2b3c`) or its prefix (`zt1a2b3c-`); refuses anything else,
    so that a typo can never select namespaces that are not the lab's."""
    lab_id = prefix[:-1] if prefix.endswith("-") else prefix
    if not LAB_ID_RE.match(lab_id):
        raise LabError(f"not a lab id or prefix: {prefix!r} (expected zt<6 hex>[-])")
    return lab_id


def state_file(lab_id: str) -> Path:
    return STATE_DIR / f"{lab_id}.json"


def plan(lab_id: str, nodes: int = 2, pods_per_node: int = 2) -> Topology:
    """The names and addresses of a lab, without touching the kernel."""
    lab_id_of(lab_id)
    if not 1 <= nodes <= MAX_NODES:
        raise LabError(f"nodes must be 1..{MAX_NODES}, got {nodes}")
    if not 0 <= pods_per_node <= MAX_PODS_PER_NODE:
        raise LabError(f"pods_per_node must be 0..{MAX_PODS_PER_NODE}, got {pods_per_node}")
    node_specs = []
    for i in range(nodes):
        name = f"n{i}"
        netns = f"{lab_id}-{name}"
        pod_cidr = ipaddress.IPv4Network(f"{POD_SUPERNET.network_address + (i + 1) * 256}/24")
        pods = tuple(
            PodSpec(
                name=f"{name}p{j}",
                netns=f"{netns}p{j}",
                node=name,
                ip=pod_cidr.network_address + j + 2,
                host_ifname=f"vpod{j}",
            )
            for j in range(pods_per_node)
        )
        node_specs.append(
            NodeSpec(
                name=name,
                netns=netns,
                ip=NODE_NETWORK.network_address + i + 1,
                pod_cidr=pod_cidr,
                pin_dir=BPFFS_DIR / netns,
                bridge_port=name,
                pods=pods,
            )
        )
    return Topology(lab_id=lab_id, network_netns=f"{lab_id}-net", nodes=tuple(node_specs))


# --- running things inside namespaces -------------------------------------------------------


def netns_exec_argv(netns: str, argv: Sequence[str]) -> list[str]:
    """`ip netns exec <netns> argv...`: the way the agent and lab processes are started."""
    return ["ip", "netns", "exec", netns, *argv]


def popen_in_netns(netns: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
    """Starts a process in a namespace; the caller owns it (wait/kill)."""
    return subprocess.Popen(netns_exec_argv(netns, argv), **kwargs)


def run_in_netns(
    netns: str, argv: Sequence[str], timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """Runs a command in a namespace to completion; raises LabError if it fails."""
    return _run(netns_exec_argv(netns, argv), timeout=timeout)


def call_in_netns(netns: str, fn: Callable[[], T]) -> T:
    """Calls `fn` on a fresh thread that has entered the namespace, and returns its result.

    setns(2) moves only the calling thread, so the caller's thread never changes namespace.
    Sockets created by `fn` stay in that namespace and can be used from any thread.
    """
    result: list[T] = []
    failure: list[BaseException] = []

    def worker() -> None:
        try:
            pyroute2_netns.setns(netns, flags=0)  # flags=0: never create it
            result.append(fn())
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=worker, name=f"netns:{netns}", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def write_sysctls(netns: str, values: dict[str, str]) -> None:
    """Sets per-namespace sysctls (net.*) inside `netns`; missing keys (no IPv6) are skipped."""

    def write() -> None:
        for key, value in values.items():
            path = Path("/proc/sys") / key.replace(".", "/")
            if path.exists():
                path.write_text(value)

    call_in_netns(netns, write)


# --- building and tearing down --------------------------------------------------------------


def _run(
    argv: Sequence[str], timeout: float = 30.0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, check=False, env=env
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LabError(f"{' '.join(argv)}: {exc}") from exc
    if done.returncode != 0:
        raise LabError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()}")
    return done


def _ip(netns: str, command: str) -> None:
    """`ip -n <netns> <command>`; lab names and addresses never contain spaces."""
    _run(["ip", "-n", netns, *command.split()])


def _mount_fstype(mount_point: Path) -> str | None:
    """The file system type mounted exactly at `mount_point` (topmost mount), or None."""
    target = str(mount_point)
    fstype = None
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            sep = fields.index("-")
            if fields[4] == target:
                fstype = fields[sep + 1]
    return fstype


def ensure_lab_bpffs() -> Path:
    """Makes sure the host bpffs is mounted and visible at BPFFS_DIR; returns BPFFS_DIR.

    Mounting bpffs on /sys/fs/bpf is what systemd does at boot; the bind mount makes the
    same bpffs visible to processes started with `ip netns exec`, so an agent's pins outlive
    the agent. Both are idempotent and shared by all labs; nothing network-related changes.
    """
    if _mount_fstype(HOST_BPFFS) != "bpf":
        _run(["mount", "-t", "bpf", "bpf", str(HOST_BPFFS)])
    if _mount_fstype(BPFFS_DIR) != "bpf":
        BPFFS_DIR.mkdir(parents=True, exist_ok=True)
        _run(["mount", "--bind", str(HOST_BPFFS), str(BPFFS_DIR)])
    return BPFFS_DIR


def list_netns() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def _require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces, bpffs, tc)")


def create(nodes: int = 2, pods_per_node: int = 2, lab_id: str | None = None) -> Topology:
    """Builds a lab and writes its state file; on any failure, removes what was built."""
    _require_root()
    topo = plan(lab_id or new_lab_id(), nodes, pods_per_node)
    if any(ns.startswith(topo.prefix) for ns in list_netns()):
        raise LabError(f"lab {topo.lab_id} exists already")
    ensure_lab_bpffs()
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    try:
        _build(topo)
        tmp = topo.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(topo.to_json(), indent=2) + "\n")
        tmp.replace(topo.state_file)
    except BaseException:
        teardown(topo.prefix)
        raise
    return topo


# Quiet, deterministic namespaces: IPv4 only, and IPv4 settings not inherited from the host.
_BASE_SYSCTLS = {
    "net.ipv6.conf.all.disable_ipv6": "1",
    "net.ipv6.conf.default.disable_ipv6": "1",
}
_NODE_SYSCTLS = {
    **_BASE_SYSCTLS,
    "net.ipv4.ip_forward": "1",
    "net.ipv4.conf.all.rp_filter": "0",
    "net.ipv4.conf.default.rp_filter": "0",
}


def _add_netns(name: str, sysctls: dict[str, str]) -> None:
    _run(["ip", "netns", "add", name])
    write_sysctls(name, sysctls)
    _ip(name, "link set lo up")


def _build(topo: Topology) -> None:
    net = topo.network_netns
    _add_netns(net, _BASE_SYSCTLS)
    _ip(net, f"link add name {topo.bridge} type bridge")
    _ip(net, f"link set {topo.bridge} up")
    for node in topo.nodes:
        _add_netns(node.netns, _NODE_SYSCTLS)
        # Veths are created inside a lab namespace with the peer moved straight into the
        # other one: no interface ever exists in the root namespace, not even briefly.
        uplink = node.uplink_ifname
        _ip(
            net, f"link add name {node.bridge_port} type veth peer name {uplink} netns {node.netns}"
        )
        _ip(net, f"link set {node.bridge_port} master {topo.bridge} up")
        build_node(topo, node)


def build_node(topo: Topology, node: NodeSpec) -> None:
    """Addresses the node's uplink (already in its namespace), makes its pods and the routes
    to the other nodes' pods (also used by `ztunnel.lab.machines`, whose uplink is a NIC)."""
    uplink = node.uplink_ifname
    _ip(node.netns, f"addr add {node.ip}/{NODE_NETWORK.prefixlen} dev {uplink}")
    _ip(node.netns, f"link set {uplink} up")
    for pod in node.pods:
        _add_netns(pod.netns, _BASE_SYSCTLS)
        host = pod.host_ifname
        _ip(node.netns, f"link add name {host} type veth peer name {pod.ifname} netns {pod.netns}")
        _ip(node.netns, f"link set {host} up")
        _ip(pod.netns, f"addr add {pod.ip}/32 dev {pod.ifname}")
        _ip(pod.netns, f"link set {pod.ifname} up")
        # The node address answers ARP on the veth (arp_ignore=0), so it is the gateway.
        _ip(pod.netns, f"route add default via {node.ip} dev {pod.ifname} onlink")
        _ip(node.netns, f"route add {pod.ip}/32 dev {host}")
    for other in topo.nodes:
        if other is not node:
            _ip(node.netns, f"route add {other.pod_cidr} via {other.ip} dev {uplink}")


def load(lab_id: str) -> Topology:
    """Reads a lab's state file (written by `create`)."""
    path = state_file(lab_id_of(lab_id))
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise LabError(f"no lab {lab_id} (no {path})") from None
    except (OSError, ValueError) as exc:
        raise LabError(f"reading {path}: {exc}") from exc
    return Topology.from_json(data)


def list_labs() -> list[str]:
    """Ids of every lab with anything left: namespaces, pins or a state file."""
    ids = {m.group(1) for ns in list_netns() if (m := LAB_NETNS_RE.match(ns))}
    for directory in (BPFFS_DIR, HOST_BPFFS):
        if _mount_fstype(directory) == "bpf":
            ids.update(m.group(1) for e in os.listdir(directory) if (m := LAB_NETNS_RE.match(e)))
    if STATE_DIR.is_dir():
        ids.update(p.stem for p in STATE_DIR.glob("*.json") if LAB_ID_RE.match(p.stem))
    return sorted(ids)


def _netns_pids(netns: str) -> list[int]:
    try:
        out = _run(["ip", "netns", "pids", netns]).stdout
    except LabError:
        return []
    return [int(tok) for tok in out.split() if tok.isdigit() and int(tok) != os.getpid()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purpose (its parent will reap it).
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _stop_processes(pids: list[int]) -> None:
    """SIGTERM the lab's own processes (found in its namespaces), SIGKILL after a grace time."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + KILL_GRACE_SECONDS
        while time.monotonic() < deadline:
            pids = [pid for pid in pids if _alive(pid)]
            if not pids:
                return
            time.sleep(0.02)


def teardown(prefix: str) -> None:
    """Deletes every namespace, pin directory and the state file of one lab (by id/prefix).

    Processes still running in the lab's namespaces are stopped first, because a namespace
    with a process in it outlives `ip netns del`. Tries everything, then reports failures.
    """
    _require_root()
    lab_prefix = lab_id_of(prefix) + "-"
    errors: list[str] = []
    namespaces = [ns for ns in list_netns() if ns.startswith(lab_prefix)]
    pids = sorted({pid for ns in namespaces for pid in _netns_pids(ns)})
    if pids:
        _stop_processes(pids)
    for ns in namespaces:
        try:
            _run(["ip", "netns", "del", ns])
        except LabError as exc:
            errors.append(str(exc))
    for directory in (BPFFS_DIR, HOST_BPFFS):
        if _mount_fstype(directory) != "bpf":
            continue
        for entry in os.listdir(directory):
            if entry.startswith(lab_prefix):
                try:
                    shutil.rmtree(directory / entry)
                except FileNotFoundError:
                    pass  # the same bpffs seen through the other mount
                except OSError as exc:
                    errors.append(f"removing pins {directory / entry}: {exc}")
    try:
        state_file(lab_prefix[:-1]).unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        errors.append(f"removing state file: {exc}")
    if errors:
        raise LabError("teardown incomplete: " + "; ".join(errors))


def cleanup_all() -> list[str]:
    """Tears down every lab on the machine (leftovers of killed runs too); returns their ids.

    Also removes labs that are in use by a parallel run: for `lab down`, not for tests.
    """
    removed = []
    errors = []
    for lab_id in list_labs():
        try:
            teardown(lab_id)
            removed.append(lab_id)
        except LabError as exc:
            errors.append(str(exc))
    if errors:
        raise LabError("; ".join(errors))
    return removed


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    """Polls `predicate` until it is true or `timeout` seconds pass; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
