"""The kernel lab with a test istiod (`ztunnel lab up --istiod`): the agents take mesh state
and certificates over delta xDS and the Istio CA protocol from `python -m ztunnel.lab.istiod`
running in the lab's network namespace; the demo flows behave as with the file, a policy pushed
over xDS closes a live connection it now denies, and an istiod outage changes nothing for
traffic."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from ztunnel.lab import demo, istiod_lab, runner
from ztunnel.lab import topology as topo
from ztunnel.lab.topology import Topology

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def istiod_lab_up() -> Iterator[Topology]:
    t = runner.up(nodes=2, pods=3, istiod=True)
    try:
        yield t
    finally:
        runner.down(t.lab_id)


def ctl(t: Topology, node: str, *args: str) -> subprocess.CompletedProcess[str]:
    argv = topo.netns_exec_argv(t.node(node).netns, [sys.executable, "-m", "ztunnel", "ctl", *args])
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


def test_agents_sync_from_istiod_and_the_demo_flows_pass(istiod_lab_up: Topology) -> None:
    t = istiod_lab_up
    for node in t.nodes:
        assert "--xds-address" in runner.agent_argv(t, node)
        dump = json.loads(ctl(t, node.name, "config-dump", "-o", "json").stdout)
        xds = dump["istiod"]["xds"]
        assert xds["connected"] and xds["synced"], xds
        assert (
            xds["node_id"]
            == f"ztunnel~{node.ip}~ztunnel-{node.name}.istio-system~istio-system.svc.cluster.local"
        )
        assert dump["istiod"]["ca"]["requests"] >= 1 and not dump["istiod"]["ca"]["last_error"]
        table = ctl(t, node.name, "xds")
        assert table.returncode == 0 and "istio.workload.Address" in table.stdout
    rows = demo.run(t, lambda _m: None)
    assert [r[0] for r in rows if r[-1] != "PASS"] == []
    cross = next(r for r in rows if r[0] == "enrolled -> enrolled, cross node")
    assert cross[3] == "ns/frontend/sa/web -> ns/shop/sa/echo"


def test_policy_pushed_over_xds_closes_a_live_connection(istiod_lab_up: Topology) -> None:
    t = istiod_lab_up
    echo = t.pod("n1p1")
    closed, how = istiod_lab.live_connection_closed_by_push(
        t, "n0p0", str(echo.ip), 8080, istiod_lab.DENY_WEB
    )
    assert closed, how
    # Restored: new connections pass again once the removal reached the agent.
    deadline = time.monotonic() + 10
    while not runner.call_from(t.pod("n0p0").netns, str(echo.ip), 8080, "again")["ok"]:
        assert time.monotonic() < deadline, "the policy removal did not reach the agent"
        time.sleep(0.2)


def test_istiod_outage_keeps_traffic_flowing(istiod_lab_up: Topology) -> None:
    t = istiod_lab_up
    info = json.loads((runner.lab_dir(t.lab_id) / "istiod" / "istiod.json").read_text())
    os.kill(info["pid"], signal.SIGTERM)
    deadline = time.monotonic() + 10
    while True:
        dump = json.loads(ctl(t, "n1", "config-dump", "-o", "json").stdout)
        if not dump["istiod"]["xds"]["connected"]:
            break
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert runner.agent_ready(t.node("n1"))[0]
    res = runner.call_from(t.pod("n0p0").netns, str(t.pod("n1p1").ip), 8080, "while-down")
    assert res["ok"], res
    assert dump["istiod"]["xds"]["last_error"]
