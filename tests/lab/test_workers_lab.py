"""Agents with two worker processes (`ztunnel run --workers 2`) in the kernel lab: the eBPF
capture's bpf_sk_assign lands connections on both workers of the SO_REUSEPORT group, /metrics
counts every worker's connections, a policy change closes live connections held by every
worker, and a killed worker is restarted while the other keeps serving."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from ztunnel.lab import runner
from ztunnel.lab import topology as topo
from ztunnel.lab.topology import NodeSpec, Topology
from ztunnel.workers.supervisor import SHARING_OVERRIDE

pytestmark = [pytest.mark.lab, pytest.mark.timeout(240)]

CALLS = 24  # enough that a 2-way hash leaves neither worker without one (2 * 0.5**24)


@pytest.fixture(scope="module")
def workers_lab() -> Iterator[Topology]:
    t = runner.up(nodes=2, pods=3, agent_args=("--workers", "2"))
    try:
        yield t
    finally:
        runner.down(t.lab_id)


def dump(node: NodeSpec) -> dict[str, Any]:
    code, body = runner._http_in(node.netns, runner.ADMIN_PORT, "/config_dump")
    assert code == 200, body
    out: dict[str, Any] = json.loads(body)
    return out


def processes(node: NodeSpec) -> list[dict[str, Any]]:
    procs: list[dict[str, Any]] = dump(node)["workers"]["processes"]
    return procs


def metric(node: NodeSpec, name: str) -> float:
    code, body = runner._http_in(node.netns, runner.STATS_PORT, "/metrics")
    assert code == 200
    for line in body.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def calls(t: Topology, n: int, marker: str, src: str = "n0p0") -> list[dict[str, Any]]:
    """`n` connections to the enrolled echo on n1: from n0p0 (enrolled: captured on n0's 15001,
    HBONE to n1's 15008) or from n0p2 (not enrolled: captured on n1's 15006)."""
    server = t.pod("n1p1")
    return [
        runner.call_from(t.pod(src).netns, str(server.ip), 8080, f"{marker}-{i}", timeout=10)
        for i in range(n)
    ]


def test_connections_spread_over_both_workers_on_both_sides(workers_lab: Topology) -> None:
    t = workers_lab
    before = {n.name: [p["total_opened"] for p in processes(n)] for n in t.nodes}
    assert all(len(v) == 2 for v in before.values()), before
    # Each captured connection is hashed over the group on its own. HBONE multiplexes: n1's
    # 15008 sees n0's pooled connections (one per n0 worker here), not one per call, so the
    # destination side is shown with plaintext connections captured on its 15006.
    results = calls(t, CALLS, "spread") + calls(t, CALLS, "spread", src="n0p2")
    assert all(r["ok"] for r in results), results

    def spread() -> dict[str, list[int]]:
        return {
            n.name: [
                p["total_opened"] - b for p, b in zip(processes(n), before[n.name], strict=True)
            ]
            for n in t.nodes
        }

    # The workers push their counts every second: wait for all of them to be seen.
    assert topo.wait_until(
        lambda: sum(spread()["n0"]) >= CALLS and sum(spread()["n1"]) >= 2 * CALLS, 10, 0.2
    ), spread()
    got = spread()
    # Outbound (captured on n0, 15001) and inbound (15006 on n1): both workers served.
    assert all(min(v) > 0 for v in got.values()), got


def test_metrics_count_every_workers_connections(workers_lab: Topology) -> None:
    t = workers_lab
    n1 = t.node("n1")
    key = "istio_tcp_connections_opened[destination]"

    def opened() -> float:
        return runner.metrics_totals(n1).get(key, 0.0)

    assert metric(n1, "ztunnel_workers") == 2
    start = opened()
    results = calls(t, 10, "metrics")
    assert all(r["ok"] for r in results), results
    assert topo.wait_until(lambda: opened() - start >= 10, 10, 0.2), (start, opened())
    # Exactly the ten: summed over the processes, nothing counted twice.
    assert opened() - start == 10


def _hold(t: Topology, n: int, src: str) -> list[socket.socket]:
    server = t.pod("n1p1")

    def connect() -> socket.socket:
        s = socket.create_connection((str(server.ip), 8080), timeout=10)
        f = s.makefile("rb")
        assert f.readline().startswith(b"hello from ")  # through both agents, up to the app
        return s

    return [topo.call_in_netns(t.pod(src).netns, connect) for _ in range(n)]


def _closed(s: socket.socket) -> bool:
    s.settimeout(0.05)
    try:
        return s.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def test_policy_change_closes_live_connections_in_every_worker(workers_lab: Topology) -> None:
    t = workers_lab
    n1 = t.node("n1")
    # Held through both of n0's workers (HBONE) and through both of n1's (plaintext on 15006).
    held = _hold(t, 12, "n0p0") + _hold(t, 12, "n0p2")
    mesh = runner.lab_dir(t.lab_id) / "mesh.yaml"
    original = mesh.read_text()
    try:

        def owners() -> set[int]:
            live = dump(n1)["connections"]["live"]
            return {int(c.get("worker", 0)) for c in live}

        # Both workers of the destination hold some of them (the live list of a worker
        # arrives with its next push after the first /config_dump asked for it).
        assert topo.wait_until(lambda: owners() == {0, 1}, 10, 0.3), dump(n1)["connections"]
        state = runner.mesh_state(t)
        state["policies"].append(
            {
                "name": "deny-echo",
                "namespace": "shop",
                "scope": "Namespace",
                "action": "Deny",
                "rules": [[[{"destinationPorts": [8080]}]]],
            }
        )
        mesh.write_text(yaml.safe_dump(state, sort_keys=False))
        assert topo.wait_until(lambda: all(_closed(s) for s in held), 20, 0.2), [
            _closed(s) for s in held
        ]
    finally:
        mesh.write_text(original)
        for s in held:
            with contextlib.suppress(OSError):
                s.close()
    # Allowed again once the policy is gone (every worker has the restored state).
    assert topo.wait_until(lambda: all(r["ok"] for r in calls(t, 4, "again")), 20, 0.5)


def test_killed_worker_is_restarted_while_the_other_serves(workers_lab: Topology) -> None:
    t = workers_lab
    n1 = t.node("n1")
    victim = processes(n1)[1]
    assert victim["ready"], victim
    restarts = metric(n1, "ztunnel_worker_restarts_total")
    os.kill(int(victim["pid"]), signal.SIGKILL)
    # Served meanwhile: connections hashed to the other worker at once, those hashed to the
    # killed one's socket (kept open by the agent) when its replacement accepts them.
    results = calls(t, 8, "during-restart")
    assert all(r["ok"] for r in results), results

    def replaced() -> bool:
        p = processes(n1)[1]
        return bool(p["ready"]) and p["pid"] != victim["pid"] and p["restarts"] == 1

    assert topo.wait_until(replaced, 30, 0.2), processes(n1)
    assert metric(n1, "ztunnel_worker_restarts_total") == restarts + 1
    ok, detail = runner.agent_ready(n1)
    assert ok, detail
    log = (runner.lab_dir(t.lab_id) / "n1" / "agent.log").read_text(errors="replace")
    assert f"(pid {victim['pid']}) exited with signal SIGKILL" in log
    results = calls(t, CALLS, "after-restart")
    assert all(r["ok"] for r in results), results


def test_sigterm_drains_every_worker_and_the_agent_exits(workers_lab: Topology) -> None:
    """Last of the module's tests on this lab: it stops n1's agent."""
    t = workers_lab
    n1 = t.node("n1")
    pids = [int(p["pid"]) for p in processes(n1)]
    log_path = runner.lab_dir(t.lab_id) / "n1" / "agent.log"
    offset = log_path.stat().st_size
    os.kill(pids[0], signal.SIGTERM)
    # Drain timeout 2 s in the lab: everyone is gone well before runner's SIGKILL would be.
    assert topo.wait_until(lambda: not any(runner._alive(p) for p in pids), 15, 0.1), pids
    with open(log_path, "rb") as f:
        f.seek(offset)
        tail = f.read().decode(errors="replace")
    assert tail.count("draining:") >= 2, tail  # the agent's process and the worker each drain
    assert "exited with" not in tail, tail  # no worker counted as crashed during the drain


def test_shared_accept_queue_fallback_serves_and_restarts() -> None:
    """Kernels before 6.5 cannot sk_assign into a reuseport group: the workers then share one
    socket per port (forced here on a newer kernel with the tests-only override)."""
    os.environ[SHARING_OVERRIDE] = "shared"
    try:
        t = runner.up(nodes=2, pods=3, agent_args=("--workers", "2"))
    finally:
        del os.environ[SHARING_OVERRIDE]
    try:
        n0 = t.node("n0")
        assert dump(n0)["workers"]["sharing"] == "shared"
        results = calls(t, 8, "shared") + calls(t, 8, "shared", src="n0p2")
        assert all(r["ok"] for r in results), results
        victim = processes(n0)[1]
        os.kill(int(victim["pid"]), signal.SIGKILL)
        results = calls(t, 8, "shared-restart")
        assert all(r["ok"] for r in results), results
        assert topo.wait_until(
            lambda: processes(n0)[1]["pid"] != victim["pid"] and processes(n0)[1]["ready"],
            30,
            0.2,
        ), processes(n0)
    finally:
        runner.down(t.lab_id)
