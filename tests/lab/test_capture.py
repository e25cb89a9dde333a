"""Transparent capture in real network namespaces: where connections land, fail mode, restart.

Each test gets a fresh lab (2 nodes, 2 pods each, see ztunnel/lab/topology.py) with stand-in
agents from conftest.py; assertions are on what an application observes: who answered,
with which getsockname()/getpeername(), or that the connection failed.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.lab.conftest import hook_prog_ids, kernel_has_tcx
from tests.lab.primary_cni import PrimaryCni
from ztunnel.capture import (
    Capture,
    CaptureConfig,
    CaptureError,
    CaptureMaps,
    FailMode,
    PodEnrolment,
)
from ztunnel.capture.attach import LINKS_DIR
from ztunnel.capture.netlink import Netlink
from ztunnel.capture.objects import (
    GUARD_PROGRAM,
    MAP_NAMES,
    POD_PROGRAM,
    PROGRAM_NAMES,
    UPLINK_PROGRAM,
)
from ztunnel.lab import runner, topology
from ztunnel.lab.topology import call_in_netns

if TYPE_CHECKING:
    from tests.lab.conftest import Agent, Lab

pytestmark = pytest.mark.lab

APP_PORT = 8080  # where the pod apps of conftest.Lab.app listen

FAILED_CONNECT_TIMEOUT = 1.0
IO_TIMEOUT = 3.0
IP_TRANSPARENT = 19  # SOL_IP option, include/uapi/linux/in.h


def enrol(lab: Lab, agent: Agent, pod_name: str) -> None:
    pod = lab.topology.pod(pod_name)
    agent.request(op="enrol", name=pod.name, host_ifname=pod.host_ifname, ips=[str(pod.ip)])


def unenrol(lab: Lab, agent: Agent, pod_name: str) -> None:
    pod = lab.topology.pod(pod_name)
    agent.request(op="unenrol", name=pod.name, host_ifname=pod.host_ifname, ips=[str(pod.ip)])


def ip_of(lab: Lab, pod_name: str) -> str:
    return str(lab.topology.pod(pod_name).ip)


def assert_connect_fails(lab: Lab, pod_name: str, ip: str, port: int = APP_PORT) -> None:
    with pytest.raises(TimeoutError):  # the SYN was dropped
        sock = lab.connect(
            lab.topology.pod(pod_name).netns, ip, port, timeout=FAILED_CONNECT_TIMEOUT
        )
        lab.exchange(sock, "must not get through")


def test_outbound_of_enrolled_pod_lands_on_15001_with_original_destination(
    lab: Lab, attach_mode: str
) -> None:
    agent = lab.start_agent("n0", attach=attach_mode)
    assert agent.ready["mode"] == attach_mode
    lab.start_agent("n1", attach=attach_mode)
    lab.app("n1p0")
    lab.app("n0p1")
    enrol(lab, agent, "n0p0")

    for target in (ip_of(lab, "n1p0"), ip_of(lab, "n0p1"), "10.99.0.7"):
        sock = lab.connect(lab.topology.pod("n0p0").netns, target, APP_PORT)
        first = lab.exchange(sock, "one")
        second = lab.exchange(sock, "two")  # the same connection keeps working both ways
        for answer, data in ((first, "one"), (second, "two")):
            assert answer["who"] == "agent", answer
            assert answer["node"] == "n0"
            assert answer["listener"] == "outbound"
            assert answer["local"] == [target, APP_PORT]  # getsockname(): original destination
            assert answer["peer"][0] == ip_of(lab, "n0p0")
            assert answer["data"] == data


def test_inbound_to_enrolled_pod_lands_on_15006_and_15008(lab: Lab) -> None:
    agent = lab.start_agent("n0")
    lab.start_agent("n1")
    lab.app("n0p0")
    enrol(lab, agent, "n0p0")
    dst = ip_of(lab, "n0p0")

    # From a pod on the other node: captured by the destination node's uplink program.
    plain = lab.ask("n1p0", dst, APP_PORT)
    assert (plain["who"], plain["node"], plain["listener"]) == ("agent", "n0", "inbound")
    assert plain["local"] == [dst, APP_PORT]
    assert plain["peer"][0] == ip_of(lab, "n1p0")

    hbone = lab.ask("n1p0", dst, 15008)
    assert (hbone["who"], hbone["node"], hbone["listener"]) == ("agent", "n0", "hbone")
    assert hbone["local"] == [dst, 15008]

    # From a pod that is not enrolled on the same node: captured on its veth.
    local = lab.ask("n0p1", dst, APP_PORT)
    assert (local["who"], local["listener"]) == ("agent", "inbound")
    assert local["peer"][0] == ip_of(lab, "n0p1")


def test_traffic_between_pods_that_are_not_enrolled_is_not_captured(lab: Lab) -> None:
    agent = lab.start_agent("n0")
    lab.start_agent("n1")
    lab.app("n1p1")
    lab.app("n0p1")
    enrol(lab, agent, "n0p0")  # capture is active on the node, just not for these pods

    for target in ("n1p1", "n0p1"):
        answer = lab.ask("n1p0" if target == "n0p1" else "n0p1", ip_of(lab, target))
        assert (answer["who"], answer["pod"]) == ("pod", target)


def test_traffic_from_the_node_address_passes_untouched(lab: Lab) -> None:
    agent = lab.start_agent("n0")
    lab.app("n0p0")
    enrol(lab, agent, "n0p0")
    node = lab.topology.node("n0")

    sock = lab.connect(node.netns, ip_of(lab, "n0p0"), APP_PORT)
    answer = lab.exchange(sock, "probe")
    assert answer["who"] == "pod"
    assert answer["peer"][0] == str(node.ip)  # kubelet-style probe: seen from the node


def test_spoofed_source_connection_of_the_agent_gets_its_replies(lab: Lab) -> None:
    agent = lab.start_agent("n0")
    lab.app("n0p0")
    enrol(lab, agent, "n0p0")

    client_ip = ip_of(lab, "n1p0")  # an address of another node's pod
    answer = agent.request(op="dial", src=client_ip, dst=ip_of(lab, "n0p0"), port=APP_PORT)
    assert answer["answer"]["who"] == "pod"
    assert answer["answer"]["peer"][0] == client_ip  # the app sees the original client


def test_fail_closed_without_agent_then_fail_open(lab: Lab) -> None:
    agent = lab.start_agent("n0")
    lab.start_agent("n1")
    lab.app("n1p0")
    lab.app("n1p1")
    lab.app("n0p0")
    enrol(lab, agent, "n0p0")
    assert lab.ask("n0p0", ip_of(lab, "n1p0"))["who"] == "agent"

    agent.kill()
    assert_connect_fails(lab, "n0p0", ip_of(lab, "n1p0"))  # outbound of an enrolled pod
    assert_connect_fails(lab, "n1p0", ip_of(lab, "n0p0"))  # inbound to an enrolled pod
    assert lab.ask("n0p1", ip_of(lab, "n1p1"))["who"] == "pod"  # others are unaffected

    with CaptureMaps.open_pinned(lab.topology.node("n0").pin_dir) as maps:
        assert maps.fail_mode() is FailMode.CLOSED
        maps.set_fail_mode(FailMode.OPEN)
    answer = lab.ask("n0p0", ip_of(lab, "n1p0"))
    assert (answer["who"], answer["pod"]) == ("pod", "n1p0")  # passed untouched, direct
    assert answer["peer"][0] == ip_of(lab, "n0p0")


def test_fail_open_configured_at_start(lab: Lab) -> None:
    agent = lab.start_agent("n0", fail_mode="open")
    lab.app("n1p0")
    enrol(lab, agent, "n0p0")
    agent.kill()
    assert lab.ask("n0p0", ip_of(lab, "n1p0"))["who"] == "pod"


def test_restarted_agent_finds_pinned_state_without_reenrolling(lab: Lab, attach_mode: str) -> None:
    first = lab.start_agent("n0", attach=attach_mode)
    lab.app("n1p0")
    enrol(lab, first, "n0p0")
    assert lab.ask("n0p0", ip_of(lab, "n1p0"))["pid"] == first.pid
    first.kill()
    assert_connect_fails(lab, "n0p0", ip_of(lab, "n1p0"))

    second = lab.start_agent("n0")  # a new process: reloads with the pinned maps
    assert second.ready["enrolled"] == [ip_of(lab, "n0p0")]
    answer = lab.ask("n0p0", ip_of(lab, "n1p0"))
    assert (answer["who"], answer["pid"], answer["listener"]) == ("agent", second.pid, "outbound")
    assert answer["local"] == [ip_of(lab, "n1p0"), APP_PORT]

    # The new process replaced ours in place: still exactly one of ours per hook, first.
    node = lab.topology.node("n0")
    ours = set(second.ready["program_ids"].values())
    for ifname in (node.uplink_ifname, "vpod0", "vpod1"):
        for direction in ("ingress", "egress"):
            ids = hook_prog_ids(node.netns, ifname, direction)
            assert len(ids) == 1 and ids[0] in ours, (ifname, direction, ids)


def test_unenrol_restores_direct_traffic_and_is_idempotent(lab: Lab) -> None:
    agent = lab.start_agent("n0")
    lab.app("n1p0")
    enrol(lab, agent, "n0p0")
    enrol(lab, agent, "n0p0")
    assert agent.request(op="enrolled")["enrolled"] == [ip_of(lab, "n0p0")]
    assert lab.ask("n0p0", ip_of(lab, "n1p0"))["who"] == "agent"

    unenrol(lab, agent, "n0p0")
    unenrol(lab, agent, "n0p0")
    assert agent.request(op="enrolled")["enrolled"] == []
    answer = lab.ask("n0p0", ip_of(lab, "n1p0"))
    assert (answer["who"], answer["pod"]) == ("pod", "n1p0")


def test_coexists_with_other_filters_and_detach_leaves_them(
    lab: Lab, attach_mode: str, make_cni: Callable[[Any], PrimaryCni]
) -> None:
    agent = lab.start_agent("n0", attach=attach_mode)
    lab.app("n1p0")
    enrol(lab, agent, "n0p0")
    node = lab.topology.node("n0")
    # Another party's filters in the same clsact hook: one at the first priority (in
    # cls_bpf mode it lands ahead of ours), one at the last; both count port 8080.
    cni = make_cni(lab.topology)
    first = cni.program("count", watch_port=APP_PORT)
    last = cni.program("count", watch_port=APP_PORT)
    probe = cni.program("count", watch_port=9)
    first.attach_tc(node.netns, "vpod0", priority=1, handle=1)
    last.attach_tc(node.netns, "vpod0", priority=50000, handle=1)
    probe.attach_tc(node.netns, "vpod0", priority=50001, handle=1)
    hooks = agent.request(op="check")["hooks"]
    # tcx runs before every clsact filter; in cls_bpf mode ours was moved back in front.
    assert hooks["vpod0"]["state"] == "safe", hooks["vpod0"]
    assert hooks["vpod0"]["reorders"] == (1 if attach_mode == "cls_bpf" else 0)

    assert lab.ask("n0p0", ip_of(lab, "n1p0"))["who"] == "agent"
    # What we take ends the hook: the others never saw the captured connection...
    assert (first.seen(watched=True), last.seen(watched=True)) == (0, 0)
    # ...and what we leave alone goes on to them: here the pod's RST to the node.
    with pytest.raises(ConnectionRefusedError):
        lab.connect(node.netns, ip_of(lab, "n0p0"), 9)
    assert probe.seen(watched=True) >= 1

    # Our uninstall, from another process and by namespace name, leaves the others.
    config = CaptureConfig(
        node_addresses=(node.ip,), uplink_ifname="eth0", netns=node.netns, pin_dir=node.pin_dir
    )
    with Capture(config) as capture:
        capture.detach_all()
    with Netlink(node.netns) as nl:
        assert {(f.priority, f.handle) for f in nl.bpf_filters("vpod0")} == {
            (1, 1),
            (50000, 1),
            (50001, 1),
        }
    others = {first.prog_id, last.prog_id, probe.prog_id}
    assert set(hook_prog_ids(node.netns, "vpod0")) == others
    for ifname, direction in (("eth0", "ingress"), ("eth0", "egress"), ("vpod0", "egress")):
        assert hook_prog_ids(node.netns, ifname, direction) == []
    assert not (node.pin_dir / LINKS_DIR).exists() or not list((node.pin_dir / LINKS_DIR).iterdir())
    assert "fwmark" not in run_ip(node.netns, "rule", "show")

    answer = lab.ask("n0p0", ip_of(lab, "n1p0"))
    assert (answer["who"], answer["pod"]) == ("pod", "n1p0")  # no capture any more
    assert first.seen(watched=True) >= 3 and last.seen(watched=True) >= 3


def test_local_delivery_rule_is_idempotent(lab: Lab) -> None:
    node = lab.topology.node("n0")
    with Netlink(node.netns) as nl:
        for _ in range(2):
            nl.ensure_local_delivery(mark=0x400, table=100, priority=100)
        rules = run_ip(node.netns, "rule", "show")
        assert rules.count("fwmark 0x400/0x400 lookup 100") == 1, rules
        assert "local default dev lo" in run_ip(node.netns, "route", "show", "table", "100")
        for _ in range(2):
            nl.remove_local_delivery(mark=0x400, table=100, priority=100)
        assert "fwmark 0x400" not in run_ip(node.netns, "rule", "show")
        assert run_ip(node.netns, "route", "show", "table", "all").count("table 100") == 0


def run_ip(netns: str, *args: str) -> str:
    return subprocess.run(
        ["ip", "-n", netns, *args], capture_output=True, text=True, check=True
    ).stdout


def test_programs_on_pod_and_uplink_interfaces_are_ours(lab: Lab, attach_mode: str) -> None:
    agent = lab.start_agent("n0", attach=attach_mode)
    ids = agent.ready["program_ids"]
    node = lab.topology.node("n0")
    expect = {"eth0": UPLINK_PROGRAM, "vpod0": POD_PROGRAM, "vpod1": POD_PROGRAM}
    for ifname, program in expect.items():
        assert hook_prog_ids(node.netns, ifname) == [ids[program]], ifname
        assert hook_prog_ids(node.netns, ifname, "egress") == [ids[GUARD_PROGRAM]], ifname
    links = sorted(os.listdir(node.pin_dir / LINKS_DIR)) if attach_mode == "tcx" else []
    assert len(links) == (6 if attach_mode == "tcx" else 0), links  # 3 interfaces x 2 hooks


def test_capture_driven_from_outside_the_node_namespace_and_uninstalled(lab: Lab) -> None:
    """The facade on a named namespace (as a node-level tool would use it), then uninstall."""
    node = lab.topology.node("n0")
    lab.app("n1p0")

    def listener() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        sock.bind(("0.0.0.0", 15001))
        sock.listen(8)
        return sock

    outbound = call_in_netns(node.netns, listener)  # lives in the node namespace
    pod = lab.topology.pod("n0p0")
    config = CaptureConfig(
        node_addresses=(node.ip,),
        uplink_ifname=node.uplink_ifname,
        pin_dir=node.pin_dir,
        netns=node.netns,
    )
    try:
        with Capture(config) as capture:
            capture.start({"outbound": outbound.fileno()})
            capture.enrol(PodEnrolment("lab", pod.name, pod.host_ifname, (pod.ip,)))
            assert capture.enrolled() == {pod.ip: capture_ifindex(node.netns, "vpod0")}

            client = lab.connect(pod.netns, lab.topology.pod("n1p0").ip, APP_PORT)
            outbound.settimeout(IO_TIMEOUT)
            accepted, peer = outbound.accept()
            with accepted:
                assert accepted.getsockname() == (ip_of(lab, "n1p0"), APP_PORT)
                assert peer[0] == str(pod.ip)
                client.sendall(b"ping")
                assert accepted.recv(4) == b"ping"
                accepted.sendall(b"pong")
                assert client.recv(4) == b"pong"

            capture.close(keep_pins=False)
        assert not node.pin_dir.exists()
        for ifname in ("vpod0", "eth0"):
            for direction in ("ingress", "egress"):
                assert hook_prog_ids(node.netns, ifname, direction) == []
        answer = lab.ask("n0p0", ip_of(lab, "n1p0"))
        assert answer["who"] == "pod"  # uninstalled: direct again
    finally:
        outbound.close()


def capture_ifindex(netns: str, ifname: str) -> int:
    with Netlink(netns) as nl:
        index = nl.ifindex(ifname)
    assert index is not None
    return index


def lab_leftovers(prefix: str) -> list[str]:
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    found = [line.split()[0] for line in netns.stdout.splitlines() if line.startswith(prefix)]
    for bpffs in (topology.BPFFS_DIR, Path("/sys/fs/bpf")):
        found += [str(bpffs / e) for e in os.listdir(bpffs) if e.startswith(prefix)]
    if topology.state_file(prefix[:-1]).exists():
        found.append(str(topology.state_file(prefix[:-1])))
    return found


def test_teardown_leaves_no_namespace_pin_or_state(make_lab: Callable[[int, int], Lab]) -> None:
    own = make_lab(2, 1)
    topo = own.topology
    agent = own.start_agent("n0")
    enrol(own, agent, "n0p0")
    pinned = set(os.listdir(topo.node("n0").pin_dir)) - {LINKS_DIR}
    assert pinned == {*MAP_NAMES, *PROGRAM_NAMES}
    assert topology.load(topo.lab_id) == topo
    assert len(lab_leftovers(topo.prefix)) > 1

    topology.teardown(topo.prefix)  # also stops the agent still running in n0

    assert lab_leftovers(topo.prefix) == []
    assert topo.lab_id not in topology.list_labs()
    assert agent.proc.wait(timeout=10) != 0


# --- the loader process and the agent's memory ---------------------------------------------

BCC_LIBRARY_PREFIXES = ("libbcc", "libllvm", "libclang")
# An idle agent is ~50 MB; `import bcc` alone adds ~60 MB and compiling ~110 MB more. The
# bound catches bcc coming back into the agent without being sensitive to small changes.
AGENT_RSS_LIMIT_KB = 100 * 1024


def bcc_libraries(pid: int) -> list[str]:
    """Shared libraries of bcc (libbcc and the LLVM/clang it links) mapped in a process."""
    found = set()
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split()
            path = fields[5] if len(fields) > 5 else ""
            if os.path.basename(path).lower().startswith(BCC_LIBRARY_PREFIXES):
                found.add(path)
    return sorted(found)


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def test_stand_in_agent_never_imports_bcc(lab: Lab) -> None:
    agent = lab.start_agent("n0")
    enrol(lab, agent, "n0p0")
    assert agent.request(op="loaded")["bcc_imported"] is False
    assert bcc_libraries(agent.pid) == []
    # The loader process did the compiling and pinned the programs next to the maps.
    pin_dir = lab.topology.node("n0").pin_dir
    assert set(agent.ready["program_ids"]) == set(PROGRAM_NAMES)
    assert {name for name in PROGRAM_NAMES if (pin_dir / name).exists()} == set(PROGRAM_NAMES)


def test_real_agent_has_no_bcc_and_a_small_footprint() -> None:
    """`ztunnel run --capture ebpf`, as `lab up` starts it: captures, but maps no bcc/LLVM."""
    t = runner.up(nodes=1, pods=1)
    try:
        node = t.node("n0")
        pid = int((runner.lab_dir(t.lab_id) / node.name / "agent.pid").read_text())
        assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[3:6] == [
            b"run",
            b"--capture",
            b"ebpf",
        ]
        assert bcc_libraries(pid) == []
        assert rss_kb(pid) < AGENT_RSS_LIMIT_KB, f"agent RSS {rss_kb(pid)} kB"
        with CaptureMaps.open_pinned(node.pin_dir) as maps:  # and it did capture
            assert set(maps.enrolled()) == {t.pod("n0p0").ip}
        assert hook_prog_ids(node.netns, node.uplink_ifname)
    finally:
        runner.down(t.lab_id)


def test_restart_replaces_pinned_programs_and_reattaches_them(lab: Lab, attach_mode: str) -> None:
    node = lab.topology.node("n0")
    first = lab.start_agent("n0", attach=attach_mode)
    lab.app("n1p0")
    enrol(lab, first, "n0p0")
    old_ids = first.ready["program_ids"]
    assert hook_prog_ids(node.netns, "vpod0") == [old_ids[POD_PROGRAM]]
    assert hook_prog_ids(node.netns, node.uplink_ifname) == [old_ids[UPLINK_PROGRAM]]
    first.kill()
    # While no agent runs the programs stay attached (tcx links are pinned).
    assert hook_prog_ids(node.netns, "vpod0") == [old_ids[POD_PROGRAM]]

    second = lab.start_agent("n0", attach=attach_mode)
    new_ids = second.ready["program_ids"]
    assert sorted(second.ready["maps_reused"]) == sorted(MAP_NAMES)  # the live state
    assert second.ready["enrolled"] == [ip_of(lab, "n0p0")]
    assert set(new_ids.values()).isdisjoint(old_ids.values())  # freshly loaded programs
    for ifname in ("vpod0", "vpod1"):
        assert hook_prog_ids(node.netns, ifname) == [new_ids[POD_PROGRAM]]
        assert hook_prog_ids(node.netns, ifname, "egress") == [new_ids[GUARD_PROGRAM]]
    assert hook_prog_ids(node.netns, node.uplink_ifname) == [new_ids[UPLINK_PROGRAM]]
    # The pins now name the new programs, and nothing temporary is left in the pin dir.
    assert set(os.listdir(node.pin_dir)) - {LINKS_DIR} == {*MAP_NAMES, *PROGRAM_NAMES}
    answer = lab.ask("n0p0", ip_of(lab, "n1p0"))
    assert (answer["who"], answer["pid"]) == ("agent", second.pid)


BROKEN_PROGRAM = """
#include <uapi/linux/bpf.h>
int capture_pod(struct __sk_buff *skb) { return undeclared_identifier_xyz; }
"""


def start_capture(config: CaptureConfig) -> None:
    with Capture(config) as capture:
        capture.start({})


def test_loader_errors_reach_the_caller_with_the_loaders_message(
    make_lab: Callable[[int, int], Lab], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = make_lab(1, 1).topology.node("n0")  # a pin dir on the lab's bpffs
    base = CaptureConfig(node_addresses=(node.ip,), pin_dir=node.pin_dir, netns=node.netns)

    # A compile error: the compiler's own message, with the line, comes along.
    source = tmp_path / "broken.c"
    source.write_text(BROKEN_PROGRAM)
    with pytest.raises(CaptureError) as info:
        start_capture(replace(base, bpf_source=source))
    message = str(info.value)
    assert message.startswith(f"BPF loader: compiling {source} failed"), message
    assert "undeclared_identifier_xyz" in info.value.log, message

    # A pin directory that is not on a bpffs.
    not_bpffs = tmp_path / "pins"
    with pytest.raises(CaptureError) as info:
        start_capture(replace(base, pin_dir=not_bpffs))
    assert "is not on a bpffs" in str(info.value)
    assert not not_bpffs.exists()

    # No kernel headers where bcc looks for them.
    monkeypatch.setenv("BCC_KERNEL_SOURCE", str(tmp_path / "no-headers"))
    with pytest.raises(CaptureError) as info:
        start_capture(base)
    # (the loader's own check, ztunnel.capture.headers, says what to install or mount)
    message = str(info.value)
    assert "no kernel headers for the running kernel" in message, message
    assert "BCC_KERNEL_SOURCE=" in message and "linux-headers-" in message, message

    # A missing source file, and nothing was pinned by any of the failed loads.
    monkeypatch.delenv("BCC_KERNEL_SOURCE")
    with pytest.raises(CaptureError, match="not found"):
        start_capture(replace(base, bpf_source=tmp_path / "x.c"))
    assert os.listdir(node.pin_dir) == []

    # tcx asked for on a kernel without it: refused before anything is loaded.
    if not kernel_has_tcx():
        with pytest.raises(CaptureError, match="no tcx"):
            start_capture(replace(base, attach="tcx"))
