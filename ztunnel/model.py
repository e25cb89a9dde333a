"""The mesh model: workloads, services and waypoints as frozen records.

These mirror `istio.workload.Workload`/`Service`/`GatewayAddress` (see shared/WIRE.md); every
source of mesh state (the local YAML file now, istiod's xDS later) converts into them.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field

from ztunnel.identity import DEFAULT_SERVICE_ACCOUNT, DEFAULT_TRUST_DOMAIN, SpiffeId

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

HBONE_PORT = 15008


class TunnelProtocol(enum.Enum):
    """How a workload is reached: plain TCP, or HBONE on port 15008."""

    TCP = "TCP"
    HBONE = "HBONE"


class WorkloadStatus(enum.Enum):
    HEALTHY = "HEALTHY"
    UNHEALTHY = "UNHEALTHY"


@dataclass(frozen=True, slots=True)
class NamespacedHostname:
    namespace: str
    hostname: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.hostname}"


@dataclass(frozen=True, slots=True)
class NetworkAddress:
    network: str
    address: IPAddress

    def __str__(self) -> str:
        return f"{self.network}/{self.address}"


@dataclass(frozen=True, slots=True)
class GatewayAddress:
    """Where a waypoint (or network gateway) is: a hostname of a service or an address."""

    destination: NamespacedHostname | NetworkAddress
    hbone_mtls_port: int = HBONE_PORT


@dataclass(frozen=True, slots=True)
class ServicePort:
    service_port: int
    target_port: int
    app_protocol: str = ""


@dataclass(frozen=True, slots=True)
class Workload:
    """One addressable workload (a pod, usually)."""

    uid: str
    name: str
    namespace: str
    addresses: tuple[IPAddress, ...]
    service_account: str = DEFAULT_SERVICE_ACCOUNT
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    protocol: TunnelProtocol = TunnelProtocol.HBONE
    node: str = ""
    network: str = ""
    hostname: str = ""
    canonical_name: str = ""
    canonical_revision: str = ""
    workload_type: str = "pod"
    workload_name: str = ""
    cluster_id: str = "Kubernetes"
    status: WorkloadStatus = WorkloadStatus.HEALTHY
    waypoint: GatewayAddress | None = None
    # "<ns>/<hostname>" -> {service port: target port}
    services: Mapping[str, Mapping[int, int]] = field(default_factory=dict)
    authorization_policies: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)

    @property
    def identity(self) -> SpiffeId:
        return SpiffeId(self.trust_domain, self.namespace, self.service_account)

    @property
    def app(self) -> str:
        """The canonical service name Istio telemetry reports (falls back to the name)."""
        return self.canonical_name or self.workload_name or self.name

    @property
    def revision(self) -> str:
        return self.canonical_revision or "latest"


@dataclass(frozen=True, slots=True)
class Service:
    """A service: virtual IPs, ports, and the workloads that back it (found via the store)."""

    name: str
    namespace: str
    hostname: str
    vips: tuple[NetworkAddress, ...] = ()
    ports: tuple[ServicePort, ...] = ()
    subject_alt_names: tuple[str, ...] = ()
    waypoint: GatewayAddress | None = None

    @property
    def key(self) -> str:
        """The resource name istiod uses: `<namespace>/<hostname>`."""
        return f"{self.namespace}/{self.hostname}"

    def port(self, service_port: int) -> ServicePort | None:
        for p in self.ports:
            if p.service_port == service_port:
                return p
        return None
