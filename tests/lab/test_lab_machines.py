"""A lab spread over two machines (the two-VM setup of vagrant/), simulated with namespaces:
`vm0` and `vm1` stand for the VMs, each with a NIC (a veth) on a shared `wire` bridge (their
private network). Each machine builds only its own node around that NIC, with one shared CA;
every flow from machine 0's pods behaves as in the one-machine lab, and what crosses the wire
between the machines is TLS for captured traffic."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab.test_lab_e2e import WireCapture
from ztunnel.ca import CertificateAuthority
from ztunnel.lab import demo, machines, runner
from ztunnel.lab import topology as topo
from ztunnel.lab.topology import LabError, Topology

pytestmark = pytest.mark.lab


def quiet(_msg: str) -> None:
    pass


@pytest.fixture
def vms() -> Iterator[tuple[str, list[str]]]:
    """(wire namespace, [vm0, vm1]): each vm has `eth1` bridged on the wire; all removed."""
    prefix = topo.new_lab_id() + "-"
    wire, vm = f"{prefix}wire", [f"{prefix}vm0", f"{prefix}vm1"]
    try:
        for ns in (wire, *vm):
            topo._add_netns(ns, topo._BASE_SYSCTLS)
        topo._ip(wire, "link add name br0 type bridge")
        topo._ip(wire, "link set br0 up")
        for i, ns in enumerate(vm):
            topo._ip(wire, f"link add name port{i} type veth peer name eth1 netns {ns}")
            topo._ip(wire, f"link set port{i} master br0 up")
        topo._ip(vm[0], "addr add 192.168.77.11/24 dev eth1")  # as Vagrant configures it
        yield wire, vm
    finally:
        topo.teardown(prefix)


def test_two_machines_carry_hbone_over_their_network(
    vms: tuple[str, list[str]], tmp_path: Path
) -> None:
    wire, vm = vms
    CertificateAuthority.create("cluster.local").save(tmp_path / "ca")
    labs: list[Topology] = []
    try:
        labs.append(machines.up(1, 2, 3, "eth1", tmp_path / "ca", device_netns=vm[1]))
        # Machine 0 names its NIC by the address it carries (as Vagrant's private network has).
        labs.append(machines.up(0, 2, 3, "192.168.77.11", tmp_path / "ca", device_netns=vm[0]))
        m1, m0 = labs
        # Each machine holds only its own node and pods.
        here = set(topo.list_netns())
        assert {n.netns for n in m0.nodes} & here == {m0.nodes[0].netns}
        assert {n.netns for n in m1.nodes} & here == {m1.nodes[1].netns}
        assert m0.nodes[0].uplink_ifname == "eth1"
        local = machines.local_node(m0)
        cap = WireCapture(wire)
        secret = f"CROSS-MACHINE-SECRET-{time.monotonic_ns()}"
        clear = f"CROSS-MACHINE-CLEAR-{time.monotonic_ns()}"
        try:
            rows = demo.run(m0, quiet, machines.flows(m0, local))
            far = m1.nodes[1].pods
            sent = runner.call_from(m0.pod("n0p0").netns, str(far[1].ip), 8080, secret)
            plain = runner.call_from(m0.pod("n0p2").netns, str(far[2].ip), 8080, clear)
        finally:
            wire_bytes = cap.stop(clear.encode())
        assert [r[-1] for r in rows] == ["PASS"] * len(rows), demo.table(rows, [""] * 7)
        assert rows[0][2].startswith(f"15001 -> HBONE {far[1].ip}:15008"), rows[0]
        assert sent["ok"] and plain["ok"], (sent, plain)
        assert sent["server_saw"].split(":")[0] == str(m0.pod("n0p0").ip)
        assert clear.encode() in wire_bytes, "the capture saw no plaintext: it is blind"
        assert secret.encode() not in wire_bytes, "captured traffic crossed in plaintext"
        assert b"\x17\x03\x03" in wire_bytes  # TLS application data
    finally:
        for t in labs:
            with contextlib.suppress(LabError):
                runner.down(t.lab_id)
    assert not [ns for ns in topo.list_netns() for t in labs if ns.startswith(t.prefix)]


def test_bad_machine_arguments_are_clear_errors(tmp_path: Path) -> None:
    CertificateAuthority.create("cluster.local").save(tmp_path / "ca")
    with pytest.raises(LabError, match=r"index must be 0\.\.1"):
        machines.plan(2, 2, 3, "eth1")
    with pytest.raises(LabError, match=r"machines must be 2\.\."):
        machines.plan(0, 1, 3, "eth1")
    with pytest.raises(LabError, match=r"no network device carries 198\.51\.100\.7"):
        machines.resolve_device("198.51.100.7")
    with pytest.raises(LabError, match="no network device ztnotthere0"):
        machines.resolve_device("ztnotthere0")
    with pytest.raises(LabError, match="shared CA"):
        machines.up(0, 2, 3, "eth1", tmp_path / "missing")
    before = set(topo.list_netns())
    with pytest.raises(LabError):
        machines.up(0, 2, 3, "ztnotthere0", tmp_path / "ca")
    assert set(topo.list_netns()) == before, "a failed start left namespaces behind"
