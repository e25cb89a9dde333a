"""Service analyzers, as istioctl's `service.PortNameAnalyzer` (istio/istio
pkg/config/analysis/analyzers/service/portname.go, with the protocol rules of
pkg/config/kube/conversion.go `ConvertProtocol` and pkg/config/protocol `Parse`): a port whose
name (or appProtocol) names no protocol gets protocol detection (IST0118)."""

from __future__ import annotations

from ztunnel.analyze import messages as msg
from ztunnel.analyze.context import Analyzer, Context
from ztunnel.meshconfig.kube import KubePort

MANAGED_LABEL = "gateway.istio.io/managed"
MANAGED_VALUES = (
    "istio.io-gateway-controller",
    "istio.io-mesh-controller",
    "istio.io-eastwest-controller",
)
PROTOCOLS = frozenset(
    {"tcp", "udp", "grpc", "grpc-web", "http", "http_proxy", "http2", "https", "tls"}
    | {"mongo", "redis", "mysql"}
)
WELL_KNOWN_PORTS = frozenset({25, 53, 3306, 27017})  # SMTP, DNS, MySQL, MongoDB: plain TCP
K8S_APP_PROTOCOLS = frozenset({"kubernetes.io/h2c", "kubernetes.io/ws", "kubernetes.io/wss"})


def protocol_known(port: KubePort) -> bool:
    """False where istioctl's `ConvertProtocol` returns UnsupportedProtocol."""
    if port.protocol.upper() == "UDP":
        return True
    name = port.app_protocol or port.name
    if port.app_protocol in K8S_APP_PROTOCOLS:
        return True
    if name[:8].lower() == "grpc-web":
        return True
    prefix = name.split("-", 1)[0]
    return prefix.lower() in PROTOCOLS or port.port in WELL_KNOWN_PORTS


def _target_port(port: KubePort) -> str:
    """`intstr.String()`; unset is defaulted to the port, as the API server does."""
    return str(port.port if port.target_port is None else port.target_port)


def port_names(ctx: Context) -> None:
    for svc in ctx.cs.services:
        labels = svc.meta.labels
        if "istio" in labels or labels.get("release") == "istio":
            continue  # the control plane (`util.IsIstioControlPlane`)
        if labels.get(MANAGED_LABEL) in MANAGED_VALUES:
            continue  # created by Istio for a gateway or waypoint
        external = svc.service_type == "ExternalName"
        for i, port in enumerate(svc.ports):
            if protocol_known(port) and not (port.name == "tcp" and external):
                continue
            at = ("spec", "ports", i, "port")
            if external:
                ctx.report(msg.ExternalNameServiceTypeInvalidPortName, svc.meta, at=at)
            else:
                ctx.report(
                    msg.PortNameIsNotUnderNamingConvention,
                    svc.meta,
                    port.name,
                    port.port,
                    _target_port(port),
                    at=at,
                )


ANALYZERS = (
    Analyzer(
        "service.PortNameAnalyzer",
        "Checks the port names associated with each service",
        ("Service",),
        port_names,
    ),
)
