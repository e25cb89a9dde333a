"""Istio resources that add to the service registry or describe ingress/egress gateways:
`ServiceEntry` (hosts outside Kubernetes Services) and the `networking.istio.io` `Gateway`
(servers of an Envoy gateway, which VirtualServices name in `spec.gateways`). Neither is served
by the waypoint; both are parsed so that `ztunnel analyze` can resolve references to them,
with Istio's validation (istio/istio pkg/config/validation: `ValidateServiceEntry`,
`ValidateGateway`, `validateServerPort`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ztunnel.meshconfig.resource import Fields, ResourceMeta

# Istio's protocol names (pkg/config/protocol `Parse`, case-insensitive).
PROTOCOLS = frozenset(
    {"tcp", "udp", "grpc", "grpc-web", "http", "http_proxy", "http2", "https", "tls"}
    | {"mongo", "redis", "mysql"}
)
LOCATIONS = ("MESH_EXTERNAL", "MESH_INTERNAL")
RESOLUTIONS = ("NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN", "DYNAMIC_DNS")


@dataclass(frozen=True, slots=True)
class ServicePort:
    number: int
    protocol: str = ""
    name: str = ""
    target_port: int | None = None


@dataclass(frozen=True, slots=True)
class ServiceEntry:
    meta: ResourceMeta
    hosts: tuple[str, ...]
    ports: tuple[ServicePort, ...] = ()
    addresses: tuple[str, ...] = ()
    location: str = "MESH_EXTERNAL"
    resolution: str = "NONE"
    export_to: tuple[str, ...] = ()
    workload_selector: tuple[tuple[str, str], ...] | None = None


@dataclass(frozen=True, slots=True)
class Server:
    port: ServicePort
    hosts: tuple[str, ...]  # as written, possibly `namespace/host`
    name: str = ""


@dataclass(frozen=True, slots=True)
class IstioGateway:
    """A `networking.istio.io` Gateway: servers for the gateway pods its selector picks."""

    meta: ResourceMeta
    selector: tuple[tuple[str, str], ...]
    servers: tuple[Server, ...]


def _protocol(f: Fields, value: Any, path: str, required: bool) -> str:
    text = f.string(value, path, required=required)
    if text and text.lower() not in PROTOCOLS:
        raise f.fail(path, f"unsupported protocol: {text}")
    return text


def _port(f: Fields, raw: Any, path: str, gateway: bool) -> ServicePort:
    p = f.mapping(raw, path, required=True)
    f.check_keys(p, path, ("number", "protocol", "name", "targetPort"))
    target = p.get("targetPort")
    if gateway and target:
        raise f.fail(f"{path}.targetPort", "targetPort has no impact on Gateways")
    name = f.string(p.get("name"), f"{path}.name", required=gateway)
    return ServicePort(
        f.port(p.get("number"), f"{path}.number"),
        _protocol(f, p.get("protocol"), f"{path}.protocol", required=gateway),
        name,
        None if not target else f.port(target, f"{path}.targetPort"),
    )


def _selector(f: Fields, raw: Any, path: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(f.string_map(raw, path).items()))


def parse_service_entry(f: Fields, meta: ResourceMeta) -> ServiceEntry:
    spec = f.mapping(f.doc.obj.get("spec"), "spec", required=True)
    f.check_keys(
        spec,
        "spec",
        (
            "hosts",
            "addresses",
            "ports",
            "location",
            "resolution",
            "endpoints",
            "workloadSelector",
            "exportTo",
            "subjectAltNames",
        ),
    )
    hosts = f.strings(spec.get("hosts"), "spec.hosts")
    if not hosts:
        raise f.fail("spec.hosts", "service entry must have at least one host")
    for i, h in enumerate(hosts):
        if h == "*":
            raise f.fail(f"spec.hosts[{i}]", f"invalid host {h}")
    ports: list[ServicePort] = []
    for i, raw in enumerate(f.seq(spec.get("ports"), "spec.ports")):
        port = _port(f, raw, f"spec.ports[{i}]", gateway=False)
        if any(p.number == port.number for p in ports):
            raise f.fail(
                f"spec.ports[{i}].number", f"service entry port {port.number} already defined"
            )
        if port.name and any(p.name == port.name for p in ports):
            raise f.fail(
                f"spec.ports[{i}].name", f'service entry port name "{port.name}" already defined'
            )
        ports.append(port)
    location = f.string(spec.get("location", "MESH_EXTERNAL"), "spec.location")
    if location not in LOCATIONS:
        raise f.fail("spec.location", f"must be one of {', '.join(LOCATIONS)}, got {location!r}")
    resolution = f.string(spec.get("resolution", "NONE"), "spec.resolution")
    if resolution not in RESOLUTIONS:
        raise f.fail(
            "spec.resolution", f"must be one of {', '.join(RESOLUTIONS)}, got {resolution!r}"
        )
    selector = None
    if spec.get("workloadSelector") is not None:
        ws = f.mapping(spec["workloadSelector"], "spec.workloadSelector")
        f.check_keys(ws, "spec.workloadSelector", ("labels",))
        selector = _selector(f, ws.get("labels"), "spec.workloadSelector.labels")
        if spec.get("endpoints") is not None:
            raise f.fail(
                "spec.workloadSelector",
                "only one of WorkloadSelector or Endpoints is allowed in Service Entry",
            )
    f.seq(spec.get("endpoints"), "spec.endpoints")
    return ServiceEntry(
        meta,
        hosts,
        tuple(ports),
        f.strings(spec.get("addresses"), "spec.addresses"),
        location,
        resolution,
        f.export_to(spec.get("exportTo"), "spec.exportTo"),
        selector,
    )


def parse_istio_gateway(f: Fields, meta: ResourceMeta) -> IstioGateway:
    spec = f.mapping(f.doc.obj.get("spec"), "spec", required=True)
    f.check_keys(spec, "spec", ("selector", "servers"))
    servers = []
    names: set[str] = set()
    for i, raw in enumerate(f.seq(spec.get("servers"), "spec.servers")):
        sp = f"spec.servers[{i}]"
        s: Mapping[str, Any] = f.mapping(raw, sp, required=True)
        f.check_keys(s, sp, ("port", "bind", "hosts", "tls", "name", "defaultEndpoint"))
        hosts = f.strings(s.get("hosts"), f"{sp}.hosts")
        if not hosts:
            raise f.fail(f"{sp}.hosts", "server config must contain at least one host")
        port = _port(f, s.get("port"), f"{sp}.port", gateway=True)
        if port.name in names:
            raise f.fail(
                f"{sp}.port.name",
                f"port names in servers must be unique: duplicate name {port.name}",
            )
        names.add(port.name)
        f.mapping(s.get("tls"), f"{sp}.tls")
        servers.append(Server(port, hosts, f.string(s.get("name"), f"{sp}.name", required=False)))
    return IstioGateway(meta, _selector(f, spec.get("selector"), "spec.selector"), tuple(servers))
