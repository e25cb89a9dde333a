"""A lab spread over machines: each machine runs one node of the lab with its pods, and HBONE
crosses a real network between them (the two Vagrant VMs' private network) instead of the lab
bridge.

`ztunnel lab machine up --index K --machines M --device DEV --ca-dir DIR` builds on this
machine only node n<K> of the M-node lab (the same plan everywhere: node i is 10.77.0.(i+1),
its pods 10.77.(i+1).0/24), moves the network device DEV (a name, or an IPv4 address it
carries) into the node's namespace as its uplink, and starts the node's agent with the mesh
state of the whole lab and the CA in DIR, which all machines share. It starts the pods'
applications and enrols them. `lab machine demo` does the same, then sends every kind of flow
from this machine's pods to the other machine's and summarises what this machine observed.
`ztunnel lab down --lab ID` removes it; the device returns to the machine when the node's
namespace goes (a physical NIC does; a veth, as in the tests, goes with it).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import re
from pathlib import Path

import yaml

from ztunnel.ca import CertificateAuthority
from ztunnel.capture.config import validate_ifname
from ztunnel.errors import ZtunnelError
from ztunnel.lab import runner
from ztunnel.lab import topology as topo
from ztunnel.lab.demo import Flow
from ztunnel.lab.topology import LabError, NodeSpec, Topology

MAX_MACHINES = 16


def _ip_list(what: str, netns: str | None) -> str:
    """`ip -o link` or `ip -o addr` (one line per entry), here or in `netns`."""
    where = [] if netns is None else ["-n", netns]
    return topo._run(["ip", *where, "-o", what]).stdout


def resolve_device(device: str, netns: str | None = None) -> str:
    """The interface name for `device`: a name, or an IPv4 address an interface carries."""
    try:
        address = ipaddress.IPv4Address(device)
    except ValueError:
        validate_ifname("lab machine", "device", device)
        links = _ip_list("link", netns)
        if not re.search(rf"^\d+: {re.escape(device)}[@:]", links, re.MULTILINE):
            raise LabError(f"no network device {device} here (`ip link` lists them)") from None
        return device
    for line in _ip_list("addr", netns).splitlines():
        m = re.match(r"\d+: (\S+)\s+inet (\S+)/", line)
        if m and ipaddress.IPv4Address(m[2]) == address:
            return m[1]
    raise LabError(f"no network device carries {address} here (`ip -4 addr` lists them)")


def plan(index: int, machines: int, pods: int, device: str, lab_id: str | None = None) -> Topology:
    """The whole lab's plan, with this machine's node using `device` as its uplink."""
    if not 2 <= machines <= MAX_MACHINES:
        raise LabError(f"machines must be 2..{MAX_MACHINES}, got {machines}")
    if not 0 <= index < machines:
        raise LabError(f"index must be 0..{machines - 1}, got {index}")
    full = topo.plan(lab_id or topo.new_lab_id(), machines, pods)
    local = dataclasses.replace(full.nodes[index], uplink_ifname=device)
    nodes = tuple(local if i == index else n for i, n in enumerate(full.nodes))
    return dataclasses.replace(full, nodes=nodes)


def build(t: Topology, index: int, device_netns: str | None = None) -> None:
    """Creates this machine's node and pods; on failure removes what it made."""
    topo._require_root()
    node = t.nodes[index]
    if any(ns.startswith(t.prefix) for ns in topo.list_netns()):
        raise LabError(f"lab {t.lab_id} exists already")
    topo.ensure_lab_bpffs()
    topo.STATE_DIR.mkdir(parents=True, exist_ok=True)
    try:
        topo._add_netns(node.netns, topo._NODE_SYSCTLS)
        move = f"link set dev {node.uplink_ifname} netns {node.netns}"
        if device_netns is None:
            topo._run(["ip", *move.split()])
        else:
            topo._ip(device_netns, move)
        topo.build_node(t, node)
        tmp = t.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(t.to_json(), indent=2) + "\n")
        tmp.replace(t.state_file)
    except BaseException:
        topo.teardown(t.prefix)
        raise


def up(
    index: int,
    machines: int,
    pods: int,
    device: str,
    ca_dir: Path,
    device_netns: str | None = None,
    progress: runner.Progress = runner._quiet,
) -> Topology:
    """Builds this machine's share of the lab and starts its agent, applications, enrolment."""
    if pods < 3:
        raise LabError("the machine lab needs at least 3 pods per node (client, echo, legacy)")
    try:
        ca = CertificateAuthority.load(ca_dir)
    except ZtunnelError as exc:
        raise LabError(f"the machines' shared CA in {ca_dir}: {exc}") from exc
    name = resolve_device(device, device_netns)
    t = plan(index, machines, pods, name)
    node = t.nodes[index]
    progress(f"node {node.name} ({node.ip}) with {pods} pods, uplink {name} (moved in)")
    build(t, index, device_netns)
    try:
        d = runner.lab_dir(t.lab_id)
        d.mkdir(parents=True, exist_ok=True)
        ca.save(d / "ca")
        (d / "mesh.yaml").write_text(yaml.safe_dump(runner.mesh_state(t), sort_keys=False))
        for pod in node.pods:
            runner.start_apps(t, pod)
        progress("starting the node agent (compiles and attaches the BPF programs)")
        runner.start_agent(t, node)
        runner.wait_agent(t, node)
        for pod in node.pods:
            runner.add_pod(t, pod, runner.role_of(pod).enrolled)
    except BaseException:
        runner.down(t.lab_id)
        raise
    return t


def flows(t: Topology, local: NodeSpec) -> list[Flow]:
    """Every kind of flow that starts on this machine; "other" is the next machine's node."""
    other = t.nodes[(t.nodes.index(local) + 1) % len(t.nodes)]
    client, echo, legacy = local.pods[0], local.pods[1], local.pods[2]
    far_echo, far_legacy = other.pods[1], other.pods[2]
    return [
        Flow("enrolled -> enrolled, other machine", client.name, str(far_echo.ip), 8080, "ok"),
        Flow("enrolled -> enrolled, same machine", client.name, str(echo.ip), 8080, "ok"),
        Flow("enrolled -> service VIP", client.name, runner.SERVICE_VIP, 80, "ok"),
        Flow("enrolled -> not enrolled, other", client.name, str(far_legacy.ip), 8080, "ok"),
        Flow("not enrolled -> enrolled, other", legacy.name, str(far_echo.ip), 8080, "ok"),
        Flow("node -> enrolled pod (probe)", f"node:{local.name}", str(echo.ip), 8080, "ok"),
        Flow("enrolled -> denied port 9090, other", client.name, str(far_echo.ip), 9090, "denied"),
    ]


def local_node(t: Topology) -> NodeSpec:
    """The node of `t` that lives on this machine (the one whose namespace exists here)."""
    here = set(topo.list_netns())
    found = [n for n in t.nodes if n.netns in here]
    if len(found) != 1:
        raise LabError(f"lab {t.lab_id} has {len(found)} nodes on this machine, expected one")
    return found[0]
