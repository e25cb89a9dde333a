"""The node agent killed with SIGKILL in the middle of traffic (no drain, no clean-up): the
pinned BPF maps keep its pods enrolled and fail closed (nothing reaches them or leaves them
around the agent, nothing crosses the wire in plaintext), and a restarted agent serves again
with the same enrolments."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest

from tests.lab.test_lab_e2e import WireCapture
from ztunnel.enrolment import request
from ztunnel.lab import runner
from ztunnel.lab import topology as topo
from ztunnel.lab.topology import Topology

pytestmark = [pytest.mark.lab, pytest.mark.timeout(240)]


@pytest.fixture
def crash_lab() -> Iterator[Topology]:
    t = runner.up(nodes=2, pods=3)
    try:
        yield t
    finally:
        runner.down(t.lab_id)


def test_sigkill_during_traffic_fails_closed_and_a_restart_serves_again(
    crash_lab: Topology,
) -> None:
    t = crash_lab
    n1 = t.node("n1")
    server = t.pod("n1p1")  # enrolled echo on the node whose agent dies
    marker = f"CRASH-MARKER-{time.monotonic_ns()}"
    clear = f"CLEAR-{marker}"
    cap = WireCapture(t.network_netns)
    results: list[tuple[float, bool]] = []
    stop = threading.Event()

    def traffic() -> None:
        for _ in range(400):  # bounded
            if stop.is_set():
                return
            r = runner.call_from(t.pod("n0p0").netns, str(server.ip), 8080, marker, timeout=1.0)
            results.append((time.monotonic(), bool(r.get("ok"))))

    th = threading.Thread(target=traffic, daemon=True)
    th.start()
    try:
        assert topo.wait_until(lambda: any(ok for _, ok in results), 20), results
        pid = int((runner.lab_dir(t.lab_id) / n1.name / "agent.pid").read_text())
        os.kill(pid, signal.SIGKILL)
        down_at = time.monotonic()
        assert topo.wait_until(lambda: not runner._alive(pid), 10)
        # Fail closed while no agent runs: calls from the other node fail...
        assert topo.wait_until(
            lambda: sum(1 for ts, _ in results if ts > down_at + 0.3) >= 3, 30
        ), results
        assert not any(ok for ts, ok in results if ts > down_at + 0.3), results
        # ...plaintext from an unenrolled pod does not reach the enrolled pod around the agent...
        legacy = runner.call_from(t.pod("n1p2").netns, str(server.ip), 8080, "around", 1.0)
        assert not legacy["ok"], legacy
        # ...and the enrolled pod's own new connections do not leave uncaptured.
        out = runner.call_from(server.netns, str(t.pod("n0p1").ip), 8080, marker, 1.0)
        assert not out["ok"], out
        runner.start_agent(t, n1)
        runner.wait_agent(t, n1)
        up_at = time.monotonic()
        assert topo.wait_until(lambda: any(ok for ts, ok in results if ts > up_at), 20), (
            "no connection succeeded after the restart"
        )
        recovered = min(ts for ts, ok in results if ok and ts > up_at) - up_at
        assert recovered < 10, recovered
        assert runner.call_from(server.netns, str(t.pod("n0p1").ip), 8080, "back", 3.0)["ok"]
        # A flow that is never captured, in the same capture: proves the check can see.
        assert runner.call_from(t.pod("n0p2").netns, str(t.pod("n1p2").ip), 8080, clear)["ok"]
    finally:
        stop.set()
        th.join(60)
        wire = cap.stop(clear.encode())
    assert clear.encode() in wire, "the capture is blind"
    assert marker.encode() not in wire.replace(clear.encode(), b""), (
        "captured traffic crossed the wire in plaintext"
    )
    pods = request(runner.enrolment_socket(t, n1), {"op": "list"})["pods"]
    assert pods["shop/n1p1"]["enrolled"] is True
