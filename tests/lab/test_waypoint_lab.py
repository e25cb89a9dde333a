"""The waypoint in the kernel lab: node agents with eBPF capture send the reviews service's
traffic to a waypoint pod over HBONE; the waypoint routes, authorizes and balances it and
opens its own HBONE to the backends' node agents. Every demo row must hold."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ztunnel.lab import runner
from ztunnel.lab import waypoint as waypoint_lab
from ztunnel.lab.topology import Topology

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def waypoint_topology() -> Iterator[Topology]:
    t = runner.up(nodes=2, pods=waypoint_lab.PODS_PER_NODE)
    try:
        waypoint_lab.start(t, lambda _m: None)
        yield t
    finally:
        runner.down(t.lab_id)


@pytest.mark.timeout(400)
def test_every_waypoint_feature_as_the_client_sees_it(waypoint_topology: Topology) -> None:
    rows = waypoint_lab.run(waypoint_topology, lambda _m: None)
    failed = [r for r in rows if r[-1] != "PASS"]
    assert not failed, failed
    assert len(rows) == 8


def test_destination_sees_the_waypoint_identity(waypoint_topology: Topology) -> None:
    """The backends' node agents count inbound connections whose source principal is the
    waypoint's (the destination sees the waypoint, not the client)."""
    t = waypoint_topology
    res = waypoint_lab.load(t, "/", 3)
    assert res.get("statuses") == {"200": 3}
    opened = 0.0
    for node in t.nodes:
        code, body = runner._http_in(node.netns, runner.STATS_PORT, "/metrics")
        assert code == 200
        for line in body.splitlines():
            if (
                line.startswith("istio_tcp_connections_opened_total{")
                and 'reporter="destination"' in line
                and 'source_principal="spiffe://cluster.local/ns/shop/sa/waypoint"' in line
                and 'destination_service="reviews.shop.svc.cluster.local"' in line
            ):
                opened += float(line.rsplit(" ", 1)[1])
    assert opened >= 1
