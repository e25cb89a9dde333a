"""The local mesh-state file (`--local-xds` / LOCAL_XDS_PATH) in Istio ztunnel's local-config shape.

A file (or a directory of `*.yaml` files) holds one or more YAML documents: local-config
documents with `workloads`, `services` and `policies`, and Istio resources
(`AuthorizationPolicy`, `PeerAuthentication`) that the authorization layer converts. Every
error names the file, the path of the bad field and why.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from ztunnel import safeyaml
from ztunnel.errors import ConfigError, IdentityError
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
from ztunnel.state import MeshState

log = logging.getLogger(__name__)

ISTIO_KINDS = ("AuthorizationPolicy", "PeerAuthentication")
# Kinds the same files may hold for waypoints; the node agent skips them.
WAYPOINT_KINDS = frozenset(
    {"VirtualService", "DestinationRule", "HTTPRoute", "Gateway", "ReferenceGrant"}
    | {"Service", "Pod", "Namespace", "List"}
)


class _Ctx:
    """Where we are in the file, for error messages."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, path: str, reason: str) -> ConfigError:
        return ConfigError(self.source, path, reason)


def _mapping(ctx: _Ctx, value: Any, path: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ctx.fail(path, f"expected a mapping, got {type(value).__name__}")
    return value


def _list(ctx: _Ctx, value: Any, path: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ctx.fail(path, f"expected a list, got {type(value).__name__}")
    return value


def _str(ctx: _Ctx, obj: Mapping[str, Any], key: str, path: str, default: str | None = None) -> str:
    value = obj.get(key, default)
    if value is None:
        raise ctx.fail(f"{path}.{key}", "is required")
    if not isinstance(value, str):
        raise ctx.fail(f"{path}.{key}", f"expected a string, got {type(value).__name__}")
    return value


def _ip(ctx: _Ctx, value: Any, path: str) -> IPAddress:
    if not isinstance(value, str):
        raise ctx.fail(path, f"expected an IP address string, got {type(value).__name__}")
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise ctx.fail(path, f"not an IP address: {value!r}") from None


def _port(ctx: _Ctx, value: Any, path: str) -> int:
    if isinstance(value, bool):
        raise ctx.fail(path, "expected a port number")
    try:
        port = int(value)
    except (TypeError, ValueError):
        raise ctx.fail(path, f"not a port number: {value!r}") from None
    if not 1 <= port <= 65535:
        raise ctx.fail(path, f"port out of range 1-65535: {port}")
    return port


def _network_address(ctx: _Ctx, value: Any, path: str) -> NetworkAddress:
    """`"10.0.0.1"` or `"network/10.0.0.1"` (ztunnel's form, network may be empty)."""
    if not isinstance(value, str):
        raise ctx.fail(path, "expected an address string like '10.0.0.1' or 'network/10.0.0.1'")
    network, _, addr = value.rpartition("/")
    return NetworkAddress(network, _ip(ctx, addr, path))


def _gateway(ctx: _Ctx, value: Any, path: str) -> GatewayAddress | None:
    """A waypoint: `"ip"`, `"ns/hostname"`, or a mapping with `destination`/`address`/
    `hostname` and `hboneMtlsPort`."""
    if value is None:
        return None
    port = HBONE_PORT
    dest: Any = value
    if isinstance(value, Mapping):
        port = _port(ctx, value.get("hboneMtlsPort", HBONE_PORT), f"{path}.hboneMtlsPort")
        dest = value.get("destination", value.get("address", value.get("hostname")))
        if isinstance(dest, Mapping):
            key = next(k for k in ("destination", "address", "hostname") if k in value)
            ns = _str(ctx, dest, "namespace", f"{path}.{key}")
            host = _str(ctx, dest, "hostname", f"{path}.{key}")
            return GatewayAddress(NamespacedHostname(ns, host), port)
        if dest is None:
            raise ctx.fail(path, "needs 'destination' (an address or 'namespace/hostname')")
    if not isinstance(dest, str):
        raise ctx.fail(path, "expected an address or 'namespace/hostname'")
    head, _, tail = dest.rpartition("/")
    try:
        ipaddress.ip_address(tail)
    except ValueError:
        if not head:
            raise ctx.fail(path, f"not an address nor 'namespace/hostname': {dest!r}") from None
        return GatewayAddress(NamespacedHostname(head, tail), port)
    return GatewayAddress(_network_address(ctx, dest, path), port)


def _port_map(ctx: _Ctx, value: Any, path: str) -> dict[int, int]:
    out: dict[int, int] = {}
    for k, v in _mapping(ctx, value, path).items():
        out[_port(ctx, k, f"{path}.{k}")] = _port(ctx, v, f"{path}.{k}")
    return out


def _labels(ctx: _Ctx, value: Any, path: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in _mapping(ctx, value, path).items():
        if not isinstance(k, str) or not isinstance(v, str | int | float | bool):
            raise ctx.fail(f"{path}.{k}", "labels map strings to strings")
        out[k] = str(v)
    return out


def _workload(ctx: _Ctx, raw: Any, path: str) -> Workload:
    obj = _mapping(ctx, raw, path)
    name = _str(ctx, obj, "name", path)
    namespace = _str(ctx, obj, "namespace", path, "default")
    ips_raw = obj.get("workloadIps")
    if ips_raw is None and "workloadIp" in obj:
        ips_raw = [obj["workloadIp"]]
    ips = tuple(
        _ip(ctx, v, f"{path}.workloadIps[{i}]")
        for i, v in enumerate(_list(ctx, ips_raw, f"{path}.workloadIps"))
    )
    if not ips:
        raise ctx.fail(f"{path}.workloadIps", "at least one address is required")
    proto_raw = _str(ctx, obj, "protocol", path, "HBONE").upper()
    try:
        protocol = TunnelProtocol(proto_raw)
    except ValueError:
        raise ctx.fail(f"{path}.protocol", f"must be HBONE or TCP, got {proto_raw!r}") from None
    status_raw = _str(ctx, obj, "status", path, "HEALTHY").upper()
    try:
        status = WorkloadStatus(status_raw)
    except ValueError:
        raise ctx.fail(f"{path}.status", "must be HEALTHY or UNHEALTHY") from None
    services: dict[str, dict[int, int]] = {}
    for key, ports in _mapping(ctx, obj.get("services"), f"{path}.services").items():
        if not isinstance(key, str) or "/" not in key:
            raise ctx.fail(f"{path}.services.{key}", "key must be 'namespace/hostname'")
        services[key] = _port_map(ctx, ports, f"{path}.services.{key}")
    uid = _str(ctx, obj, "uid", path, f"Kubernetes//Pod/{namespace}/{name}")
    w = Workload(
        uid=uid,
        name=name,
        namespace=namespace,
        addresses=ips,
        service_account=_str(ctx, obj, "serviceAccount", path, DEFAULT_SERVICE_ACCOUNT),
        trust_domain=_str(ctx, obj, "trustDomain", path, DEFAULT_TRUST_DOMAIN),
        protocol=protocol,
        node=_str(ctx, obj, "node", path, ""),
        network=_str(ctx, obj, "network", path, ""),
        hostname=_str(ctx, obj, "hostname", path, ""),
        canonical_name=_str(ctx, obj, "canonicalName", path, ""),
        canonical_revision=_str(ctx, obj, "canonicalRevision", path, ""),
        workload_type=_str(ctx, obj, "workloadType", path, "pod").lower(),
        workload_name=_str(ctx, obj, "workloadName", path, ""),
        cluster_id=_str(ctx, obj, "clusterId", path, "Kubernetes"),
        status=status,
        waypoint=_gateway(ctx, obj.get("waypoint"), f"{path}.waypoint"),
        services=services,
        labels=_labels(ctx, obj.get("labels"), f"{path}.labels"),
        authorization_policies=tuple(
            str(p)
            for p in _list(ctx, obj.get("authorizationPolicies"), f"{path}.authorizationPolicies")
        ),
    )
    try:
        _ = w.identity
    except IdentityError as e:
        raise ctx.fail(path, str(e)) from None
    return w


def _service(ctx: _Ctx, raw: Any, path: str) -> Service:
    obj = _mapping(ctx, raw, path)
    ports_raw = obj.get("ports")
    ports: list[ServicePort] = []
    if isinstance(ports_raw, list):
        for i, p in enumerate(ports_raw):
            pp = _mapping(ctx, p, f"{path}.ports[{i}]")
            sp = _port(ctx, pp.get("servicePort"), f"{path}.ports[{i}].servicePort")
            tp = _port(ctx, pp.get("targetPort", sp), f"{path}.ports[{i}].targetPort")
            ports.append(ServicePort(sp, tp, str(pp.get("appProtocol", ""))))
    else:
        ports = [ServicePort(s, t) for s, t in _port_map(ctx, ports_raw, f"{path}.ports").items()]
    sans = _list(ctx, obj.get("subjectAltNames"), f"{path}.subjectAltNames")
    for i, san in enumerate(sans):
        try:
            SpiffeId.parse(str(san))
        except IdentityError as e:
            raise ctx.fail(f"{path}.subjectAltNames[{i}]", str(e)) from None
    vips_raw = obj.get("vips")
    if isinstance(vips_raw, Mapping):  # tolerate {"net/ip": {}} maps
        vips_raw = list(vips_raw)
    return Service(
        name=_str(ctx, obj, "name", path),
        namespace=_str(ctx, obj, "namespace", path, "default"),
        hostname=_str(ctx, obj, "hostname", path),
        vips=tuple(
            _network_address(ctx, v, f"{path}.vips[{i}]")
            for i, v in enumerate(_list(ctx, vips_raw, f"{path}.vips"))
        ),
        ports=tuple(ports),
        subject_alt_names=tuple(str(s) for s in sans),
        waypoint=_gateway(ctx, obj.get("waypoint"), f"{path}.waypoint"),
    )


def parse_documents(
    docs: list[Any], source: str, doc_sources: list[str] | None = None
) -> MeshState:
    """Turn parsed YAML documents into a MeshState; raises ConfigError naming the bad field.
    `doc_sources` names the file of each document when they come from several files."""
    from ztunnel.authz import parse_istio_resources, parse_local_policies, select_policies

    ctx = _Ctx(source)
    workloads: list[Workload] = []
    # where each workload was defined: (file, field path), for duplicate errors
    origins: list[tuple[str, str]] = []
    services: list[Service] = []
    policies: list[Any] = []
    istio_docs: list[tuple[str, Mapping[str, Any]]] = []
    warnings: list[str] = []
    for d, doc in enumerate(docs):
        if doc is None:
            continue
        doc_source = doc_sources[d] if doc_sources else source
        prefix = f"document[{d}]" if len(docs) > 1 and not doc_sources else ""
        obj = _mapping(ctx, doc, prefix or "<top>")
        if "kind" in obj and obj.get("kind") in ISTIO_KINDS:
            istio_docs.append((prefix or "<top>", obj))
            continue
        if "kind" in obj and obj.get("kind") in WAYPOINT_KINDS:
            continue  # traffic-management resources: read by waypoints (ztunnel.meshconfig)
        if "kind" in obj:
            raise ctx.fail(
                f"{prefix}.kind" if prefix else "kind", f"unsupported kind {obj.get('kind')!r}"
            )
        unknown = set(obj) - {"workloads", "services", "policies"}
        if unknown:
            raise ctx.fail(prefix or "<top>", f"unknown keys: {sorted(map(str, unknown))}")
        dot = f"{prefix}." if prefix else ""
        for i, raw in enumerate(_list(ctx, obj.get("workloads"), f"{dot}workloads")):
            workloads.append(_workload(ctx, raw, f"{dot}workloads[{i}]"))
            origins.append((doc_source, f"{dot}workloads[{i}]"))
        for i, raw in enumerate(_list(ctx, obj.get("services"), f"{dot}services")):
            services.append(_service(ctx, raw, f"{dot}services[{i}]"))
        policies.extend(
            parse_local_policies(
                _list(ctx, obj.get("policies"), f"{dot}policies"),
                source,
                f"{dot}policies",
                warnings=warnings,
            )
        )
    policies.extend(parse_istio_resources(istio_docs, source, warnings=warnings))
    # Like istiod: a workload names the selector policies whose labels select it.
    workloads = [
        replace(
            w,
            authorization_policies=tuple(
                sorted(
                    set(w.authorization_policies)
                    | set(select_policies(policies, w.namespace, w.labels))
                )
            ),
        )
        for w in workloads
    ]
    for warning in warnings:
        log.warning("%s", warning)
    seen_uid: dict[str, int] = {}
    seen_ip: dict[IPAddress, int] = {}
    for n, w in enumerate(workloads):
        file, path = origins[n]
        if w.uid in seen_uid:
            first = workloads[seen_uid[w.uid]]
            raise ConfigError(
                file, f"{path}.uid", f"duplicate uid {w.uid!r} (also workload {first.name!r})"
            )
        seen_uid[w.uid] = n
        for k, ip in enumerate(w.addresses):
            if ip in seen_ip:
                other = seen_ip[ip]
                ofile, opath = origins[other]
                where = opath if ofile == file else f"{ofile}: {opath}"
                raise ConfigError(
                    file,
                    f"{path}.workloadIps[{k}]",
                    f"address {ip} of workload {w.name!r} is already used by workload "
                    f"{workloads[other].name!r} ({where})",
                )
            seen_ip[ip] = n
    return MeshState.build(workloads, services, policies)


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml", ".json"))
    return [path]


def load_mesh_state(path: str | Path) -> MeshState:
    """Read a file or a directory of YAML files; ConfigError names the file and field."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(str(p), "", "no such file or directory")
    docs: list[Any] = []
    sources: list[str] = []
    for f in _files(p):
        try:
            text = f.read_text()
        except OSError as e:
            raise ConfigError(str(f), "", f"cannot read: {e.strerror}") from None
        loaded = safeyaml.load_all(text, str(f))
        docs.extend(loaded)
        sources.extend([str(f)] * len(loaded))
    if p.is_dir():
        # Validate per file so that errors name the right file, then build the state from
        # all documents together (a policy in one file may select workloads of another).
        for f in _files(p):
            parse_documents([d for d, s in zip(docs, sources, strict=True) if s == str(f)], str(f))
        return parse_documents(docs, str(p), sources)
    return parse_documents(docs, str(p))


def fingerprint(path: str | Path) -> tuple[tuple[str, int, int], ...]:
    """What changes when the file or directory changes (name, mtime_ns, size), for reloads."""
    out = []
    for f in _files(Path(path)):
        try:
            st = f.stat()
        except OSError:
            continue
        out.append((str(f), st.st_mtime_ns, st.st_size))
    return tuple(out)
