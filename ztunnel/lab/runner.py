"""`ztunnel lab up|demo|status|down`: the whole mesh on one machine, in network namespaces.

`up` builds the topology (`ztunnel.lab.topology`), writes a CA and the mesh state, starts one
agent per node inside the node's namespace with eBPF capture, starts echo applications in the
pods and enrols the ambient ones through each agent's enrolment socket. `demo` sends real
traffic for every kind of flow and prints what the applications and agents observed. Pod
roles: p0 client (frontend/web, enrolled), p1 echo (shop/echo, enrolled, behind the service
VIP), p2 legacy (legacy/default, NOT enrolled), further pods more echo backends.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ztunnel.ca import CertificateAuthority
from ztunnel.enrolment import EnrolmentError, request
from ztunnel.lab import image as lab_image
from ztunnel.lab import istiod_lab
from ztunnel.lab import topology as topo
from ztunnel.lab.topology import LabError, NodeSpec, PodSpec, Topology

SERVICE_VIP = "10.96.0.10"
SERVICE_HOST = "echo.shop.svc.cluster.local"
APP_PORTS = (8080, 9090)
ADMIN_PORT, STATS_PORT, READY_PORT = 15000, 15020, 15021
AGENT_START_TIMEOUT = 60.0

Progress = Callable[[str], None]


def _quiet(_msg: str) -> None:
    pass


@dataclass(frozen=True)
class Role:
    namespace: str
    service_account: str
    enrolled: bool
    app: str


def role_of(pod: PodSpec) -> Role:
    j = int(pod.name.rsplit("p", 1)[1])
    if j == 0:
        return Role("frontend", "web", True, "client")
    if j == 2:
        return Role("legacy", "default", False, "legacy")
    return Role("shop", "echo", True, "echo")


def lab_dir(lab_id: str) -> Path:
    return topo.STATE_DIR / lab_id


def mesh_state(t: Topology) -> dict[str, Any]:
    workloads = []
    for node in t.nodes:
        for pod in node.pods:
            r = role_of(pod)
            services = {f"shop/{SERVICE_HOST}": {80: 8080}} if r.app == "echo" else {}
            workloads.append(
                {
                    "uid": f"Kubernetes//Pod/{r.namespace}/{pod.name}",
                    "name": pod.name,
                    "namespace": r.namespace,
                    "serviceAccount": r.service_account,
                    "workloadIps": [str(pod.ip)],
                    "node": node.name,
                    # Pods outside the ambient mesh are plain TCP workloads, as istiod reports them.
                    "protocol": "HBONE" if r.enrolled else "TCP",
                    "canonicalName": r.app,
                    "canonicalRevision": "v1",
                    "services": services,
                    "labels": {"app": r.app},
                }
            )
    return {
        "workloads": workloads,
        "services": [
            {
                "name": "echo",
                "namespace": "shop",
                "hostname": SERVICE_HOST,
                "vips": [SERVICE_VIP],
                "ports": {80: 8080},
            }
        ],
        "policies": [
            {
                "name": "deny-admin-port",
                "namespace": "shop",
                "scope": "Namespace",
                "action": "Deny",
                "rules": [[[{"destinationPorts": [9090]}]]],
            }
        ],
    }


def extra_agent_args(t: Topology) -> list[str]:
    """Flags `up(agent_args=...)` gave every agent of the lab (kept for restarts)."""
    path = lab_dir(t.lab_id) / "agent-args.json"
    try:
        args = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return [str(a) for a in args] if isinstance(args, list) else []


def agent_argv(t: Topology, node: NodeSpec) -> list[str]:
    return [sys.executable, "-m", "ztunnel", *run_args(t, node)]


def run_args(t: Topology, node: NodeSpec) -> list[str]:
    """The agent's command line after `ztunnel` (the same from the venv and in the image)."""
    d = lab_dir(t.lab_id)
    nd = d / node.name
    return [
        "run",
        "--capture",
        "ebpf",
        "--node-name",
        node.name,
        "--node-ip",
        str(node.ip),
        "--uplink",
        node.uplink_ifname,
        "--bpf-pin-dir",
        str(node.pin_dir),
        # Mesh state and certificates: the file and the local CA, or the test istiod.
        *(
            istiod_lab.agent_args(t, node)
            or ["--local-xds", str(d / "mesh.yaml"), "--ca-dir", str(d / "ca")]
        ),
        "--enrolment-socket",
        str(nd / "ztunnel.sock"),
        "--state-dir",
        str(nd),
        "--log-format",
        "json",
        "--socks5-port",
        "0",
        "--admin-port",
        str(ADMIN_PORT),
        "--stats-port",
        str(STATS_PORT),
        "--readiness-port",
        str(READY_PORT),
        "--drain-timeout",
        "2",
        *extra_agent_args(t),
    ]


def _http_in(netns: str, port: int, path: str, timeout: float = 2.0) -> tuple[int, str]:
    def get() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
                return int(r.status), r.read().decode()
        except urllib.error.HTTPError as e:
            return int(e.code), e.read().decode()
        except OSError as e:
            return 0, str(e)

    return topo.call_in_netns(netns, get)


def agent_ready(node: NodeSpec) -> tuple[bool, str]:
    code, body = _http_in(node.netns, READY_PORT, "/healthz/ready")
    return code == 200, body.strip()


def start_agent(t: Topology, node: NodeSpec, extra_args: Sequence[str] = ()) -> int:
    nd = lab_dir(t.lab_id) / node.name
    nd.mkdir(parents=True, exist_ok=True)
    log = open(nd / "agent.log", "ab")  # noqa: SIM115 - handed to the child
    io: dict[str, Any] = {
        "stdout": log,
        "stderr": subprocess.STDOUT,
        "stdin": subprocess.DEVNULL,
        "start_new_session": True,
    }
    image = lab_image.load(t.lab_id)
    if image is None:
        proc = topo.popen_in_netns(node.netns, [*agent_argv(t, node), *extra_args], **io)
    else:
        args = [*run_args(t, node), *extra_args]
        proc = lab_image.start_agent(t.lab_id, node, image, args, **io)
    log.close()
    (nd / "agent.pid").write_text(str(proc.pid))
    return proc.pid


def wait_agent(t: Topology, node: NodeSpec, timeout: float = AGENT_START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    pid = int((lab_dir(t.lab_id) / node.name / "agent.pid").read_text())
    detail = ""
    while time.monotonic() < deadline:
        if not _alive(pid):
            raise LabError(
                f"agent of {node.name} exited; see {lab_dir(t.lab_id) / node.name}/agent.log:\n"
                + _tail(lab_dir(t.lab_id) / node.name / "agent.log")
            )
        ok, detail = agent_ready(node)
        if ok:
            return
        time.sleep(0.1)
    raise LabError(f"agent of {node.name} not ready after {timeout:.0f}s: {detail}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.split(") ", 1)[1][0] != "Z"
    return True


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def stop_agent(t: Topology, node: NodeSpec, timeout: float = 10.0) -> None:
    pidf = lab_dir(t.lab_id) / node.name / "agent.pid"
    try:
        pid = int(pidf.read_text())
    except (OSError, ValueError):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, 15)
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, 9)
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)
    if lab_image.load(t.lab_id) is not None:
        lab_image.remove_agent(t.lab_id, node.name)  # gone already unless podman was killed


def start_apps(t: Topology, pod: PodSpec) -> None:
    d = lab_dir(t.lab_id) / "apps"
    d.mkdir(parents=True, exist_ok=True)
    log = open(d / f"{pod.name}.log", "ab")  # noqa: SIM115 - handed to the child
    topo.popen_in_netns(
        pod.netns,
        [
            sys.executable,
            "-m",
            "ztunnel.lab.apps",
            "serve",
            "--name",
            pod.name,
            "--ports",
            ",".join(str(p) for p in APP_PORTS),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    log.close()


def enrolment_socket(t: Topology, node: NodeSpec) -> str:
    return str(lab_dir(t.lab_id) / node.name / "ztunnel.sock")


def add_pod(t: Topology, pod: PodSpec, enrol: bool) -> None:
    node = t.node(pod.node)
    r = role_of(pod)
    request(
        enrolment_socket(t, node),
        {
            "op": "add_pod",
            "namespace": r.namespace,
            "name": pod.name,
            "ifname": pod.host_ifname,
            "ips": [str(pod.ip)],
            "enrol": enrol,
        },
    )


def set_enrolled(t: Topology, pod: PodSpec, enrolled: bool) -> None:
    """Enrol or unenrol one pod (idempotent)."""
    if enrolled:
        add_pod(t, pod, True)
    else:
        r = role_of(pod)
        request(
            enrolment_socket(t, t.node(pod.node)),
            {"op": "unenrol", "namespace": r.namespace, "name": pod.name},
        )


def up(
    nodes: int = 2,
    pods: int = 3,
    progress: Progress = _quiet,
    istiod: bool = False,
    agent_args: tuple[str, ...] = (),
    before_agents: Callable[[Topology], None] | None = None,
    image: lab_image.ImageOptions | None = None,
) -> Topology:
    """Builds and starts a lab. `agent_args` are extra `ztunnel run` flags for every agent;
    `before_agents` runs once the namespaces exist, before any agent starts (e.g. to put
    another component's programs on the hooks first); given `image`, the agents run from the
    OCI image with podman instead of the venv."""
    if nodes < 1 or pods < 1:
        raise LabError("a lab needs at least one node and one pod per node")
    progress(f"creating {nodes} nodes x {pods} pods (network namespaces, veths, bridge)")
    t = topo.create(nodes, pods)
    try:
        d = lab_dir(t.lab_id)
        d.mkdir(parents=True, exist_ok=True)
        CertificateAuthority.create("cluster.local").save(d / "ca")
        (d / "mesh.yaml").write_text(yaml.safe_dump(mesh_state(t), sort_keys=False))
        if image is not None:
            lab_image.save(t.lab_id, image)
        if istiod:
            progress("starting the test istiod in the lab network (xDS + CA on :15012)")
            istiod_lab.start(t)
        (d / "agent-args.json").write_text(json.dumps(list(agent_args)))
        if before_agents is not None:
            before_agents(t)
        progress("starting applications in pods")
        for pod in t.pods():
            start_apps(t, pod)
        progress(
            "starting one node agent per node (compiles and attaches the BPF programs)"
            + (f", from image {image.image}" if image else "")
        )
        for node in t.nodes:
            start_agent(t, node)
        for node in t.nodes:
            wait_agent(t, node)
        progress("enrolling ambient pods")
        for pod in t.pods():
            add_pod(t, pod, role_of(pod).enrolled)
    except BaseException:
        down(t.lab_id)
        raise
    return t


def down(lab_id: str | None = None) -> list[str]:
    """Tear one lab down, or every lab (also leftovers of killed runs) when no id is given."""
    if lab_id is None:
        lab_image.remove_lab_containers(None)
        removed = topo.cleanup_all()
        for p in topo.STATE_DIR.glob("zt??????"):
            if p.is_dir() and topo.LAB_ID_RE.match(p.name):
                subprocess.run(["rm", "-rf", str(p)], check=False)
        return removed
    with contextlib.suppress(LabError):
        t = topo.load(lab_id)
        for node in t.nodes:
            stop_agent(t, node)
    lab_image.remove_lab_containers(lab_id)
    topo.teardown(f"{lab_id}-")
    subprocess.run(["rm", "-rf", str(lab_dir(lab_id))], check=False)
    return [lab_id]


def current_lab() -> Topology:
    labs = topo.list_labs()
    if not labs:
        raise LabError("no lab is up (run `ztunnel lab up`)")
    return topo.load(labs[-1])


# ---- observation --------------------------------------------------------------------------


def call_from(netns: str, ip: str, port: int, marker: str, timeout: float = 3.0) -> dict[str, Any]:
    argv = topo.netns_exec_argv(
        netns,
        [
            sys.executable,
            "-m",
            "ztunnel.lab.apps",
            "call",
            ip,
            str(port),
            "--marker",
            marker,
            "--timeout",
            str(timeout),
        ],
    )
    try:
        res = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout + 20, check=False
        )
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": "client did not finish"}
    try:
        out: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        out = {"ok": False, "error": (res.stderr or res.stdout).strip()[-200:]}
    return out


def access_lines(t: Topology, node: NodeSpec, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """The access-log records an agent wrote after byte `offset`, and the new offset."""
    path = lab_dir(t.lab_id) / node.name / "agent.log"
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return [], offset
    out = []
    for line in data.splitlines():
        with contextlib.suppress(ValueError):
            rec = json.loads(line)
            if isinstance(rec, dict) and rec.get("message") == "connection complete":
                out.append(rec)
    return out, offset + len(data)


def metrics_totals(node: NodeSpec) -> dict[str, float]:
    """Sum of the istio_tcp_* counters per (metric, reporter) on one agent."""
    code, body = _http_in(node.netns, STATS_PORT, "/metrics")
    totals: dict[str, float] = {}
    if code != 200:
        return totals
    for line in body.splitlines():
        if not line.startswith("istio_tcp_") or "{" not in line:
            continue
        name, rest = line.split("{", 1)
        labels, _, value = rest.rpartition("} ")
        reporter = "destination" if 'reporter="destination"' in labels else "source"
        key = f"{name.removesuffix('_total')}[{reporter}]"
        with contextlib.suppress(ValueError):
            totals[key] = totals.get(key, 0.0) + float(value)
    return totals


def print_status() -> int:
    labs = topo.list_labs()
    if not labs:
        print("no lab is up")
        return 0
    for lab_id in labs:
        try:
            t = topo.load(lab_id)
        except LabError as e:
            print(f"{lab_id}: unreadable ({e})")
            continue
        image = lab_image.load(lab_id)
        print(f"lab {lab_id}:" + (f" agents from image {image.image}" if image else ""))
        for node in t.nodes:
            pidf = lab_dir(lab_id) / node.name / "agent.pid"
            pid = int(pidf.read_text()) if pidf.exists() else 0
            alive = pid > 0 and _alive(pid)
            ready = agent_ready(node)[0] if alive else False
            try:
                pods = request(enrolment_socket(t, node), {"op": "list"}, timeout=3)["pods"]
            except EnrolmentError:
                pods = {}
            enrolled = sorted(k for k, v in pods.items() if v.get("enrolled"))
            refused = sorted(k for k, v in pods.items() if not v.get("capture", {}).get("ok"))
            totals = metrics_totals(node) if alive else {}
            opened = {k: int(v) for k, v in totals.items() if "opened" in k}
            print(
                f"  node {node.name} {node.ip}: agent pid {pid or '-'} "
                f"{'running' if alive else 'NOT RUNNING'}{', ready' if ready else ''}"
            )
            print(f"    enrolled: {', '.join(enrolled) or '-'}")
            if refused:
                print(f"    capture NOT safe (see `ztunnel ctl capture`): {', '.join(refused)}")
            print(f"    connections opened: {opened or '-'}")
    return 0
