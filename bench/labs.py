"""The labs of a benchmark run, all with the same shape (2 nodes x 2 pods; p0 the client, p1
the server) so that every scenario crosses the same veths and bridge:

* `base`: no agents, no capture: the direct baseline, and a pair of stunnel processes on the
  nodes (client side on node 0, server side on node 1), like node agents would be;
* `ebpf`: our agents with `--capture ebpf`, both pods of each node enrolled;
* `tproxy`: our agents with `--capture tproxy`, the node's nftables TPROXY rules and
  local-delivery route installed here (the iptables-style capture that eBPF replaces).

Each lab is built with `ztunnel.lab` (its namespaces, CA, mesh state and agent start-up) and
removed with `runner.down`, which stops every process left in its namespaces.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from bench import tools
from bench.tools import BenchError, LoadGen, Processes, StunnelService
from ztunnel.app import TPROXY_LOCAL_MARK
from ztunnel.ca import CertificateAuthority, write_workload_files
from ztunnel.identity import SpiffeId
from ztunnel.lab import runner
from ztunnel.lab import topology as topo
from ztunnel.lab.topology import NodeSpec, PodSpec, Topology

RR_PORT = 7000
IPERF_PORT = 5201
# stunnel: client side accepts on node 0 (per service), server side on node 1.
STUNNEL_ACCEPT = {"rr": 4444, "iperf": 4443}
STUNNEL_PEER = {"rr": 4434, "iperf": 4433}
# The tproxy lab's local-delivery route table (the lab has no eBPF capture to share it with).
TPROXY_ROUTE_TABLE = 100

# Per-namespace settings for load: a wide ephemeral port range and TIME_WAIT reuse (the
# connection-rate tests open tens of thousands of connections), deeper SYN queues.
LOAD_SYSCTLS = {
    "net.ipv4.ip_local_port_range": "10000 65000",
    "net.ipv4.tcp_tw_reuse": "1",
    "net.ipv4.tcp_max_syn_backlog": "8192",
    "net.core.somaxconn": "8192",
}


@dataclass
class BenchLab:
    name: str
    capture: str | None  # None: no agents
    event_loop: str
    topology: Topology
    workdir: Path
    workers: int = 1  # worker processes per agent (ztunnel run --workers)
    processes: Processes = field(default_factory=Processes)
    agents: dict[str, int] = field(default_factory=dict)  # node name -> agent pid
    stunnel: dict[str, int] = field(default_factory=dict)  # "client"/"server" -> pid

    @property
    def nodes(self) -> tuple[NodeSpec, NodeSpec]:
        return self.topology.nodes[0], self.topology.nodes[1]

    def client(self) -> PodSpec:
        return self.topology.pod(f"{self.nodes[0].name}p0")

    def server(self, same_node: bool) -> PodSpec:
        node = self.nodes[0] if same_node else self.nodes[1]
        return self.topology.pod(f"{node.name}p1")

    def save_logs(self, into: Path) -> None:
        """Copies the agents' logs out of the lab directory (which `close` removes)."""
        into.mkdir(parents=True, exist_ok=True)
        for node in self.topology.nodes:
            log = runner.lab_dir(self.topology.lab_id) / node.name / "agent.log"
            if log.exists():
                shutil.copyfile(log, into / f"{self.name}-{node.name}-agent.log")
        for log in self.workdir.glob("*.log"):
            shutil.copyfile(log, into / f"{self.name}-{log.name}")

    def close(self) -> None:
        try:
            self.processes.stop_all()
        finally:
            runner.down(self.topology.lab_id)


def _start_agent(
    t: Topology, node: NodeSpec, capture: str, event_loop: str, workers: int = 1
) -> int:
    """runner.start_agent with our capture mode, event loop and worker processes (same files,
    same pid file)."""
    argv = runner.agent_argv(t, node)
    argv[argv.index("--capture") + 1] = capture
    argv += ["--event-loop", event_loop, "--workers", str(workers)]
    nd = runner.lab_dir(t.lab_id) / node.name
    nd.mkdir(parents=True, exist_ok=True)
    with open(nd / "agent.log", "ab") as log:
        proc = topo.popen_in_netns(
            node.netns,
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    (nd / "agent.pid").write_text(str(proc.pid))
    return proc.pid


def _install_tproxy(lab: BenchLab, node: NodeSpec) -> None:
    ruleset = tools.tproxy_ruleset(
        table="ztbench_capture",
        pod_ifnames=[p.host_ifname for p in node.pods],
        pod_ips=[str(p.ip) for p in node.pods],
        node_ips=[str(node.ip)],
        uplink=node.uplink_ifname,
        mark=TPROXY_LOCAL_MARK,
    )
    tools.install_tproxy(
        node.netns,
        ruleset,
        lab.workdir / f"tproxy-{node.name}.nft",
        TPROXY_LOCAL_MARK,
        TPROXY_ROUTE_TABLE,
    )


def _start_servers(lab: BenchLab, loadgen: LoadGen) -> None:
    for same in (True, False):
        pod = lab.server(same)
        lab.processes.start(
            pod.netns, loadgen.server_argv(RR_PORT), lab.workdir / f"loadgen-{pod.name}.log"
        )
        lab.processes.start(
            pod.netns, tools.iperf3_server_argv(IPERF_PORT), lab.workdir / f"iperf3-{pod.name}.log"
        )
    for same in (True, False):
        pod = lab.server(same)
        for port in (RR_PORT, IPERF_PORT):
            tools.wait_port(pod.netns, str(pod.ip), port)


def _start_stunnel(lab: BenchLab) -> None:
    """Client-side stunnel on node 0, server-side on node 1, certificates from our CA."""
    n0, n1 = lab.nodes
    server_pod = lab.server(False)
    ca = CertificateAuthority.create("cluster.local")
    sides = {
        "client": (
            n0,
            [
                StunnelService(k, f"{n0.ip}:{STUNNEL_ACCEPT[k]}", f"{n1.ip}:{STUNNEL_PEER[k]}")
                for k in STUNNEL_ACCEPT
            ],
        ),
        "server": (
            n1,
            [
                StunnelService(
                    k,
                    f"{n1.ip}:{STUNNEL_PEER[k]}",
                    f"{server_pod.ip}:{RR_PORT if k == 'rr' else IPERF_PORT}",
                )
                for k in STUNNEL_ACCEPT
            ],
        ),
    }
    for side, (node, services) in sides.items():
        cert_dir = lab.workdir / f"stunnel-{side}"
        write_workload_files(
            ca.issue(SpiffeId.parse(f"spiffe://cluster.local/ns/bench/sa/stunnel-{side}")), cert_dir
        )
        conf = lab.workdir / f"stunnel-{side}.conf"
        conf.write_text(
            tools.stunnel_config(
                side == "client", services, cert_dir, lab.workdir / f"stunnel-{side}.log"
            )
        )
        proc = lab.processes.start(
            node.netns, ["stunnel", str(conf)], lab.workdir / f"stunnel-{side}.out"
        )
        lab.stunnel[side] = proc.pid
    for port in STUNNEL_ACCEPT.values():
        tools.wait_port(lab.client().netns, str(n0.ip), port)


def build(
    name: str,
    capture: str | None,
    event_loop: str,
    loadgen: LoadGen,
    progress: runner.Progress,
    failure_logs: Path,
    workers: int = 1,
) -> BenchLab:
    """A fresh lab with servers running (and agents, stunnel or rules as its kind needs)."""
    t = topo.create(2, 2)
    workdir = runner.lab_dir(t.lab_id) / "bench"
    lab = BenchLab(name, capture, event_loop, t, workdir, workers=workers)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        for ns in [t.network_netns, *(n.netns for n in t.nodes), *(p.netns for p in t.pods())]:
            topo.write_sysctls(ns, LOAD_SYSCTLS)
        if capture is not None:
            d = runner.lab_dir(t.lab_id)
            CertificateAuthority.create("cluster.local").save(d / "ca")
            (d / "mesh.yaml").write_text(yaml.safe_dump(runner.mesh_state(t), sort_keys=False))
            for node in t.nodes:
                lab.agents[node.name] = _start_agent(t, node, capture, event_loop, workers)
            for node in t.nodes:
                runner.wait_agent(t, node)
            if capture == "ebpf":
                for pod in t.pods():
                    runner.add_pod(t, pod, True)
            elif capture == "tproxy":
                for node in t.nodes:
                    _install_tproxy(lab, node)
            else:
                raise BenchError(f"unknown capture mode {capture!r}")
        _start_servers(lab, loadgen)
        if capture is None:
            _start_stunnel(lab)
        progress(
            f"lab {name} ({t.lab_id}) is up"
            + (
                f": agents {capture}/{event_loop}/{workers} worker(s), pids "
                + ", ".join(f"{k}={v}" for k, v in lab.agents.items())
                if capture
                else ": no mesh; stunnel pids "
                + ", ".join(f"{k}={v}" for k, v in lab.stunnel.items())
            )
        )
    except BaseException:
        with contextlib.suppress(Exception):
            lab.save_logs(failure_logs / f"failed-{name}-{t.lab_id}")
        lab.close()
        raise
    return lab
