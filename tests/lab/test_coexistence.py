"""The capture next to a primary CNI's own programs on the same hooks (issue 15).

Stand-in CNI programs (tests/lab/primary_cni.py: one that passes everything, one that
redirects, one that counts) sit before and after ztunnel's on the pod veths and the uplink,
in both attach modes (tcx links; cls_bpf filters, forced on a tcx kernel too). Every
scenario ends either in "captured" -- TLS on the wire between the nodes and the agents'
access-log records -- or in "refused and reported" -- the connection fails, nothing crosses
the wire in plaintext, and the log, the metrics, readiness, `ztunnel ctl capture` and the
enrolment API name the program, the interface and the priority -- never in plaintext.
The first part runs real agents (`ztunnel run`, as `lab up` starts them); the second the
stand-in agent of conftest.py, whose checks the test triggers (`op: check`) with a clock
it controls.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from tests.lab.conftest import hook_prog_ids, kernel_has_tcx, require_attach_mode
from tests.lab.primary_cni import PrimaryCni
from tests.lab.test_lab_e2e import WireCapture, access_after, offsets
from ztunnel.capture import syscalls
from ztunnel.capture.objects import POD_PROGRAM, POD_PROGRAM_COPY
from ztunnel.enrolment import request
from ztunnel.lab import runner
from ztunnel.lab import topology as topo
from ztunnel.lab.topology import NodeSpec, Topology

if TYPE_CHECKING:
    from tests.lab.conftest import Agent, Lab

pytestmark = pytest.mark.lab

APP_PORT = 8080
NODE_PORT = 18081  # a server on the node's own address (kubelet-style), never captured
CHECK_INTERVAL = 1.0  # the agents' --capture-check-interval (the default)
# How long a program inserted ahead of ours may stay ahead: one check interval, plus the
# check itself, plus slack for a loaded 2-core CI machine. The measured figure is printed.
REORDER_BOUND = CHECK_INTERVAL + 3.0


# ---- helpers ----------------------------------------------------------------------------


def call(t: Topology, src: str, dst: str, marker: str, timeout: float = 3.0) -> dict[str, Any]:
    return runner.call_from(t.pod(src).netns, str(t.pod(dst).ip), APP_PORT, marker, timeout)


def ifindex(netns: str, ifname: str) -> int:
    return topo.call_in_netns(netns, lambda: socket.if_nametoindex(ifname))


def pod_records(t: Topology, node: str) -> dict[str, dict[str, Any]]:
    pods: dict[str, dict[str, Any]] = request(
        runner.enrolment_socket(t, t.node(node)), {"op": "list"}
    )["pods"]
    return pods


def capture_metrics(node: NodeSpec) -> dict[str, float]:
    code, body = runner._http_in(node.netns, runner.STATS_PORT, "/metrics")
    assert code == 200, body
    out = {}
    for line in body.splitlines():
        if line.startswith("ztunnel_capture_"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def readiness(node: NodeSpec) -> tuple[int, str]:
    return runner._http_in(node.netns, runner.READY_PORT, "/healthz/ready")


def ctl_capture(node: NodeSpec) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "ztunnel", "ctl", "capture"]
    return subprocess.run(
        topo.netns_exec_argv(node.netns, argv),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def agent_log(t: Topology, node: str) -> str:
    return (runner.lab_dir(t.lab_id) / node / "agent.log").read_text(errors="replace")


def our_pod_programs(node: NodeSpec) -> set[int]:
    ids = set()
    for name in (POD_PROGRAM, POD_PROGRAM_COPY):
        fd = syscalls.obj_get(node.pin_dir / name)
        try:
            ids.add(syscalls.prog_info(fd).id)
        finally:
            os.close(fd)
    return ids


def node_server(node: NodeSpec) -> tuple[socket.socket, threading.Thread]:
    """A server on the node's own address that reads each connection to its end."""
    server = topo.call_in_netns(node.netns, lambda: socket.create_server((str(node.ip), NODE_PORT)))
    server.settimeout(10)

    def serve() -> None:
        for _ in range(4):  # bounded: the test makes one connection
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                while conn.recv(4096):
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return server, thread


def send_to_node(pod_netns: str, node: NodeSpec, size: int = 20000) -> None:
    sock = topo.call_in_netns(pod_netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    with sock:
        sock.settimeout(5)
        sock.connect((str(node.ip), NODE_PORT))
        sock.sendall(b"x" * size)
        sock.shutdown(socket.SHUT_WR)
        sock.recv(1)  # the server's FIN


def settled(counters: Callable[[], tuple[int, int]], timeout: float = 3.0) -> tuple[int, int]:
    """Two counters, once they agree (packets still in flight when the client returns)."""
    topo.wait_until(lambda: counters()[0] == counters()[1], timeout)
    return counters()


# ---- real agents: programs ahead and behind at start, and one inserted ahead later ----------


class CniLab:
    """A lab whose CNI stand-ins were attached before the agents started."""

    def __init__(self, t: Topology, mode: str, cni: PrimaryCni) -> None:
        self.t, self.mode, self.cni = t, mode, cni
        n0, n1 = t.node("n0"), t.node("n1")
        first_tc = 1  # where a CNI like Cilium's legacy tc datapath puts its programs
        # n0p0's veth (an enrolled client): a from-container program that redirects the
        # app's traffic straight out of the uplink, at the front of the hook.
        self.redirect = cni.program("redirect", APP_PORT, ifindex(n0.netns, "eth0"))
        # n1's uplink: a program that passes everything, at the front of the hook.
        self.uplink_pass = cni.program("pass", APP_PORT)
        # Counters after ours: on n0p2's veth (not enrolled) and on n0p0's (enrolled,
        # traffic to the node address is not captured), with references inside the pods
        # (their eth0 egress) that see every packet leaving them.
        self.after_legacy = cni.program("count", APP_PORT)
        self.after_client = cni.program("count", NODE_PORT)
        self.ref_legacy = cni.program("count", APP_PORT)
        self.ref_client = cni.program("count", NODE_PORT)
        if mode == "tcx":
            self.redirect.attach_tcx(n0.netns, "vpod0", first=True)
            self.uplink_pass.attach_tcx(n1.netns, "eth0", first=True)
            after = first_tc  # legacy clsact filters run after the whole tcx chain
        else:
            self.redirect.attach_tc(n0.netns, "vpod0", priority=first_tc)
            self.uplink_pass.attach_tc(n1.netns, "eth0", priority=first_tc)
            after = first_tc + 1
        self.after_legacy.attach_tc(n0.netns, "vpod2", priority=after)
        self.after_client.attach_tc(n0.netns, "vpod0", priority=after + 1)
        self.ref_legacy.attach_tc(t.pod("n0p2").netns, "eth0", 1, direction="egress")
        self.ref_client.attach_tc(t.pod("n0p0").netns, "eth0", 1, direction="egress")


@pytest.fixture(scope="module", params=["tcx", "cls_bpf"])
def cni_lab(request: pytest.FixtureRequest) -> Iterator[CniLab]:
    mode = require_attach_mode(str(request.param))
    made: list[CniLab] = []

    def before_agents(t: Topology) -> None:
        made.append(CniLab(t, mode, PrimaryCni(t)))

    t = runner.up(2, 3, agent_args=("--capture-attach", mode), before_agents=before_agents)
    try:
        yield made[0]
    finally:
        for lab in made:
            lab.cni.close()
        runner.down(t.lab_id)


def test_cni_programs_present_at_start_run_after_ours_and_see_the_rest(cni_lab: CniLab) -> None:
    t = cni_lab.t
    n0, n1 = t.node("n0"), t.node("n1")
    # ztunnel went to the front of both hooks: every pod is captured safely.
    for node in ("n0", "n1"):
        for key, rec in pod_records(t, node).items():
            assert rec["capture"]["ok"] is True, (node, key, rec)
    assert ctl_capture(n0).returncode == 0

    wire = WireCapture(t.network_netns)
    secret = f"SECRET-{time.monotonic_ns()}"
    clear = f"CLEAR-{time.monotonic_ns()}"
    off = offsets(t)
    try:
        assert call(t, "n0p0", "n1p1", secret)["ok"]  # enrolled -> enrolled, other node
        assert call(t, "n0p2", "n1p2", clear)["ok"]  # not enrolled: plaintext, direct
    finally:
        seen = wire.stop(clear.encode())
    assert clear.encode() in seen, "the wire capture is blind"
    assert secret.encode() not in seen and b"\x17\x03\x03" in seen
    recs = access_after(t, off, want=2)
    assert [r for r in recs["n0"] if r["direction"] == "outbound"], recs
    assert [r for r in recs["n1"] if r["direction"] == "inbound"], recs

    # What ztunnel takes ends the hook: the CNI's redirect never saw the captured flow,
    # n1's uplink program never saw the HBONE that carried it, but did see the plaintext.
    assert cni_lab.redirect.seen(watched=True) == 0
    assert cni_lab.uplink_pass.seen(watched=True) > 0

    # Everything ztunnel does not take reaches the CNI program after it, every packet:
    # a pod that is not enrolled...
    legacy = settled(lambda: (cni_lab.ref_legacy.seen(True), cni_lab.after_legacy.seen(True)))
    assert legacy[0] >= 5 and legacy[0] == legacy[1], legacy
    # ...and an enrolled pod's traffic to the node's own address (never captured).
    server, thread = node_server(n0)
    try:
        send_to_node(t.pod("n0p0").netns, n0)
    finally:
        server.close()
        thread.join(5)
    client = settled(lambda: (cni_lab.ref_client.seen(True), cni_lab.after_client.seen(True)))
    assert client[0] >= 5 and client[0] == client[1], client
    assert capture_metrics(n1)['ztunnel_capture_hooks{hook="uplink",state="safe"}'] == 1


def test_program_inserted_ahead_while_traffic_runs_is_overtaken_within_the_bound(
    cni_lab: CniLab,
) -> None:
    t, n0 = cni_lab.t, cni_lab.t.node("n0")
    ours = our_pod_programs(n0)
    intruder = cni_lab.cni.program("pass", APP_PORT)
    wire = WireCapture(t.network_netns)
    marker = f"INSERTED-{time.monotonic_ns()}"
    results: list[tuple[float, bool]] = []  # (when the call started, whether it worked)
    stop = threading.Event()

    def traffic() -> None:
        for _ in range(200):  # bounded; stops when told
            if stop.is_set():
                return
            started = time.monotonic()
            ok = bool(call(t, "n0p0", "n1p1", marker, timeout=2.0).get("ok"))
            results.append((started, ok))

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    try:
        assert topo.wait_until(lambda: any(ok for _, ok in results), 20)
        inserted = time.monotonic()
        if cni_lab.mode == "tcx":
            intruder.attach_tcx(n0.netns, "vpod0", first=True)
        else:  # a filter added to a priority runs before the older ones of it
            intruder.attach_tc(n0.netns, "vpod0", priority=1, handle=2)
        ahead = hook_prog_ids(n0.netns, "vpod0")[0] == intruder.prog_id
        assert ahead, "the inserted program did not land ahead of ztunnel's"
        assert topo.wait_until(
            lambda: hook_prog_ids(n0.netns, "vpod0")[0] in ours, REORDER_BOUND, 0.01
        ), f"ztunnel was not back in front within {REORDER_BOUND}s"
        overtaken = time.monotonic() - inserted
        print(
            f"\n[{cni_lab.mode}] program inserted ahead, ztunnel back in front after"
            f" {overtaken * 1000:.0f} ms (check interval {CHECK_INTERVAL:g}s)"
        )
        back = time.monotonic()
        assert topo.wait_until(lambda: sum(1 for ts, _ in results if ts > back) >= 3, 20)
    finally:
        stop.set()
        thread.join(30)
        clear = f"CLEAR-{marker}"
        assert call(t, "n0p2", "n1p2", clear)["ok"]
        seen = wire.stop(clear.encode())
    assert clear.encode() in seen, "the wire capture is blind"
    assert marker.encode() not in seen.replace(clear.encode(), b""), "plaintext on the wire"
    assert all(ok for ts, ok in results if ts > back), results
    records = pod_records(t, "n0")
    assert records["frontend/n0p0"]["capture"]["ok"] is True, records
    assert capture_metrics(n0)['ztunnel_capture_reorders_total{hook="pod"}'] >= 1
    log = agent_log(t, "n0")
    assert "runs ahead of ztunnel on vpod0 ingress" in log and "cni_pass" in log
    # Behind ours now, it no longer sees the captured connections.
    before = intruder.seen(watched=True)
    assert call(t, "n0p0", "n1p1", "after")["ok"]
    assert intruder.seen(watched=True) == before
    intruder.detach_tcx()
    if cni_lab.mode == "cls_bpf":
        intruder.detach_tc(n0.netns, "vpod0", priority=1, handle=2)


# ---- real agents: a program that cannot be overtaken ------------------------------------


class RefusingLab:
    """cls_bpf mode at priority 10 (as an operator might choose), with CNI programs at
    priority 5 on two enrolled pods' veths: ztunnel cannot get ahead of them. n1's uplink
    has an XDP program the operator accepted (--capture-allow-ahead)."""

    def __init__(self, t: Topology, cni: PrimaryCni) -> None:
        self.t, self.cni = t, cni
        n0, n1 = t.node("n0"), t.node("n1")
        self.pass_ahead = cni.program("pass", APP_PORT)  # the issue's own reproduction
        self.redirect_ahead = cni.program("redirect", APP_PORT, ifindex(n0.netns, "eth0"))
        self.xdp = cni.program("xdp", APP_PORT)
        self.pass_ahead.attach_tc(n0.netns, "vpod0", priority=5)
        self.redirect_ahead.attach_tc(n0.netns, "vpod3", priority=5)
        self.xdp.attach_xdp(n1.netns, "eth0")


@pytest.fixture(scope="module")
def refusing_lab() -> Iterator[RefusingLab]:
    made: list[RefusingLab] = []
    args = ("--capture-attach", "cls_bpf", "--capture-tc-priority", "10")
    args += ("--capture-allow-ahead", "cni_xdp0")
    t = runner.up(
        2, 4, agent_args=args, before_agents=lambda t: made.append(RefusingLab(t, PrimaryCni(t)))
    )
    try:
        yield made[0]
    finally:
        for lab in made:
            lab.cni.close()
        runner.down(t.lab_id)


def test_program_ahead_that_cannot_be_overtaken_refuses_the_pod_and_says_so(
    refusing_lab: RefusingLab,
) -> None:
    lab = refusing_lab
    t, n0, n1 = lab.t, lab.t.node("n0"), lab.t.node("n1")
    records = pod_records(t, "n0")
    for key, program in (("frontend/n0p0", "cni_pass0"), ("shop/n0p3", "cni_redirect0")):
        rec = records[key]
        assert rec["enrolled"] is True and rec["capture"]["ok"] is False, rec
        for word in (rec["ifname"], program, "priority 5", "refused", "--capture-allow-ahead"):
            assert word in rec["capture"]["detail"], (word, rec)
    assert records["shop/n0p1"]["capture"]["ok"] is True
    accepted = pod_records(t, "n1")["shop/n1p1"]["capture"]
    assert accepted["ok"] is True and "risk accepted" in accepted["detail"], accepted

    wire = WireCapture(t.network_netns)
    secret = f"REFUSED-{time.monotonic_ns()}"
    clear = f"CLEAR-{time.monotonic_ns()}"
    off = offsets(t)
    try:
        assert not call(t, "n0p0", "n1p1", secret, timeout=2.0)["ok"]  # passed around us
        assert not call(t, "n0p3", "n1p1", secret, timeout=2.0)["ok"]  # redirected around us
        assert call(t, "n0p1", "n1p1", "safe")["ok"]  # a safe pod of the same node: captured
        assert call(t, "n0p2", "n1p2", clear)["ok"]
    finally:
        seen = wire.stop(clear.encode())
    assert clear.encode() in seen, "the wire capture is blind"
    assert secret.encode() not in seen, "a refused pod's traffic crossed the wire in plaintext"
    assert b"\x17\x03\x03" in seen
    recs = access_after(t, off, want=2)
    assert [r for r in recs["n0"] if r["src.workload"] == "n0p1"], recs
    # The CNI programs really took the refused pods' packets (the SYNs), and the XDP
    # program on n1 saw the captured traffic it was accepted for.
    assert lab.pass_ahead.seen(watched=True) > 0 and lab.redirect_ahead.seen(watched=True) > 0
    assert lab.xdp.seen() > 0

    metrics = capture_metrics(n0)
    assert metrics["ztunnel_capture_refused_pods"] == 2, metrics
    assert metrics['ztunnel_capture_hooks{hook="pod",state="refused"}'] == 2, metrics
    assert metrics['ztunnel_capture_detections_total{hook="pod",layer="tc"}'] >= 2, metrics
    assert capture_metrics(n1)['ztunnel_capture_hooks{hook="uplink",state="accepted"}'] == 1
    code, body = readiness(n0)  # ready: the node serves every other pod; it says which not
    assert code == 200 and "capture: vpod0 ingress" in body and "vpod3" in body, body
    assert readiness(n1)[0] == 200
    ctl = ctl_capture(n0)
    assert ctl.returncode == 3, ctl.stdout + ctl.stderr
    assert "refused" in ctl.stdout and "cni_pass0" in ctl.stdout and "NO" in ctl.stdout
    log = agent_log(t, "n0")
    assert "vpod0 ingress" in log and "'cni_pass0'" in log and "priority 5" in log

    # The operator removes the program that ran ahead: within a check, the pod is captured.
    lab.pass_ahead.detach_tc(n0.netns, "vpod0", priority=5)
    assert topo.wait_until(
        lambda: pod_records(t, "n0")["frontend/n0p0"]["capture"]["ok"], CHECK_INTERVAL + 3.0
    )
    off = offsets(t)
    assert call(t, "n0p0", "n1p1", "fixed")["ok"]
    assert [r for r in access_after(t, off)["n0"] if r["src.workload"] == "n0p0"]


def test_fallback_on_a_tcx_kernel_refuses_pods_behind_tcx_programs(
    refusing_lab: RefusingLab,
) -> None:
    require_attach_mode("tcx")  # only a tcx kernel can have a tcx program ahead
    lab = refusing_lab
    t, n0 = lab.t, lab.t.node("n0")
    tcx_pass = lab.cni.program("pass", APP_PORT)
    tcx_pass.attach_tcx(n0.netns, "vpod1", first=True)
    try:
        assert topo.wait_until(
            lambda: not pod_records(t, "n0")["shop/n0p1"]["capture"]["ok"],
            CHECK_INTERVAL + 3.0,
        )
        detail = pod_records(t, "n0")["shop/n0p1"]["capture"]["detail"]
        assert "tcx program 'cni_pass" in detail and "--capture-attach" in detail, detail
        wire = WireCapture(t.network_netns)
        secret = f"TCX-AHEAD-{time.monotonic_ns()}"
        clear = f"CLEAR-{time.monotonic_ns()}"
        try:
            assert not call(t, "n0p1", "n1p1", secret, timeout=2.0)["ok"]
            assert call(t, "n0p2", "n1p2", clear)["ok"]
        finally:
            seen = wire.stop(clear.encode())
        assert clear.encode() in seen and secret.encode() not in seen
    finally:
        tcx_pass.detach_tcx()
    assert topo.wait_until(
        lambda: pod_records(t, "n0")["shop/n0p1"]["capture"]["ok"], CHECK_INTERVAL + 3.0
    )


# ---- the stand-in agent: checks the test drives ------------------------------------------


def enrol(lab: Lab, agent: Agent, pod_name: str) -> None:
    pod = lab.topology.pod(pod_name)
    agent.request(op="enrol", name=pod.name, host_ifname=pod.host_ifname, ips=[str(pod.ip)])


def ip_of(lab: Lab, pod_name: str) -> str:
    return str(lab.topology.pod(pod_name).ip)


def refused(lab: Lab, src: str, dst: str) -> bool:
    """Whether a connection from pod `src` to pod `dst` fails (its SYN was dropped)."""
    try:
        sock = lab.connect(lab.topology.pod(src).netns, ip_of(lab, dst), APP_PORT, timeout=1.0)
        lab.exchange(sock, "must not get through")
    except (TimeoutError, ConnectionError):
        return True
    return False


def read_lines(sock: socket.socket, count: int) -> list[dict[str, Any]]:
    buf = b""
    while buf.count(b"\n") < count:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"closed after {buf!r}")
        buf += chunk
    return [json.loads(line) for line in buf.splitlines()[:count]]


def test_guard_drops_what_escaped_capture_before_the_next_check(
    lab: Lab, make_cni: Callable[[Any], PrimaryCni]
) -> None:
    """A program inserted ahead of ours passes an enrolled pod's packets around it; until
    a check moves ours back, the egress guard drops them: no plaintext leaves the node,
    a captured connection survives, and a new one succeeds once the check has run."""
    agent = lab.start_agent("n0")  # tcx where the kernel has it, else cls_bpf
    attach_mode = agent.ready["mode"]
    lab.app("n1p0")
    enrol(lab, agent, "n0p0")
    node = lab.topology.node("n0")
    established = lab.connect(lab.topology.pod("n0p0").netns, ip_of(lab, "n1p0"), APP_PORT)
    assert lab.exchange(established, "before")["who"] == "agent"

    intruder = make_cni(lab.topology).program("pass", APP_PORT)
    wire = WireCapture(lab.topology.network_netns)
    marker = f"IN-THE-WINDOW-{time.monotonic_ns()}"
    try:
        if attach_mode == "tcx":
            intruder.attach_tcx(node.netns, "vpod0", first=True)
        else:
            intruder.attach_tc(node.netns, "vpod0", priority=1, handle=2)
        assert hook_prog_ids(node.netns, "vpod0")[0] == intruder.prog_id  # ahead, unchecked
        assert refused(lab, "n0p0", "n1p0")  # the new connection's SYN was not forwarded
        assert intruder.seen(watched=True) > 0  # it did take the packets
        # Data of the captured connection, passed around ours: never forwarded either.
        established.sendall(marker.encode() + b"\n")
        hooks = agent.request(op="check")["hooks"]
        assert hooks["vpod0"]["state"] == "safe" and hooks["vpod0"]["reorders"] == 1, hooks
        established.settimeout(5)  # retransmitted (or demuxed) to the agent: it answers
        established.sendall(b"after\n")
        answers = read_lines(established, 2)
        assert [(a["who"], a["data"]) for a in answers] == [("agent", marker), ("agent", "after")]
        assert lab.ask("n0p0", ip_of(lab, "n1p0"))["who"] == "agent"
        sock = lab.connect(lab.topology.pod("n0p1").netns, ip_of(lab, "n1p0"), APP_PORT)
        assert lab.exchange(sock, f"CLEAR-{marker}")["who"] == "pod"  # not enrolled: direct
    finally:
        seen = wire.stop(f"CLEAR-{marker}".encode())
    assert f"CLEAR-{marker}".encode() in seen, "the wire capture is blind"
    assert marker.encode() not in seen.replace(f"CLEAR-{marker}".encode(), b"")


def test_reorder_budget_ends_a_fight_for_the_front_in_refusal(
    lab: Lab, attach_mode: str, make_cni: Callable[[Any], PrimaryCni]
) -> None:
    agent = lab.start_agent("n0", attach=attach_mode)
    lab.app("n1p0")
    enrol(lab, agent, "n0p0")
    node = lab.topology.node("n0")
    intruder = make_cni(lab.topology).program("pass", APP_PORT)

    def insert_ahead(round_: int) -> None:  # another agent that insists on the front
        if attach_mode == "tcx":
            intruder.detach_tcx()
            intruder.attach_tcx(node.netns, "vpod0", first=True)
        else:
            if round_:
                intruder.detach_tc(node.netns, "vpod0", priority=1, handle=round_)
            intruder.attach_tc(node.netns, "vpod0", priority=1, handle=round_ + 1)

    start = 1000.0
    for round_ in range(3):
        insert_ahead(round_)
        hooks = agent.request(op="check", now=start + round_)["hooks"]
        assert hooks["vpod0"]["state"] == "safe" and hooks["vpod0"]["reorders"] == round_ + 1
    insert_ahead(3)
    answer = agent.request(op="check", now=start + 3)
    vpod0 = answer["hooks"]["vpod0"]
    assert vpod0["state"] == "refused", vpod0
    assert "moved back to the front 3 times in the last 60s" in vpod0["detail"], vpod0
    assert answer["unsafe"]["addresses"] == [ip_of(lab, "n0p0")]
    assert refused(lab, "n0p0", "n1p0")
    # Once the window has moved on, ztunnel takes the front again.
    answer = agent.request(op="check", now=start + 61)
    assert answer["hooks"]["vpod0"]["state"] == "safe" and answer["unsafe"]["addresses"] == []
    assert lab.ask("n0p0", ip_of(lab, "n1p0"))["who"] == "agent"


def test_our_filter_removed_by_someone_is_attached_again(lab: Lab) -> None:
    agent = lab.start_agent("n0", attach="cls_bpf")
    lab.app("n1p0")
    enrol(lab, agent, "n0p0")
    node = lab.topology.node("n0")
    # Somebody flushes the hook (deleting the clsact qdisc takes every filter with it).
    subprocess.run(["tc", "-n", node.netns, "qdisc", "del", "dev", "vpod0", "clsact"], check=True)
    assert hook_prog_ids(node.netns, "vpod0") == []
    hooks = agent.request(op="check")["hooks"]
    assert hooks["vpod0"]["state"] == "safe", hooks
    assert hook_prog_ids(node.netns, "vpod0") == [agent.ready["program_ids"][POD_PROGRAM]]
    assert lab.ask("n0p0", ip_of(lab, "n1p0"))["who"] == "agent"


def test_xdp_ahead_is_refused_unless_the_operator_accepts_it(
    lab: Lab, make_cni: Callable[[Any], PrimaryCni]
) -> None:
    agent = lab.start_agent("n0", attach="cls_bpf")  # nothing runs before XDP, in any mode
    lab.app("n1p0")
    enrol(lab, agent, "n0p0")
    node = lab.topology.node("n0")
    xdp = make_cni(lab.topology).program("xdp", APP_PORT)
    xdp.attach_xdp(node.netns, "vpod0")
    hooks = agent.request(op="check")["hooks"]
    assert hooks["vpod0"]["state"] == "refused", hooks  # XDP always runs before tc
    status = agent.request(op="pod_capture", host_ifname="vpod0")["capture"]
    assert status["ok"] is False and "XDP program 'cni_xdp0'" in status["detail"], status
    assert "xdp off" in status["detail"] and "--capture-allow-ahead=cni_xdp0" in status["detail"]
    assert refused(lab, "n0p0", "n1p0")
    agent.kill()

    accepting = lab.start_agent("n0", allow_ahead=("cni_xdp0",))
    assert accepting.ready["hooks"]["vpod0"]["state"] == "accepted"
    status = accepting.request(op="pod_capture", host_ifname="vpod0")["capture"]
    assert status["ok"] is True and "risk accepted" in status["detail"], status
    assert lab.ask("n0p0", ip_of(lab, "n1p0"))["who"] == "agent"  # XDP_PASS: still captured
    assert xdp.seen(watched=True) > 0


def test_refused_uplink_refuses_every_enrolled_pod(
    lab: Lab, make_cni: Callable[[Any], PrimaryCni]
) -> None:
    agent = lab.start_agent("n0")
    lab.start_agent("n1")
    for name in ("n0p0", "n1p0", "n1p1"):
        lab.app(name)
    enrol(lab, agent, "n0p0")
    node = lab.topology.node("n0")
    make_cni(lab.topology).program("xdp").attach_xdp(node.netns, "eth0")
    answer = agent.request(op="check")
    assert answer["hooks"]["eth0"]["state"] == "refused", answer
    assert answer["unsafe"]["guard_flags"] & 1  # GUARD_UPLINK
    status = agent.request(op="pod_capture", host_ifname="vpod0")["capture"]
    assert status["ok"] is False and "eth0 ingress (uplink hook" in status["detail"]
    assert refused(lab, "n1p0", "n0p0")  # inbound to the enrolled pod
    assert refused(lab, "n0p0", "n1p0")  # and its outbound
    assert lab.ask("n0p1", ip_of(lab, "n1p1"))["who"] == "pod"  # others are not affected


def test_attach_mode_switch_on_restart_leaves_one_program_per_hook(lab: Lab) -> None:
    require_attach_mode("tcx")
    node = lab.topology.node("n0")
    lab.app("n1p0")
    agent = lab.start_agent("n0", attach="tcx")
    enrol(lab, agent, "n0p0")
    links = node.pin_dir / "links"
    assert len(os.listdir(links)) == 6
    for mode in ("cls_bpf", "tcx"):
        agent.kill()
        agent = lab.start_agent("n0", attach=mode)
        assert agent.ready["mode"] == mode
        ids = agent.ready["program_ids"]
        for ifname in ("eth0", "vpod0", "vpod1"):
            assert len(hook_prog_ids(node.netns, ifname)) == 1, (mode, ifname)
            assert hook_prog_ids(node.netns, ifname, "egress") == [ids["capture_guard"]]
        assert len(os.listdir(links)) == (6 if mode == "tcx" else 0)
        assert lab.ask("n0p0", ip_of(lab, "n1p0"))["who"] == "agent"
    assert kernel_has_tcx()
