"""istiod's xDS resources to the mesh model and back, without I/O.

`address_from_proto` / `policy_from_proto` turn `istio.workload.Address` and
`istio.security.Authorization` into `Workload`/`Service`/`AuthorizationPolicy`, the same
records the local file produces; anything the agent cannot use safely raises `ConversionError`
(the client NACKs that one resource and keeps the rest). Validation follows istio/ztunnel
(src/state/workload.rs, service.rs, rbac.rs): addresses are 4 or 16 bytes, unknown enum values
are errors, empty trust domain / service account / cluster id take their defaults. The
`*_to_proto` functions go the other way, for the test istiod (`ztunnel.lab.istiod`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from google.protobuf import any_pb2
from google.protobuf.message import DecodeError, Message

from ztunnel.authz.policy import (
    Action,
    AuthorizationPolicy,
    Clause,
    IPNetwork,
    Match,
    Rule,
    Scope,
    ServiceAccountMatch,
    StringMatch,
    StringMatchKind,
)
from ztunnel.errors import IdentityError, ZtunnelError
from ztunnel.identity import DEFAULT_SERVICE_ACCOUNT, DEFAULT_TRUST_DOMAIN, SpiffeId
from ztunnel.model import (
    HBONE_PORT,
    GatewayAddress,
    IPAddress,
    NamespacedHostname,
    NetworkAddress,
    Service,
    ServicePort,
    TunnelProtocol,
    Workload,
    WorkloadStatus,
)
from ztunnel.xds.gen.istio.security import authorization_pb2 as apb
from ztunnel.xds.gen.istio.workload import workload_pb2 as wpb

TYPE_PREFIX = "type.googleapis.com/"
ADDRESS_TYPE = TYPE_PREFIX + "istio.workload.Address"
AUTHORIZATION_TYPE = TYPE_PREFIX + "istio.security.Authorization"
DEFAULT_CLUSTER_ID = "Kubernetes"

_PROTOCOLS = {wpb.NONE: TunnelProtocol.TCP, wpb.HBONE: TunnelProtocol.HBONE}
_STATUS = {wpb.HEALTHY: WorkloadStatus.HEALTHY, wpb.UNHEALTHY: WorkloadStatus.UNHEALTHY}
_WORKLOAD_TYPES = {
    wpb.DEPLOYMENT: "deployment",
    wpb.CRONJOB: "cronjob",
    wpb.POD: "pod",
    wpb.JOB: "job",
}
_SCOPES = {
    apb.GLOBAL: Scope.GLOBAL,
    apb.NAMESPACE: Scope.NAMESPACE,
    apb.WORKLOAD_SELECTOR: Scope.WORKLOAD_SELECTOR,
}
_ACTIONS = {apb.ALLOW: Action.ALLOW, apb.DENY: Action.DENY}


T = TypeVar("T")


class ConversionError(ZtunnelError):
    """A resource from istiod that the agent cannot use; the message says which field and why."""


# ---- istiod -> model ------------------------------------------------------------------------


def unpack(resource: any_pb2.Any, type_url: str, message: Message) -> None:
    """Decode a resource's Any payload into `message`, checking its type."""
    if resource.type_url != type_url:
        raise ConversionError(f"resource type is {resource.type_url!r}, expected {type_url!r}")
    try:
        message.ParseFromString(resource.value)
    except DecodeError as e:
        raise ConversionError(f"cannot decode {type_url.removeprefix(TYPE_PREFIX)}: {e}") from None


def ip_from_bytes(raw: bytes, field: str) -> IPAddress:
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw)
    if len(raw) == 16:
        return ipaddress.IPv6Address(raw)
    raise ConversionError(f"{field}: an address must be 4 or 16 bytes, got {len(raw)}")


def _port(value: int, field: str, allow_zero: bool = False) -> int:
    if not (0 if allow_zero else 1) <= value <= 65535:
        raise ConversionError(f"{field}: port out of range: {value}")
    return value


def _enum(table: Mapping[Any, T], value: int, field: str) -> T:
    try:
        return table[value]
    except KeyError:
        raise ConversionError(f"{field}: unsupported value {value}") from None


def _gateway(gw: wpb.GatewayAddress, field: str) -> GatewayAddress:
    port = _port(gw.hbone_mtls_port, f"{field}.hbone_mtls_port", allow_zero=True) or HBONE_PORT
    kind = gw.WhichOneof("destination")
    if kind == "hostname":
        h = gw.hostname
        if not h.namespace or not h.hostname:
            raise ConversionError(f"{field}.hostname: needs namespace and hostname")
        return GatewayAddress(NamespacedHostname(h.namespace, h.hostname), port)
    if kind == "address":
        a = gw.address
        return GatewayAddress(
            NetworkAddress(a.network, ip_from_bytes(a.address, f"{field}.address")), port
        )
    raise ConversionError(f"{field}: a gateway address needs a hostname or an address")


def _port_map(ports: Iterable[wpb.Port], field: str) -> dict[int, int]:
    out: dict[int, int] = {}
    for i, p in enumerate(ports):
        sp = _port(p.service_port, f"{field}[{i}].service_port")
        # 0: the target port is not known for this workload (a named port); routing then uses
        # the service's own target port.
        out[sp] = _port(p.target_port, f"{field}[{i}].target_port", allow_zero=True)
    return out


def workload_from_proto(w: wpb.Workload) -> Workload:
    if w.tunnel_protocol == wpb.LEGACY_ISTIO_MTLS:
        raise ConversionError("tunnel_protocol: LEGACY_ISTIO_MTLS (sidecars) is not supported")
    addresses = tuple(ip_from_bytes(a, f"addresses[{i}]") for i, a in enumerate(w.addresses))
    if not addresses:
        # Workloads reached only through a network gateway have none; this agent has no
        # multi-network support, and everything on the data path needs an address.
        raise ConversionError("addresses: a workload without addresses is not supported")
    services: dict[str, dict[int, int]] = {}
    for key, plist in w.services.items():
        ns, sep, host = key.partition("/")
        if not sep or not ns or not host:
            raise ConversionError(f"services[{key!r}]: key must be 'namespace/hostname'")
        services[key] = _port_map(plist.ports, f"services[{key!r}].ports")
    wl = Workload(
        uid=w.uid,
        name=w.name,
        namespace=w.namespace,
        addresses=addresses,
        service_account=w.service_account or DEFAULT_SERVICE_ACCOUNT,
        trust_domain=w.trust_domain or DEFAULT_TRUST_DOMAIN,
        protocol=_enum(_PROTOCOLS, w.tunnel_protocol, "tunnel_protocol"),
        node=w.node,
        network=w.network,
        hostname=w.hostname,
        canonical_name=w.canonical_name,
        canonical_revision=w.canonical_revision,
        workload_type=_enum(_WORKLOAD_TYPES, w.workload_type, "workload_type"),
        workload_name=w.workload_name,
        cluster_id=w.cluster_id or DEFAULT_CLUSTER_ID,
        status=_enum(_STATUS, w.status, "status"),
        waypoint=_gateway(w.waypoint, "waypoint") if w.HasField("waypoint") else None,
        services=services,
        authorization_policies=tuple(w.authorization_policies),
    )
    try:
        _ = wl.identity
    except IdentityError as e:
        raise ConversionError(f"identity: {e}") from None
    return wl


def service_from_proto(s: wpb.Service) -> Service:
    if not s.hostname:
        raise ConversionError("hostname: is required")
    vips = []
    for i, a in enumerate(s.addresses):
        ip = ip_from_bytes(a.address, f"addresses[{i}].address")
        if a.HasField("length") and a.length != ip.max_prefixlen:
            raise ConversionError(f"addresses[{i}]: CIDR service addresses are not supported")
        vips.append(NetworkAddress(a.network, ip))
    ports = []
    for i, p in enumerate(s.ports):
        sp = _port(p.service_port, f"ports[{i}].service_port")
        # 0 = a named target port, resolved per workload; fall back to the service port
        # (Kubernetes' default targetPort) when a workload does not say.
        tp = _port(p.target_port, f"ports[{i}].target_port", allow_zero=True) or sp
        proto = wpb.AppProtocol.Name(p.app_protocol) if p.app_protocol in _APP_PROTOCOLS else ""
        ports.append(ServicePort(sp, tp, "" if proto == "UNKNOWN" else proto))
    for i, san in enumerate(s.subject_alt_names):
        try:
            SpiffeId.parse(san)
        except IdentityError as e:
            raise ConversionError(f"subject_alt_names[{i}]: {e}") from None
    return Service(
        name=s.name,
        namespace=s.namespace,
        hostname=s.hostname,
        vips=tuple(vips),
        ports=tuple(ports),
        subject_alt_names=tuple(s.subject_alt_names),
        waypoint=_gateway(s.waypoint, "waypoint") if s.HasField("waypoint") else None,
    )


_APP_PROTOCOLS = frozenset(wpb.AppProtocol.values())
_APP_PROTOCOL_NAMES = frozenset(wpb.AppProtocol.keys())


def address_from_proto(a: wpb.Address) -> Workload | Service:
    kind = a.WhichOneof("type")
    try:
        if kind == "workload":
            return workload_from_proto(a.workload)
        if kind == "service":
            return service_from_proto(a.service)
    except ConversionError as e:
        raise ConversionError(f"{kind}.{e}") from None
    raise ConversionError("Address holds neither a workload nor a service")


def address_from_any(resource: any_pb2.Any) -> Workload | Service:
    msg = wpb.Address()
    unpack(resource, ADDRESS_TYPE, msg)
    return address_from_proto(msg)


def _string_matches(items: Iterable[apb.StringMatch]) -> tuple[StringMatch, ...]:
    out = []
    for m in items:
        kind = m.WhichOneof("match_type")
        # A StringMatch with nothing set matches nothing: skipped, as istio/ztunnel does.
        if kind == "exact":
            out.append(StringMatch.exact(m.exact))
        elif kind == "prefix":
            out.append(StringMatch.prefix(m.prefix))
        elif kind == "suffix":
            out.append(StringMatch.suffix(m.suffix))
        elif kind == "presence":
            out.append(StringMatch.presence())
    return tuple(out)


def _networks(items: Iterable[apb.Address], field: str) -> tuple[IPNetwork, ...]:
    out = []
    for i, a in enumerate(items):
        ip = ip_from_bytes(a.address, f"{field}[{i}].address")
        if a.length > ip.max_prefixlen:
            raise ConversionError(f"{field}[{i}].length: {a.length} is longer than the address")
        out.append(ipaddress.ip_network(f"{ip}/{a.length}", strict=False))
    return tuple(out)


def _match(m: apb.Match, field: str) -> Match:
    return Match(
        namespaces=_string_matches(m.namespaces),
        not_namespaces=_string_matches(m.not_namespaces),
        principals=_string_matches(m.principals),
        not_principals=_string_matches(m.not_principals),
        source_ips=_networks(m.source_ips, f"{field}.source_ips"),
        not_source_ips=_networks(m.not_source_ips, f"{field}.not_source_ips"),
        destination_ips=_networks(m.destination_ips, f"{field}.destination_ips"),
        not_destination_ips=_networks(m.not_destination_ips, f"{field}.not_destination_ips"),
        destination_ports=tuple(
            _port(p, f"{field}.destination_ports") for p in m.destination_ports
        ),
        not_destination_ports=tuple(
            _port(p, f"{field}.not_destination_ports") for p in m.not_destination_ports
        ),
        service_accounts=tuple(
            ServiceAccountMatch(s.namespace, s.serviceAccount) for s in m.service_accounts
        ),
        not_service_accounts=tuple(
            ServiceAccountMatch(s.namespace, s.serviceAccount) for s in m.not_service_accounts
        ),
    )


def policy_from_proto(p: apb.Authorization) -> AuthorizationPolicy:
    if not p.name or not p.namespace:
        raise ConversionError("name and namespace are required")
    rules: list[Rule] = []
    for r, rule in enumerate(p.rules):
        clauses: list[Clause] = []
        for c, clause in enumerate(rule.clauses):
            clauses.append(
                tuple(
                    _match(m, f"rules[{r}].clauses[{c}].matches[{k}]")
                    for k, m in enumerate(clause.matches)
                )
            )
        rules.append(tuple(clauses))
    return AuthorizationPolicy(
        name=p.name,
        namespace=p.namespace,
        scope=_enum(_SCOPES, p.scope, "scope"),
        action=_enum(_ACTIONS, p.action, "action"),
        rules=tuple(rules),
        dry_run=p.dry_run,
    )


def policy_from_any(resource: any_pb2.Any) -> AuthorizationPolicy:
    msg = apb.Authorization()
    unpack(resource, AUTHORIZATION_TYPE, msg)
    return policy_from_proto(msg)


# ---- model -> istiod (the test istiod) ------------------------------------------------------


def _reverse(table: Mapping[Any, T]) -> dict[T, Any]:
    return {v: k for k, v in table.items()}


_PROTOCOLS_R = _reverse(_PROTOCOLS)
_STATUS_R = _reverse(_STATUS)
_WORKLOAD_TYPES_R = _reverse(_WORKLOAD_TYPES)
_SCOPES_R = _reverse(_SCOPES)
_ACTIONS_R = _reverse(_ACTIONS)


def _gateway_to_proto(gw: GatewayAddress) -> wpb.GatewayAddress:
    out = wpb.GatewayAddress(hbone_mtls_port=gw.hbone_mtls_port)
    dest = gw.destination
    if isinstance(dest, NamespacedHostname):
        out.hostname.namespace = dest.namespace
        out.hostname.hostname = dest.hostname
    else:
        out.address.network = dest.network
        out.address.address = dest.address.packed
    return out


def workload_to_proto(w: Workload) -> wpb.Workload:
    """`labels` are not on the wire: istiod resolves selectors into `authorization_policies`."""
    if w.workload_type not in _WORKLOAD_TYPES_R:
        raise ConversionError(
            f"workload {w.uid}: workload_type {w.workload_type!r} has no istio.workload value "
            f"(one of {', '.join(sorted(map(str, _WORKLOAD_TYPES_R)))})"
        )
    out = wpb.Workload(
        uid=w.uid,
        name=w.name,
        namespace=w.namespace,
        addresses=[a.packed for a in w.addresses],
        hostname=w.hostname,
        network=w.network,
        tunnel_protocol=_PROTOCOLS_R[w.protocol],
        trust_domain=w.trust_domain,
        service_account=w.service_account,
        node=w.node,
        canonical_name=w.canonical_name,
        canonical_revision=w.canonical_revision,
        workload_type=_WORKLOAD_TYPES_R[w.workload_type],
        workload_name=w.workload_name,
        authorization_policies=list(w.authorization_policies),
        status=_STATUS_R[w.status],
        cluster_id=w.cluster_id,
    )
    if w.waypoint is not None:
        out.waypoint.CopyFrom(_gateway_to_proto(w.waypoint))
    for key, ports in w.services.items():
        out.services[key].ports.extend(
            wpb.Port(service_port=sp, target_port=tp) for sp, tp in ports.items()
        )
    return out


def service_to_proto(s: Service) -> wpb.Service:
    out = wpb.Service(
        name=s.name,
        namespace=s.namespace,
        hostname=s.hostname,
        addresses=[wpb.NetworkAddress(network=v.network, address=v.address.packed) for v in s.vips],
        subject_alt_names=list(s.subject_alt_names),
    )
    for p in s.ports:
        app = p.app_protocol.upper()
        port = wpb.Port(service_port=p.service_port, target_port=p.target_port)
        if app in _APP_PROTOCOL_NAMES:
            port.app_protocol = wpb.AppProtocol.Value(app)
        out.ports.append(port)
    if s.waypoint is not None:
        out.waypoint.CopyFrom(_gateway_to_proto(s.waypoint))
    return out


def _string_matches_to_proto(items: Iterable[StringMatch]) -> list[apb.StringMatch]:
    out = []
    for m in items:
        sm = apb.StringMatch()
        if m.kind is StringMatchKind.PRESENCE:
            sm.presence.SetInParent()
        else:
            setattr(sm, m.kind.value, m.value)
        out.append(sm)
    return out


def _networks_to_proto(items: Iterable[IPNetwork]) -> list[apb.Address]:
    return [apb.Address(address=n.network_address.packed, length=n.prefixlen) for n in items]


def _match_to_proto(m: Match) -> apb.Match:
    out = apb.Match(
        destination_ports=list(m.destination_ports),
        not_destination_ports=list(m.not_destination_ports),
    )
    for name in ("namespaces", "not_namespaces", "principals", "not_principals"):
        getattr(out, name).extend(_string_matches_to_proto(getattr(m, name)))
    for name in ("source_ips", "not_source_ips", "destination_ips", "not_destination_ips"):
        getattr(out, name).extend(_networks_to_proto(getattr(m, name)))
    for name in ("service_accounts", "not_service_accounts"):
        getattr(out, name).extend(
            apb.ServiceAccountMatch(namespace=s.namespace, serviceAccount=s.service_account)
            for s in getattr(m, name)
        )
    return out


def policy_to_proto(p: AuthorizationPolicy) -> apb.Authorization:
    """Local selectors are not on the wire (istiod lists the policy on each workload)."""
    return apb.Authorization(
        name=p.name,
        namespace=p.namespace,
        scope=_SCOPES_R[p.scope],
        action=_ACTIONS_R[p.action],
        dry_run=p.dry_run,
        rules=[
            apb.Rule(clauses=[apb.Clause(matches=[_match_to_proto(m) for m in c]) for c in rule])
            for rule in p.rules
        ],
    )


def address_to_proto(item: Workload | Service) -> wpb.Address:
    if isinstance(item, Workload):
        return wpb.Address(workload=workload_to_proto(item))
    return wpb.Address(service=service_to_proto(item))


def resource_name(item: Workload | Service | AuthorizationPolicy) -> str:
    """The xDS resource name istiod uses (WIRE.md): workload uid, `<ns>/<hostname>`,
    `<ns>/<policy name>`."""
    if isinstance(item, Workload):
        return item.uid
    return item.key


def to_any(message: Message, type_url: str) -> any_pb2.Any:
    return any_pb2.Any(type_url=type_url, value=message.SerializeToString(deterministic=True))
