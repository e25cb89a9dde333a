"""End-to-end kernel-lab tests: real agents (`ztunnel run --capture ebpf`) in node namespaces,
pods with applications, every kind of flow, the wire between nodes, agent restart, unenrol,
and teardown. Assertions are what applications and agents observe."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ztunnel.enrolment import request
from ztunnel.lab import runner
from ztunnel.lab import topology as topo
from ztunnel.lab.topology import Topology

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def mesh_lab() -> Iterator[Topology]:
    t = runner.up(nodes=2, pods=3)
    try:
        yield t
    finally:
        runner.down(t.lab_id)


def pods(t: Topology) -> dict[str, Any]:
    return {p.name: p for p in t.pods()}


def access_after(
    t: Topology, offsets: dict[str, int], want: int = 1, timeout: float = 3.0
) -> dict[str, list[dict[str, Any]]]:
    """Access-log records written since `offsets`, waiting for at least `want` in total."""
    deadline = time.monotonic() + timeout
    while True:
        recs = {n.name: runner.access_lines(t, n, offsets[n.name])[0] for n in t.nodes}
        if sum(len(v) for v in recs.values()) >= want or time.monotonic() > deadline:
            return recs
        time.sleep(0.05)


def offsets(t: Topology) -> dict[str, int]:
    return {n.name: runner.access_lines(t, n)[1] for n in t.nodes}


def call(t: Topology, src: str, ip: str, port: int, marker: str = "ping") -> dict[str, Any]:
    return runner.call_from(t.pod(src).netns, ip, port, marker)


def test_cross_node_enrolled_flow_goes_over_hbone_with_identities(mesh_lab: Topology) -> None:
    t, p = mesh_lab, pods(mesh_lab)
    off = offsets(t)
    res = call(t, "n0p0", str(p["n1p1"].ip), 8080, "cross-node")
    assert res["ok"], res
    # The application sees the real client pod, not the agent.
    assert res["server_saw"].split(":")[0] == str(p["n0p0"].ip)
    recs = access_after(t, off, want=2)
    out = [r for r in recs["n0"] if r["direction"] == "outbound"]
    inb = [r for r in recs["n1"] if r["direction"] == "inbound"]
    assert out and inb, recs
    assert out[-1]["dst.addr"] == f"{p['n1p1'].ip}:15008"
    assert out[-1]["dst.hbone_addr"] == f"{p['n1p1'].ip}:8080"
    assert out[-1]["src.identity"] == "spiffe://cluster.local/ns/frontend/sa/web"
    assert out[-1]["dst.identity"] == "spiffe://cluster.local/ns/shop/sa/echo"
    assert inb[-1]["src.identity"] == "spiffe://cluster.local/ns/frontend/sa/web"
    assert inb[-1]["bytes_recv"] == len("cross-node")


def test_same_node_enrolled_flow_goes_over_hbone(mesh_lab: Topology) -> None:
    t, p = mesh_lab, pods(mesh_lab)
    off = offsets(t)
    res = call(t, "n0p0", str(p["n0p1"].ip), 8080, "same-node")
    assert res["ok"], res
    assert res["server_saw"].split(":")[0] == str(p["n0p0"].ip)
    recs = access_after(t, off, want=2)["n0"]
    directions = sorted(r["direction"] for r in recs)
    assert directions == ["inbound", "outbound"], recs
    inb = next(r for r in recs if r["direction"] == "inbound")
    assert inb["src.identity"] == "spiffe://cluster.local/ns/frontend/sa/web"
    assert inb["src.addr"].split(":")[0] == str(p["n0p0"].ip)


def test_service_vip_reaches_an_endpoint_over_hbone(mesh_lab: Topology) -> None:
    t, p = mesh_lab, pods(mesh_lab)
    seen = set()
    for i in range(6):
        res = call(t, "n0p0", runner.SERVICE_VIP, 80, f"vip-{i}")
        assert res["ok"], res
        assert res["server_saw"].split(":")[0] == str(p["n0p0"].ip)
        seen.add(res["server"].split(":")[0])
    assert seen <= {"n0p1", "n1p1"} and seen


def test_enrolled_to_not_enrolled_is_passed_through(mesh_lab: Topology) -> None:
    t, p = mesh_lab, pods(mesh_lab)
    off = offsets(t)
    res = call(t, "n0p0", str(p["n1p2"].ip), 8080, "to-legacy")
    assert res["ok"], res
    assert res["server_saw"].split(":")[0] == str(p["n0p0"].ip)
    out = [r for r in access_after(t, off)["n0"] if r["direction"] == "outbound"]
    assert out and out[-1]["dst.addr"] == f"{p['n1p2'].ip}:8080", out
    assert out[-1]["src.workload"] == "n0p0"
    assert "dst.hbone_addr" not in out[-1]  # not tunneled


def test_not_enrolled_to_enrolled_is_captured_on_15006(mesh_lab: Topology) -> None:
    t, p = mesh_lab, pods(mesh_lab)
    off = offsets(t)
    res = call(t, "n1p2", str(p["n0p1"].ip), 8080, "from-legacy")
    assert res["ok"], res
    assert res["server_saw"].split(":")[0] == str(p["n1p2"].ip)
    inb = [r for r in access_after(t, off)["n0"] if r["direction"] == "inbound"]
    assert inb, "the destination agent did not handle the plaintext connection"
    assert "src.identity" not in inb[-1]  # plaintext: no peer identity
    assert inb[-1]["dst.workload"] == "n0p1"


def test_not_enrolled_pods_and_node_traffic_are_untouched(mesh_lab: Topology) -> None:
    t, p = mesh_lab, pods(mesh_lab)
    off = offsets(t)
    res = call(t, "n1p2", str(p["n0p2"].ip), 8080, "legacy-legacy")
    assert res["ok"], res
    assert res["server_saw"].split(":")[0] == str(p["n1p2"].ip)
    probe = runner.call_from(t.node("n0").netns, str(p["n0p1"].ip), 8080, "probe")
    assert probe["ok"], probe
    assert probe["server_saw"].split(":")[0] == str(t.node("n0").ip)
    time.sleep(0.3)  # give a (wrong) access-log line the chance to appear
    recs = access_after(t, off, want=1, timeout=0.5)
    assert not any(recs.values()), f"agents handled traffic they must not touch: {recs}"


def test_denied_flow_gets_no_bytes_to_the_application(mesh_lab: Topology) -> None:
    t, p = mesh_lab, pods(mesh_lab)
    off = offsets(t)
    res = call(t, "n0p0", str(p["n1p1"].ip), 9090, "denied")
    assert not res["ok"], res
    assert "hello" not in res, "the application answered a denied connection"
    recs = access_after(t, off, want=2)
    inb = [r for r in recs["n1"] if r["direction"] == "inbound"]
    assert inb and inb[-1].get("response_flags") == "DENY", recs
    out = [r for r in recs["n0"] if r["direction"] == "outbound"]
    assert out and out[-1].get("response_flags") == "DENY", recs


class WireCapture:
    """Every frame on every interface of a namespace, through a raw AF_PACKET socket opened
    inside it (the lab's "wire" between nodes), kept in memory while the test runs."""

    ETH_P_ALL = 0x0003

    def __init__(self, netns: str) -> None:
        import socket as _socket

        self.sock = topo.call_in_netns(
            netns,
            lambda: _socket.socket(
                _socket.AF_PACKET, _socket.SOCK_RAW, _socket.htons(self.ETH_P_ALL)
            ),
        )
        self.sock.settimeout(0.1)
        self.frames: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.frames.append(self.sock.recv(65535))
            except TimeoutError:
                continue
            except OSError:
                return

    def seen(self, marker: bytes) -> bool:
        return any(marker in f for f in list(self.frames))

    def stop(self, expect: bytes) -> bytes:
        """Stop once the frame we know was sent has been read, and return all bytes seen."""
        topo.wait_until(lambda: self.seen(expect), 10)
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
        return b"\x00".join(self.frames)


def test_wire_between_nodes_carries_only_tls_for_captured_traffic(
    mesh_lab: Topology, tmp_path: Path
) -> None:
    t, p = mesh_lab, pods(mesh_lab)
    cap = WireCapture(t.network_netns)
    secret = f"SECRET-MARKER-{os.getpid()}-{time.monotonic_ns()}"
    clear = f"CLEAR-MARKER-{os.getpid()}-{time.monotonic_ns()}"
    try:
        assert call(t, "n0p0", str(p["n1p1"].ip), 8080, secret)["ok"]
        assert call(t, "n0p0", runner.SERVICE_VIP, 80, secret)["ok"]
        # Uncaptured traffic in the same capture: proves the check can see plaintext.
        assert call(t, "n0p2", str(p["n1p2"].ip), 8080, clear)["ok"]
    finally:
        wire = cap.stop(clear.encode())
    assert clear.encode() in wire, "the capture saw no plaintext at all: the check is blind"
    assert secret.encode() not in wire, "captured traffic crossed the wire in plaintext"
    # And it was TLS: a TLS 1.3 application-data record header (0x17 0x03 0x03) is present.
    assert b"\x17\x03\x03" in wire


def test_unenrol_restores_direct_traffic_and_enrol_captures_again(mesh_lab: Topology) -> None:
    t, p = mesh_lab, pods(mesh_lab)
    client = p["n0p0"]
    try:
        runner.set_enrolled(t, client, False)
        off = offsets(t)
        res = call(t, "n0p0", str(p["n1p2"].ip), 8080, "direct-again")
        assert res["ok"], res
        recs = access_after(t, off, want=1, timeout=0.7)
        assert not recs["n0"], f"an unenrolled pod's traffic was still captured: {recs['n0']}"
    finally:
        runner.set_enrolled(t, client, True)
    off = offsets(t)
    assert call(t, "n0p0", str(p["n1p2"].ip), 8080, "captured-again")["ok"]
    assert [r for r in access_after(t, off)["n0"] if r["direction"] == "outbound"]


def test_agent_restart_keeps_enrolment_and_never_leaks_plaintext(
    mesh_lab: Topology, tmp_path: Path
) -> None:
    t, p = mesh_lab, pods(mesh_lab)
    node = t.node("n1")
    cap = WireCapture(t.network_netns)
    marker = f"RESTART-MARKER-{time.monotonic_ns()}"
    results: list[tuple[float, bool]] = []
    stop = threading.Event()

    def traffic() -> None:
        # Bounded: at most 300 calls, stops when told.
        for _ in range(300):
            if stop.is_set():
                return
            r = runner.call_from(t.pod("n0p0").netns, str(p["n1p1"].ip), 8080, marker, timeout=1.0)
            results.append((time.monotonic(), bool(r.get("ok"))))

    th = threading.Thread(target=traffic, daemon=True)
    th.start()
    try:
        topo.wait_until(lambda: any(ok for _, ok in results), 20)
        runner.stop_agent(t, node)
        down_at = time.monotonic()
        # While the agent is away, the pod is still enrolled (fail closed): no connection
        # to it succeeds around the agent.
        topo.wait_until(lambda: sum(1 for ts, _ in results if ts > down_at + 0.2) >= 2, 20)
        assert not any(ok for ts, ok in results if ts > down_at + 0.2)
        runner.start_agent(t, node)
        runner.wait_agent(t, node)
        up_at = time.monotonic()
        assert topo.wait_until(lambda: any(ok for ts, ok in results if ts > up_at), 15), (
            "no connection succeeded after the agent restart"
        )
        recovered = min(ts for ts, ok in results if ok and ts > up_at) - up_at
        assert recovered < 10, recovered
        clear = f"CLEAR-{marker}"
        assert call(t, "n0p2", str(p["n1p2"].ip), 8080, clear)["ok"]
    finally:
        stop.set()
        th.join(30)
        wire = cap.stop(f"CLEAR-{marker}".encode())
    assert f"CLEAR-{marker}".encode() in wire, "the capture is blind"
    assert marker.encode() not in wire.replace(f"CLEAR-{marker}".encode(), b"")
    # The new agent found the enrolment state (pinned maps and its state file).
    pods_listed = request(runner.enrolment_socket(t, node), {"op": "list"})["pods"]
    assert pods_listed["shop/n1p1"]["enrolled"] is True


def test_lab_down_leaves_nothing_behind() -> None:
    t = runner.up(nodes=2, pods=3)
    pins = [n.pin_dir for n in t.nodes]
    pids = [int((runner.lab_dir(t.lab_id) / n.name / "agent.pid").read_text()) for n in t.nodes]
    runner.down(t.lab_id)
    assert not [n for n in topo.list_netns() if n.startswith(t.prefix)]
    assert not any(pin.exists() for pin in pins)
    assert not runner.lab_dir(t.lab_id).exists()
    assert not t.state_file.exists()
    for pid in pids:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        assert (
            not Path(f"/proc/{pid}").exists()
            or "Z" in Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][:1]
        )


def test_lab_cli_status_and_down(tmp_path: Path) -> None:
    import sys

    py = [sys.executable, "-m", "ztunnel", "lab"]
    up = subprocess.run(
        [*py, "up", "--nodes", "2", "--pods", "3"],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert up.returncode == 0, up.stderr
    lab_id = up.stdout.strip().splitlines()[-1].split()[1]
    try:
        st = subprocess.run(
            [*py, "status"], capture_output=True, text=True, timeout=60, check=False
        )
        assert st.returncode == 0, st.stderr
        assert f"lab {lab_id}" in st.stdout and "running, ready" in st.stdout
        assert "shop/n0p1" in st.stdout and "legacy" not in st.stdout.split("enrolled:")[1]
    finally:
        down = subprocess.run(
            [*py, "down", "--lab", lab_id], capture_output=True, text=True, timeout=120, check=False
        )
    assert down.returncode == 0, down.stderr
    assert not [n for n in topo.list_netns() if n.startswith(f"{lab_id}-")]
    json.dumps({})  # keep the import used for readability of failures


def test_strict_mtls_refuses_plaintext_and_ctl_check_explains(mesh_lab: Topology) -> None:
    import sys

    import yaml

    t, p = mesh_lab, pods(mesh_lab)
    mesh_file = runner.lab_dir(t.lab_id) / "mesh.yaml"
    strict = {
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": "strict", "namespace": "shop"},
        "spec": {"mtls": {"mode": "STRICT"}},
    }
    original = mesh_file.read_text()
    try:
        mesh_file.write_text(yaml.safe_dump_all([runner.mesh_state(t), strict]))
        # Plaintext from a pod outside the mesh is now refused by the destination agent...
        assert topo.wait_until(
            lambda: not call(t, "n1p2", str(p["n0p1"].ip), 8080, "plain")["ok"], 15
        ), "STRICT was not enforced on plaintext"
        # ...while mesh traffic (mTLS) still flows.
        assert call(t, "n1p0", str(p["n0p1"].ip), 8080, "mtls")["ok"]
        ctl = [sys.executable, "-m", "ztunnel", "ctl", "check"]
        denied = subprocess.run(
            topo.netns_exec_argv(
                t.node("n0").netns,
                [*ctl, "--from", str(p["n1p2"].ip), "--to", f"{p['n0p1'].ip}:8080"],
            ),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert denied.returncode == 3, denied.stdout + denied.stderr
        assert "DENY" in denied.stdout and "plaintext" in denied.stdout
    finally:
        mesh_file.write_text(original)
    assert topo.wait_until(
        lambda: call(t, "n1p2", str(p["n0p1"].ip), 8080, "plain-again")["ok"], 15
    )
