"""Kernel lab, Kubernetes mode: pods get their network from the real `bridge` + `host-local`
plugins with `ztunnel-cni` chained after them (run exactly as a runtime does), real agents
with eBPF capture, the API server stand-in and the enrolment controllers. Ambient pods come
out captured (only TLS on the wire between nodes), the others untouched; and the demo's
whole Kubernetes story passes."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

import pytest

from tests.lab.test_lab_e2e import WireCapture
from ztunnel.lab import k8s, k8sdemo, runner
from ztunnel.lab import topology as topo
from ztunnel.lab.k8s import KubeLab

pytestmark = pytest.mark.lab


@pytest.fixture
def bridge_lab() -> Iterator[KubeLab]:
    if os.geteuid() != 0:
        pytest.fail("kernel lab tests need root")
    lab = k8s.up(2, "bridge")
    try:
        yield lab
    finally:
        for node in lab.topology.nodes:  # shown when the test fails
            for f in (
                runner.lab_dir(lab.topology.lab_id) / node.name / "agent.log",
                lab.node_dir(node) / "controller.log",
            ):
                print(f"--- {f}\n{runner._tail(f, 40)}")
        # The bridge plugin leaves its bridge behind on DEL: remove it (in our node namespaces).
        for node in lab.topology.nodes:
            with contextlib.suppress(topo.LabError):
                topo._run(["ip", "-n", node.netns, "link", "del", "cni0"])
        k8s.down(lab)


def test_bridge_host_local_chain_ambient_pods_captured_others_untouched(
    bridge_lab: KubeLab,
) -> None:
    lab = bridge_lab
    lab.create_namespace("shop", {"istio.io/dataplane-mode": "ambient"})
    lab.create_namespace("legacy")
    for ns, name, node in (
        ("shop", "a", "n0"),
        ("shop", "b", "n1"),
        ("legacy", "c", "n0"),
        ("legacy", "d", "n1"),
    ):
        lab.create_pod(ns, name, node, "echo" if ns == "shop" else "default", {"app": name})
    pods = {
        name: lab.wait_running(ns, name)
        for ns, name in (("shop", "a"), ("shop", "b"), ("legacy", "c"), ("legacy", "d"))
    }
    ip = {name: p["status"]["podIP"] for name, p in pods.items()}
    # The chain as the runtime ran it: bridge, then ztunnel-cni, which saw two host-side
    # interfaces (cni0 and the veth) and let the agent resolve the veth from the pod's netns.
    runs = [(r.pod, r.plugin) for r in lab.runtimes["n0"].runs if r.command == "ADD" and r.ok]
    assert ("shop/a", "bridge") in runs and ("shop/a", "ztunnel-cni") in runs
    agent_n0 = lab.agent_pods(lab.topology.node("n0"))
    assert agent_n0["shop/a"]["enrolled"] is True and agent_n0["legacy/c"]["enrolled"] is False
    assert (
        agent_n0["shop/a"]["ifname"].startswith("veth")
        and agent_n0["shop/a"]["ifname"] == lab.sandbox("shop", "a").host_ifname
    )
    assert topo.wait_until(
        lambda: (
            (lab.pod("shop", "a")["metadata"].get("annotations") or {}).get(
                "ambient.istio.io/redirection"
            )
            == "enabled"
        ),
        20,
    )
    for node in lab.topology.nodes:
        assert lab.mesh_has(node, ip["b"], "HBONE", 20) and lab.mesh_has(node, ip["a"], "HBONE", 20)
    t = lab.as_topology()
    cap = WireCapture(t.network_netns)
    secret = f"K8S-SECRET-{time.monotonic_ns()}"
    clear = f"K8S-CLEAR-{time.monotonic_ns()}"
    try:
        res = runner.call_from(t.pod("a").netns, ip["b"], 8080, secret)
        assert res["ok"], res
        assert res["server_saw"].split(":")[0] == ip["a"]  # the app sees the real client
        assert runner.call_from(t.pod("c").netns, ip["d"], 8080, clear)["ok"]
        # Same node, bridged at layer 2 (never through the node's stack): not captured, but the
        # egress guard drops an enrolled pod's forwarded SYN, so it never leaves in plaintext.
        same = runner.call_from(t.pod("a").netns, ip["c"], 8080, secret, timeout=1.5)
        assert not same["ok"], same
        # Not ambient -> ambient, across nodes: captured on the destination's uplink.
        res = runner.call_from(t.pod("c").netns, ip["b"], 8080, "from-legacy")
        assert res["ok"] and res["server_saw"].split(":")[0] == ip["c"], res
    finally:
        wire = cap.stop(clear.encode())
    assert clear.encode() in wire, "the capture saw no plaintext at all: the check is blind"
    assert secret.encode() not in wire, "an ambient pod's traffic crossed the wire in plaintext"
    assert b"\x17\x03\x03" in wire  # TLS application data
    # Deleting the pod runs DEL through the chain in reverse and the agent forgets it.
    lab.api.store.delete(k8s.PODS, "shop", "a")
    assert topo.wait_until(lambda: "shop/a" not in lab.agent_pods(lab.topology.node("n0")), 20)

    def dels() -> list[str]:
        return [
            r.plugin for r in lab.runtimes["n0"].runs if r.command == "DEL" and r.pod == "shop/a"
        ]

    assert topo.wait_until(lambda: len(dels()) == 2, 20)
    assert dels() == ["ztunnel-cni", "bridge"]  # the chain in reverse


def test_the_kubernetes_demo_story_passes(capsys: pytest.CaptureFixture[str]) -> None:
    if os.geteuid() != 0:
        pytest.fail("kernel lab tests need root")
    rc = k8sdemo.main(2, 3)
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "kubectl label -> captured mTLS traffic" in out and "checks passed" in out
