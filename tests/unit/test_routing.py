"""Outbound routing (`ztunnel.proxy.routing.route`): services, HBONE vs TCP workloads,
passthrough, waypoints for services and for workloads, and refusals."""

from __future__ import annotations

import ipaddress
import random

import pytest

from ztunnel.identity import SpiffeId
from ztunnel.model import (
    GatewayAddress,
    NamespacedHostname,
    NetworkAddress,
    Service,
    ServicePort,
    TunnelProtocol,
    Workload,
    WorkloadStatus,
)
from ztunnel.proxy.routing import DirectRoute, HboneRoute, Refusal, route
from ztunnel.state import MeshState

pytestmark = pytest.mark.unit

ip = ipaddress.ip_address
ECHO_KEY = "shop/echo.shop.svc.cluster.local"
WP_KEY = "shop/waypoint.shop.svc.cluster.local"


def wl(name: str, addr: str, ns: str = "shop", sa: str = "default", **kw: object) -> Workload:
    return Workload(
        uid=f"Kubernetes//Pod/{ns}/{name}",
        name=name,
        namespace=ns,
        addresses=(ip(addr),),
        service_account=sa,
        **kw,
    )  # type: ignore[arg-type]


def svc(name: str, vip: str, ports: dict[int, int], ns: str = "shop", **kw: object) -> Service:
    return Service(
        name=name,
        namespace=ns,
        hostname=f"{name}.{ns}.svc.cluster.local",
        vips=(NetworkAddress("", ip(vip)),),
        ports=tuple(ServicePort(s, t) for s, t in ports.items()),
        **kw,
    )  # type: ignore[arg-type]


CLIENT = wl("client", "10.0.0.1", ns="frontend", sa="web")


def state(*objs: Workload | Service) -> MeshState:
    return MeshState.build(
        [o for o in objs if isinstance(o, Workload)], [o for o in objs if isinstance(o, Service)]
    )


def test_service_vip_to_endpoint_with_target_port() -> None:
    ep = wl("echo-1", "10.0.1.1", sa="echo", services={ECHO_KEY: {}})
    s = svc(
        "echo",
        "10.96.0.1",
        {80: 8080},
        subject_alt_names=("spiffe://cluster.local/ns/shop/sa/extra",),
    )
    r = route(state(CLIENT, ep, s), CLIENT, ip("10.96.0.1"), 80)
    assert isinstance(r, HboneRoute)
    assert r.next_hop == (ip("10.0.1.1"), 15008)
    assert r.target == (ip("10.0.1.1"), 8080)
    assert r.identities == {
        SpiffeId("cluster.local", "shop", "echo"),
        SpiffeId("cluster.local", "shop", "extra"),
    }
    assert r.workload == ep and r.service == s and not r.via_waypoint


def test_endpoint_port_mapping_wins_over_the_service_default() -> None:
    ep = wl("echo-1", "10.0.1.1", services={ECHO_KEY: {80: 9090}})
    s = svc("echo", "10.96.0.1", {80: 8080})
    r = route(state(ep, s), CLIENT, ip("10.96.0.1"), 80)
    assert isinstance(r, HboneRoute) and r.target == (ip("10.0.1.1"), 9090)


def test_service_port_not_defined_is_refused() -> None:
    ep = wl("echo-1", "10.0.1.1", services={ECHO_KEY: {}})
    r = route(state(ep, svc("echo", "10.96.0.1", {80: 8080})), CLIENT, ip("10.96.0.1"), 81)
    assert isinstance(r, Refusal)


def test_service_to_tcp_endpoint_is_direct() -> None:
    ep = wl("legacy", "10.0.1.2", protocol=TunnelProtocol.TCP, services={ECHO_KEY: {}})
    r = route(state(ep, svc("echo", "10.96.0.1", {80: 8080})), CLIENT, ip("10.96.0.1"), 80)
    assert isinstance(r, DirectRoute)
    assert r.target == (ip("10.0.1.2"), 8080)
    assert r.workload == ep


def test_hbone_workload_direct() -> None:
    w = wl("echo-1", "10.0.1.1", sa="echo")
    r = route(state(w), CLIENT, ip("10.0.1.1"), 8080, hbone_port=15999)
    assert isinstance(r, HboneRoute)
    assert r.next_hop == (ip("10.0.1.1"), 15999)
    assert r.target == (ip("10.0.1.1"), 8080)
    assert r.identities == {w.identity}
    assert r.service is None


def test_tcp_workload_direct() -> None:
    w = wl("legacy", "10.0.1.2", protocol=TunnelProtocol.TCP)
    r = route(state(w), CLIENT, ip("10.0.1.2"), 5432)
    assert r == DirectRoute((ip("10.0.1.2"), 5432), w, None)


def test_unknown_destination_is_passthrough() -> None:
    r = route(state(CLIENT), CLIENT, ip("192.0.2.7"), 443)
    assert r == DirectRoute((ip("192.0.2.7"), 443), None, None)


def _waypoint_mesh(**svc_kw: object) -> tuple[MeshState, Workload, Workload, Service]:
    wp = wl("waypoint-1", "10.0.9.1", sa="waypoint", services={WP_KEY: {}})
    wp_svc = svc("waypoint", "10.96.0.9", {15008: 15008})
    ep = wl("echo-1", "10.0.1.1", sa="echo", services={ECHO_KEY: {}})
    s = svc("echo", "10.96.0.1", {80: 8080}, **svc_kw)
    return state(CLIENT, wp, wp_svc, ep, s), wp, ep, s


def test_service_with_waypoint_goes_to_the_waypoint_with_the_original_vip() -> None:
    mesh, wp, _, s = _waypoint_mesh(
        waypoint=GatewayAddress(NamespacedHostname("shop", "waypoint.shop.svc.cluster.local"))
    )
    r = route(mesh, CLIENT, ip("10.96.0.1"), 80)
    assert isinstance(r, HboneRoute)
    assert r.via_waypoint
    assert r.next_hop == (ip("10.0.9.1"), 15008)
    assert r.target == (ip("10.96.0.1"), 80)  # the ORIGINAL VIP:port
    assert r.identities == {wp.identity}
    assert r.service == s


def test_service_waypoint_by_address_and_custom_port() -> None:
    mesh, _, _, _ = _waypoint_mesh(
        waypoint=GatewayAddress(NetworkAddress("", ip("10.0.9.1")), 15019)
    )
    r = route(mesh, CLIENT, ip("10.96.0.1"), 80)
    assert isinstance(r, HboneRoute) and r.via_waypoint
    assert r.next_hop == (ip("10.0.9.1"), 15019)


def test_workload_with_waypoint_goes_to_the_waypoint() -> None:
    wp = wl("waypoint-1", "10.0.9.1", sa="waypoint")
    w = wl(
        "echo-1", "10.0.1.1", sa="echo", waypoint=GatewayAddress(NetworkAddress("", ip("10.0.9.1")))
    )
    r = route(state(CLIENT, wp, w), CLIENT, ip("10.0.1.1"), 8080)
    assert isinstance(r, HboneRoute) and r.via_waypoint
    assert r.next_hop == (ip("10.0.9.1"), 15008)
    assert r.target == (ip("10.0.1.1"), 8080)
    assert r.identities == {wp.identity}
    assert r.workload == w


def test_traffic_from_the_waypoint_itself_goes_direct() -> None:
    mesh, wp, _, _ = _waypoint_mesh(
        waypoint=GatewayAddress(NamespacedHostname("shop", "waypoint.shop.svc.cluster.local"))
    )
    r = route(mesh, wp, ip("10.96.0.1"), 80)
    assert isinstance(r, HboneRoute) and not r.via_waypoint
    assert r.next_hop == (ip("10.0.1.1"), 15008) and r.target == (ip("10.0.1.1"), 8080)
    w = wl(
        "echo-2", "10.0.1.2", sa="echo", waypoint=GatewayAddress(NetworkAddress("", ip("10.0.9.1")))
    )
    wp2 = wl("waypoint-1", "10.0.9.1", sa="waypoint")
    r2 = route(state(wp2, w), wp2, ip("10.0.1.2"), 8080)
    assert isinstance(r2, HboneRoute) and not r2.via_waypoint
    assert r2.next_hop == (ip("10.0.1.2"), 15008)


@pytest.mark.parametrize(
    "gateway",
    [
        GatewayAddress(NamespacedHostname("shop", "missing.shop.svc.cluster.local")),
        GatewayAddress(NetworkAddress("", ip("10.0.9.99"))),
    ],
    ids=["hostname", "address"],
)
def test_unknown_waypoint_is_refused_never_bypassed(gateway: GatewayAddress) -> None:
    ep = wl("echo-1", "10.0.1.1", services={ECHO_KEY: {}})
    r = route(
        state(CLIENT, ep, svc("echo", "10.96.0.1", {80: 8080}, waypoint=gateway)),
        CLIENT,
        ip("10.96.0.1"),
        80,
    )
    assert isinstance(r, Refusal)
    w = wl("echo-2", "10.0.1.2", waypoint=gateway)
    r = route(state(CLIENT, w), CLIENT, ip("10.0.1.2"), 80)
    assert isinstance(r, Refusal)


def test_waypoint_without_healthy_endpoint_is_refused() -> None:
    wp = wl("waypoint-1", "10.0.9.1", services={WP_KEY: {}}, status=WorkloadStatus.UNHEALTHY)
    ep = wl("echo-1", "10.0.1.1", services={ECHO_KEY: {}})
    s = svc(
        "echo",
        "10.96.0.1",
        {80: 8080},
        waypoint=GatewayAddress(NamespacedHostname("shop", "waypoint.shop.svc.cluster.local")),
    )
    r = route(state(wp, svc("waypoint", "10.96.0.9", {}), ep, s), CLIENT, ip("10.96.0.1"), 80)
    assert isinstance(r, Refusal)


def test_unhealthy_endpoints_are_skipped() -> None:
    good = wl("echo-1", "10.0.1.1", services={ECHO_KEY: {}})
    bad = wl("echo-2", "10.0.1.2", services={ECHO_KEY: {}}, status=WorkloadStatus.UNHEALTHY)
    mesh = state(good, bad, svc("echo", "10.96.0.1", {80: 8080}))
    picked = set()
    for seed in range(200):
        r = route(mesh, CLIENT, ip("10.96.0.1"), 80, random.Random(seed))
        assert isinstance(r, HboneRoute) and r.workload is not None
        picked.add(r.workload.name)
    assert picked == {"echo-1"}


def test_endpoints_are_spread() -> None:
    eps = [wl(f"echo-{i}", f"10.0.1.{i}", services={ECHO_KEY: {}}) for i in range(1, 4)]
    mesh = state(*eps, svc("echo", "10.96.0.1", {80: 8080}))
    rng = random.Random(1)
    picked = {
        route(mesh, CLIENT, ip("10.96.0.1"), 80, rng).workload.name  # type: ignore[union-attr]
        for _ in range(100)
    }
    assert picked == {w.name for w in eps}


@pytest.mark.parametrize("status", [None, WorkloadStatus.UNHEALTHY], ids=["none", "unhealthy"])
def test_service_without_healthy_endpoints_is_refused(status: WorkloadStatus | None) -> None:
    objs: list[Workload | Service] = [svc("echo", "10.96.0.1", {80: 8080})]
    if status is not None:
        objs.append(wl("echo-1", "10.0.1.1", services={ECHO_KEY: {}}, status=status))
    r = route(state(*objs), CLIENT, ip("10.96.0.1"), 80)
    assert isinstance(r, Refusal)
    assert r.reason


def test_ipv6_service_and_workload() -> None:
    ep = wl("echo-1", "fd00::1:1", services={"shop/echo6.shop.svc.cluster.local": {}})
    s = svc("echo6", "fd00::96:1", {80: 8080})
    r = route(state(ep, s), CLIENT, ip("fd00::96:1"), 80)
    assert isinstance(r, HboneRoute)
    assert r.next_hop == (ip("fd00::1:1"), 15008) and r.target == (ip("fd00::1:1"), 8080)
