"""The lab with a test istiod: `ztunnel lab up|demo --istiod` runs `python -m ztunnel.lab.istiod`
inside the lab's network namespace (on an address of the lab bridge, never in the root
namespace), serving the lab's mesh file over delta xDS and signing workload certificates; the
agents then start with `--xds-address`/`--ca-address` instead of the file and the local CA.
Changing the mesh file pushes the change to every agent (`push_policies`).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from ztunnel.lab import topology as topo
from ztunnel.lab.topology import LabError, NodeSpec, Topology

ISTIOD_IP = "10.77.0.250"  # on the lab bridge, inside the lab's network namespace
ISTIOD_PORT = 15012
ISTIOD_NAME = "istiod.istio-system.svc"
TOKEN = "lab-service-account-token"
START_TIMEOUT = 30.0


def _dir(t: Topology) -> Path:
    return topo.STATE_DIR / t.lab_id


def enabled(t: Topology) -> bool:
    return (_dir(t) / "istiod" / "istiod.json").exists()


def start(t: Topology) -> None:
    """Give the lab bridge an address and start the test istiod behind it; wait until a node
    can reach it."""
    d = _dir(t) / "istiod"
    d.mkdir(parents=True, exist_ok=True)
    (d / "token").write_text(TOKEN)
    net = t.network_netns
    topo.run_in_netns(net, ["ip", "addr", "replace", f"{ISTIOD_IP}/24", "dev", t.bridge])
    log = open(d / "istiod.log", "ab")  # noqa: SIM115 - handed to the child
    proc = topo.popen_in_netns(
        net,
        [
            sys.executable,
            "-m",
            "ztunnel.lab.istiod",
            "--listen",
            f"{ISTIOD_IP}:{ISTIOD_PORT}",
            "--ca-dir",
            str(_dir(t) / "ca"),
            "--mesh",
            str(_dir(t) / "mesh.yaml"),
            "--token",
            TOKEN,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    log.close()
    (d / "istiod.json").write_text(json.dumps({"pid": proc.pid, "address": address()}))
    node = t.nodes[0]
    deadline = time.monotonic() + START_TIMEOUT
    while not topo.call_in_netns(node.netns, _reachable):
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = (d / "istiod.log").read_text(errors="replace")[-2000:]
            raise LabError(f"test istiod did not come up (see {d / 'istiod.log'}):\n{tail}")
        time.sleep(0.05)


def _reachable() -> bool:
    try:
        with socket.create_connection((ISTIOD_IP, ISTIOD_PORT), timeout=0.5):
            return True
    except OSError:
        return False


def address() -> str:
    return f"https://{ISTIOD_IP}:{ISTIOD_PORT}"


def agent_args(t: Topology, node: NodeSpec) -> list[str] | None:
    """The agent's mesh and certificate source flags in istiod mode (None: file mode)."""
    if not enabled(t):
        return None
    d = _dir(t)
    return [
        "--xds-address",
        address(),
        "--ca-address",
        address(),
        "--xds-root-ca",
        str(d / "ca" / "root-cert.pem"),
        "--ca-root-ca",
        str(d / "ca" / "root-cert.pem"),
        "--alt-xds-hostname",
        ISTIOD_NAME,
        "--alt-ca-hostname",
        ISTIOD_NAME,
        "--auth-token",
        str(d / "istiod" / "token"),
        "--pod-name",
        f"ztunnel-{node.name}",
        "--pod-namespace",
        "istio-system",
        "--instance-ip",
        str(node.ip),
    ]


def push_policies(t: Topology, policies: list[dict[str, Any]]) -> None:
    """Rewrite the mesh file's policies; the test istiod reloads it and pushes over xDS."""
    path = _dir(t) / "mesh.yaml"
    mesh = yaml.safe_load(path.read_text())
    mesh["policies"] = policies
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(mesh, sort_keys=False))
    os.replace(tmp, path)


def current_policies(t: Topology) -> list[dict[str, Any]]:
    mesh = yaml.safe_load((_dir(t) / "mesh.yaml").read_text())
    return list(mesh.get("policies") or [])


def live_connection_closed_by_push(
    t: Topology, src_pod: str, dst_ip: str, port: int, policy: dict[str, Any], timeout: float = 15.0
) -> tuple[bool, str]:
    """Open a connection, check it echoes, push `policy` over xDS, and report whether the
    connection was closed by the destination agent (then restore the policies)."""
    pod = t.pod(src_pod)
    sock = topo.call_in_netns(
        pod.netns, lambda: socket.create_connection((dst_ip, port), timeout=5)
    )
    before = current_policies(t)
    try:
        sock.settimeout(5)
        f = sock.makefile("rb")
        f.readline()  # the application's greeting
        sock.sendall(b"live")
        if f.read(4) != b"live":
            return False, "no echo before the push"
        push_policies(t, [*before, policy])
        sock.settimeout(timeout)
        try:
            data = sock.recv(1)
        except (ConnectionResetError, TimeoutError) as e:
            data = b"" if isinstance(e, ConnectionResetError) else b"?"
        if data == b"":
            return True, "closed after the push"
        return False, "still open after the push"
    finally:
        with contextlib.suppress(OSError):
            sock.close()
        push_policies(t, before)


DENY_WEB = {
    "name": "deny-web-live",
    "namespace": "shop",
    "scope": "Namespace",
    "action": "Deny",
    "rules": [[[{"principals": ["cluster.local/ns/frontend/sa/web"]}]]],
}


def demo_row(t: Topology, progress: Any) -> list[str]:
    """`lab demo --istiod`: the extra row, a policy pushed over xDS closing a live connection."""
    progress("live connection, then a DENY policy pushed over xDS")
    n1p1 = t.pod(f"{t.nodes[-1].name}p1")
    client = f"{t.nodes[0].name}p0"
    closed, how = live_connection_closed_by_push(t, client, str(n1p1.ip), 8080, DENY_WEB)
    return [
        "policy pushed over xDS (live conn)",
        f"{client} -> {n1p1.ip}:8080",
        "15001 -> HBONE => 15008, then DENY via istiod",
        "ns/frontend/sa/web -> ns/shop/sa/echo",
        "-",
        how,
        "PASS" if closed else "FAIL",
    ]
