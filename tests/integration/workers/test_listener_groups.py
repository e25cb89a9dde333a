"""The workers' listener groups on loopback (`ztunnel.workers.supervisor.ListenerGroups`, root
for IP_TRANSPARENT): one SO_REUSEPORT socket per worker on one port, connections spread over
them by the kernel, and a port already taken (a leftover agent) refused instead of joined."""

from __future__ import annotations

import os
import select
import socket

import pytest

from ztunnel.testing import free_ports
from ztunnel.workers.plan import WorkerPlan
from ztunnel.workers.supervisor import ListenerGroups

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        pytest.fail("transparent listeners need root (the test suite runs as root)")


def test_one_reuseport_socket_per_worker_and_the_kernel_spreads_connections() -> None:
    (port,) = free_ports(1)
    groups = ListenerGroups(WorkerPlan(3, "reuseport", "test"))
    first = groups.listen("inbound", "127.0.0.1", port, True)
    socks = groups.groups["inbound"]
    try:
        assert socks[0] is first and len({s.fileno() for s in socks}) == 3
        assert {s.getsockname()[1] for s in socks} == {port}
        assert all(s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) for s in socks)
        assert groups.fds(2) == {"inbound": socks[2].fileno()}
        clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(48)]
        accepted = [0, 0, 0]
        for _ in range(100):  # bounded
            ready, _, _ = select.select(socks, [], [], 0.5)
            if not ready:
                break
            for s in ready:
                conn, _ = s.accept()
                conn.close()
                accepted[socks.index(s)] += 1
        for c in clients:
            c.close()
        assert sum(accepted) == 48
        assert all(n > 0 for n in accepted), accepted  # 3 * (2/3)**48: never by chance
    finally:
        groups.close()
        first.close()


def test_a_port_already_listened_on_is_refused_not_joined() -> None:
    (port,) = free_ports(1)
    leftover = ListenerGroups(WorkerPlan(2, "reuseport", "test"))
    own = leftover.listen("hbone", "127.0.0.1", port, True)
    try:
        again = ListenerGroups(WorkerPlan(2, "reuseport", "test"))
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            again.listen("hbone", "127.0.0.1", port, True)
        assert again.groups == {}
    finally:
        leftover.close()
        own.close()


def test_the_shared_fallback_hands_every_worker_the_same_socket() -> None:
    (port,) = free_ports(1)
    groups = ListenerGroups(WorkerPlan(3, "shared", "test"))
    own = groups.listen("outbound", "127.0.0.1", port, True)
    try:
        assert groups.fds(1) == groups.fds(2) == {"outbound": own.fileno()}
        groups.close()  # the agent's own socket stays open
        assert own.fileno() >= 0 and own.getsockname()[1] == port
    finally:
        own.close()
