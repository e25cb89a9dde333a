"""Outbound routing, without I/O: from (source workload, original destination) to where the
connection goes: an HBONE tunnel (to the workload, or to a waypoint), a direct TCP connection,
or a refusal. Follows shared/WIRE.md (services, waypoints, protocols)."""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass

from ztunnel.identity import SpiffeId
from ztunnel.model import (
    HBONE_PORT,
    GatewayAddress,
    IPAddress,
    NamespacedHostname,
    Service,
    TunnelProtocol,
    Workload,
)
from ztunnel.state import MeshState


@dataclass(frozen=True, slots=True)
class HboneRoute:
    """Tunnel to `next_hop` asking CONNECT `target`, expecting one of `identities`."""

    next_hop: tuple[IPAddress, int]
    target: tuple[IPAddress, int]
    identities: frozenset[SpiffeId]
    workload: Workload | None
    service: Service | None
    via_waypoint: bool = False


@dataclass(frozen=True, slots=True)
class DirectRoute:
    """Plain TCP to `target` (TCP-protocol workloads, addresses outside the mesh)."""

    target: tuple[IPAddress, int]
    workload: Workload | None
    service: Service | None


@dataclass(frozen=True, slots=True)
class Refusal:
    reason: str
    response_flag: str = "CONNECT"


Route = HboneRoute | DirectRoute | Refusal


def _waypoint_workload(
    state: MeshState, gw: GatewayAddress
) -> tuple[Workload | None, IPAddress | None]:
    """Resolve a waypoint reference to a workload and the address to dial."""
    dest = gw.destination
    if isinstance(dest, NamespacedHostname):
        svc = state.service_by_hostname(dest.namespace, dest.hostname)
        if svc is None:
            return None, None
        wl = state.pick_endpoint(svc)
        if wl is None:
            return None, None
        return wl, wl.addresses[0]
    wl = state.workload_by_ip(dest.address)
    if wl is not None:
        return wl, dest.address
    svc = state.service_by_vip(dest.address)
    if svc is not None:
        ep = state.pick_endpoint(svc)
        if ep is not None:
            return ep, ep.addresses[0]
    return None, None


def _via_waypoint(
    state: MeshState,
    gw: GatewayAddress,
    target: tuple[IPAddress, int],
    workload: Workload | None,
    service: Service | None,
) -> Route:
    wp, addr = _waypoint_workload(state, gw)
    if wp is None or addr is None:
        # Never bypass a waypoint silently (WIRE.md): no waypoint, no connection.
        return Refusal(f"waypoint {gw.destination} is unknown or has no healthy endpoint")
    return HboneRoute(
        next_hop=(addr, gw.hbone_mtls_port),
        target=target,
        identities=frozenset({wp.identity}),
        workload=workload,
        service=service,
        via_waypoint=True,
    )


def _is_waypoint_of(source: Workload | None, gw: GatewayAddress, state: MeshState) -> bool:
    if source is None:
        return False
    dest = gw.destination
    if isinstance(dest, NamespacedHostname):
        return any(key == f"{dest.namespace}/{dest.hostname}" for key in source.services)
    if dest.address in source.addresses:
        return True
    svc = state.service_by_vip(dest.address)
    return svc is not None and svc.key in source.services


def _to_workload(wl: Workload, port: int, service: Service | None, hbone_port: int) -> Route:
    ip = wl.addresses[0]
    if wl.protocol is TunnelProtocol.HBONE:
        ids = {wl.identity}
        if service is not None:
            for san in service.subject_alt_names:
                ids.add(SpiffeId.parse(san))
        return HboneRoute((ip, hbone_port), (ip, port), frozenset(ids), wl, service)
    return DirectRoute((ip, port), wl, service)


def route(
    state: MeshState,
    source: Workload | None,
    dst_ip: IPAddress,
    dst_port: int,
    rng: random.Random | None = None,
    hbone_port: int = HBONE_PORT,
) -> Route:
    """Where a connection from `source` to (dst_ip, dst_port) goes."""
    svc = state.service_by_vip(dst_ip)
    if svc is not None:
        if svc.waypoint is not None and not _is_waypoint_of(source, svc.waypoint, state):
            return _via_waypoint(state, svc.waypoint, (dst_ip, dst_port), None, svc)
        sp = svc.port(dst_port)
        if sp is None and svc.ports:
            return Refusal(f"service {svc.hostname} has no port {dst_port}")
        candidates = state.healthy_endpoints(svc)
        if not candidates:
            return Refusal(f"service {svc.hostname} has no healthy endpoint", "NR")
        ep = (rng or random).choice(candidates)
        target_port = ep.services.get(svc.key, {}).get(dst_port) or (
            sp.target_port if sp else dst_port
        )
        return _to_workload(ep, target_port, svc, hbone_port)
    wl = state.workload_by_ip(dst_ip)
    if wl is not None:
        if wl.waypoint is not None and not _is_waypoint_of(source, wl.waypoint, state):
            return _via_waypoint(state, wl.waypoint, (dst_ip, dst_port), wl, None)
        if wl.protocol is TunnelProtocol.HBONE:
            return HboneRoute(
                (dst_ip, hbone_port), (dst_ip, dst_port), frozenset({wl.identity}), wl, None
            )
        return DirectRoute((dst_ip, dst_port), wl, None)
    return DirectRoute((dst_ip, dst_port), None, None)


def parse_ip(value: str) -> IPAddress:
    return ipaddress.ip_address(value.split("%", 1)[0])
