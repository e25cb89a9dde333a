"""What one waypoint serves, computed from the mesh state (workloads, services: the same
`MeshState` the node agent uses, from any of its sources) and the configuration resources:
the services and workloads bound to this waypoint, the compiled route table, the L7 policies
per target, and the endpoints of each destination cluster. Rebuilt whole on every change."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from waypoint.balancer import Endpoint
from ztunnel.meshconfig.compile import Cluster as ClusterRef
from ztunnel.meshconfig.compile import RouteTable, ServiceRef, compile_routes
from ztunnel.meshconfig.load import ConfigSet
from ztunnel.meshconfig.security import AuthorizationPolicy, waypoint_policies
from ztunnel.model import (
    GatewayAddress,
    IPAddress,
    NamespacedHostname,
    Service,
    Workload,
    WorkloadStatus,
)
from ztunnel.state import MeshState


@dataclass(frozen=True)
class WaypointIdentity:
    """Who this waypoint is: its Gateway's name and namespace, its service's hostname, and
    the addresses it answers on; `waypoint_for` as the `istio.io/waypoint-for` label."""

    name: str
    namespace: str
    hostname: str
    addresses: frozenset[IPAddress] = frozenset()
    waypoint_for: str = "service"  # service | workload | all | none

    def is_me(self, gw: GatewayAddress | None, state: MeshState) -> bool:
        if gw is None:
            return False
        dest = gw.destination
        if isinstance(dest, NamespacedHostname):
            return dest.namespace == self.namespace and dest.hostname == self.hostname
        if dest.address in self.addresses:
            return True
        svc = state.service_by_vip(dest.address)
        return svc is not None and svc.namespace == self.namespace and svc.hostname == self.hostname


@dataclass
class WaypointView:
    me: WaypointIdentity
    mesh: MeshState
    config: ConfigSet
    routes: RouteTable
    services: dict[IPAddress, Service]  # bound service VIPs
    workloads: dict[IPAddress, Workload]  # bound workload addresses
    by_hostname: dict[str, Service] = field(default_factory=dict)

    def policies_for(self, service: Service | None) -> list[AuthorizationPolicy]:
        target = (service.namespace, service.name) if service is not None else None
        return waypoint_policies(
            self.config.authorization_policies,
            self.me.namespace,
            self.me.name,
            target,
            self.config.options.root_namespace,
        )

    def endpoints(
        self, cluster: ClusterRef, port: int, labels: Sequence[tuple[str, str]] | None
    ) -> list[Endpoint]:
        """Healthy workloads of `cluster` (subset labels applied), with the target port."""
        svc = self.by_hostname.get(cluster.host)
        if svc is None:
            return []
        sp = svc.port(port)
        out = []
        for w in self.mesh.endpoints.get(svc.key, ()):
            if w.status is not WorkloadStatus.HEALTHY or not w.addresses:
                continue
            if labels is not None and any(w.labels.get(k) != v for k, v in labels):
                continue
            target = w.services.get(svc.key, {}).get(port) or (sp.target_port if sp else port)
            out.append(Endpoint(w, w.addresses[0], target))
        return out


def build_view(me: WaypointIdentity, mesh: MeshState, config: ConfigSet) -> WaypointView:
    gw = config.gateway(me.namespace, me.name)
    if gw is not None and "istio.io/waypoint-for" in gw.meta.labels:
        me = WaypointIdentity(me.name, me.namespace, me.hostname, me.addresses, gw.waypoint_for)
    services: dict[IPAddress, Service] = {}
    if me.waypoint_for in ("service", "all"):
        for svc in mesh.services:
            if me.is_me(svc.waypoint, mesh):
                for vip in svc.vips:
                    services[vip.address] = svc
    workloads: dict[IPAddress, Workload] = {}
    if me.waypoint_for in ("workload", "all"):
        for w in mesh.workloads:
            if me.is_me(w.waypoint, mesh):
                for ip in w.addresses:
                    workloads[ip] = w
    refs = [
        ServiceRef(s.hostname, s.namespace, s.name, tuple(p.service_port for p in s.ports))
        for s in mesh.services
    ]
    served = {s.hostname: s for s in services.values()}
    routes = compile_routes(config, [r for r in refs if r.hostname in served], refs, me.namespace)
    return WaypointView(
        me, mesh, config, routes, services, workloads, {s.hostname: s for s in mesh.services}
    )
