"""Loading configuration documents into a `ConfigSet`: every supported resource parsed into its
frozen record (in document order), the warnings met, and what was skipped and why.

Documents of other shapes are not errors here: ztunnel's local-config documents (workloads,
services, policies) belong to the mesh state, and resources of kinds this package does not
model are listed in `skipped` so that tools can report them."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ztunnel.meshconfig.gateway import (
    GATEWAY_API_VERSIONS,
    Gateway,
    GatewayHTTPRoute,
    ReferenceGrant,
    parse_gateway,
    parse_http_route,
    parse_reference_grant,
)
from ztunnel.meshconfig.kube import (
    WORKLOAD_KINDS,
    KubeService,
    Namespace,
    Pod,
    Workload,
    parse_namespace,
    parse_pod,
    parse_service,
    parse_workload,
)
from ztunnel.meshconfig.networking import (
    NETWORKING_API_VERSIONS,
    DestinationRule,
    VirtualService,
    parse_destination_rule,
    parse_virtual_service,
)
from ztunnel.meshconfig.registry import (
    IstioGateway,
    ServiceEntry,
    parse_istio_gateway,
    parse_service_entry,
)
from ztunnel.meshconfig.resource import (
    ConfigWarning,
    Fields,
    ResourceError,
    ResourceMeta,
    read_meta,
)
from ztunnel.meshconfig.security import (
    SECURITY_API_VERSIONS,
    AuthorizationPolicy,
    parse_authorization_policy,
)
from ztunnel.meshconfig.source import SourceDocument, read_documents

T = TypeVar("T")

# (kind, api versions, namespaced)
KINDS: dict[str, tuple[tuple[str, ...], bool]] = {
    "VirtualService": (NETWORKING_API_VERSIONS, True),
    "DestinationRule": (NETWORKING_API_VERSIONS, True),
    "HTTPRoute": (GATEWAY_API_VERSIONS, True),
    "Gateway": (GATEWAY_API_VERSIONS, True),
    "ReferenceGrant": (("gateway.networking.k8s.io/v1beta1", "gateway.networking.k8s.io/v1"), True),
    "AuthorizationPolicy": (SECURITY_API_VERSIONS, True),
    "Service": (("v1",), True),
    "Pod": (("v1",), True),
    "Namespace": (("v1",), False),
}
# Kinds only analysis needs (`ConfigOptions.analysis_kinds`): registry entries, Istio's own
# Gateway, and the controllers whose pod templates selectors and subsets must match.
ANALYSIS_KINDS: dict[str, tuple[tuple[str, ...], bool]] = {
    "ServiceEntry": (NETWORKING_API_VERSIONS, True),
    **{k: (("apps/v1",), True) for k in WORKLOAD_KINDS},
}
# Kinds whose name another API group also uses: (kind, api group) -> the key in the parser
# table. The `networking.istio.io` Gateway is not the Gateway API's.
ALTERNATE_KINDS: dict[tuple[str, str], str] = {("Gateway", "networking.istio.io"): "IstioGateway"}
LOCAL_CONFIG_KEYS = frozenset({"workloads", "services", "policies"})


@dataclass(frozen=True, slots=True)
class Skipped:
    """A document this package does not model, and why (tools may report it)."""

    file: str
    line: int
    kind: str
    name: str
    reason: str


@dataclass(frozen=True)
class ConfigOptions:
    root_namespace: str = "istio-system"
    domain: str = "cluster.local"
    # PILOT_ENABLE_DESTINATION_RULE_INHERITANCE: host-less DestinationRules in the root
    # namespace or a namespace are inherited by the specific rules below them.
    destination_rule_inheritance: bool = False
    # The namespace of resources that do not name one (`kubectl apply -n`).
    default_namespace: str = "default"
    # Also parse ANALYSIS_KINDS and the networking.istio.io Gateway (else they are skipped).
    analysis_kinds: bool = False


@dataclass
class ConfigSet:
    """Every resource loaded, parsed but not compiled, in document order."""

    options: ConfigOptions = field(default_factory=ConfigOptions)
    virtual_services: list[VirtualService] = field(default_factory=list)
    destination_rules: list[DestinationRule] = field(default_factory=list)
    http_routes: list[GatewayHTTPRoute] = field(default_factory=list)
    gateways: list[Gateway] = field(default_factory=list)
    reference_grants: list[ReferenceGrant] = field(default_factory=list)
    authorization_policies: list[AuthorizationPolicy] = field(default_factory=list)
    services: list[KubeService] = field(default_factory=list)
    pods: list[Pod] = field(default_factory=list)
    namespaces: list[Namespace] = field(default_factory=list)
    service_entries: list[ServiceEntry] = field(default_factory=list)
    istio_gateways: list[IstioGateway] = field(default_factory=list)
    workloads: list[Workload] = field(default_factory=list)  # Deployments, StatefulSets...
    warnings: list[ConfigWarning] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    documents: list[SourceDocument] = field(default_factory=list)

    def resources(self) -> Iterable[Any]:
        yield from self.virtual_services
        yield from self.destination_rules
        yield from self.http_routes
        yield from self.gateways
        yield from self.reference_grants
        yield from self.authorization_policies
        yield from self.services
        yield from self.pods
        yield from self.namespaces
        yield from self.service_entries
        yield from self.istio_gateways
        yield from self.workloads

    def namespace(self, name: str) -> Namespace | None:
        return next((n for n in self.namespaces if n.meta.name == name), None)

    def gateway(self, namespace: str, name: str) -> Gateway | None:
        return next(
            (g for g in self.gateways if g.meta.namespace == namespace and g.meta.name == name),
            None,
        )


def _expand(doc: SourceDocument) -> list[SourceDocument]:
    """A `kind: List` (kubectl get -o yaml) becomes its items, each keeping its own lines."""
    obj = doc.obj
    if not (
        isinstance(obj, Mapping)
        and obj.get("kind") == "List"
        and isinstance(obj.get("items"), list)
    ):
        return [doc]
    out = []
    for i, item in enumerate(obj["items"]):
        prefix = ("items", i)
        lines = {k[2:]: v for k, v in doc.lines.items() if k[:2] == prefix}
        out.append(
            SourceDocument(item, doc.file, doc.index, doc.lines.get(prefix, doc.line), lines)
        )
    return out


def parse_documents(
    docs: Iterable[SourceDocument],
    options: ConfigOptions | None = None,
    errors: list[ResourceError] | None = None,
) -> ConfigSet:
    """Parse documents into a ConfigSet; a bad field raises `ResourceError` (a ConfigError)
    naming the file, line, resource and field path. With `errors`, a bad document is recorded
    there instead and left out, and the other documents are still parsed (`ztunnel analyze`
    reports every bad resource, not just the first)."""
    cs = ConfigSet(options or ConfigOptions())
    seen: dict[tuple[str, str, str, str], ResourceMeta] = {}
    parsers: dict[str, tuple[Callable[[Fields, ResourceMeta], Any], list[Any]]] = {
        "VirtualService": (parse_virtual_service, cs.virtual_services),
        "DestinationRule": (
            lambda f, m: parse_destination_rule(f, m, cs.options.destination_rule_inheritance),
            cs.destination_rules,
        ),
        "HTTPRoute": (parse_http_route, cs.http_routes),
        "Gateway": (parse_gateway, cs.gateways),
        "ReferenceGrant": (parse_reference_grant, cs.reference_grants),
        "AuthorizationPolicy": (parse_authorization_policy, cs.authorization_policies),
        "Service": (parse_service, cs.services),
        "Pod": (parse_pod, cs.pods),
        "Namespace": (parse_namespace, cs.namespaces),
        "ServiceEntry": (parse_service_entry, cs.service_entries),
        "IstioGateway": (parse_istio_gateway, cs.istio_gateways),
        **{k: (parse_workload, cs.workloads) for k in WORKLOAD_KINDS},
    }
    order = 0
    for top in docs:
        for doc in _expand(top):
            cs.documents.append(doc)
            f = Fields(doc, cs.warnings)
            try:
                parsed = _parse_one(cs, f, order, seen)
                if parsed is not None:
                    order += 1
                    key, meta = parsed
                    parse, into = parsers[key]
                    into.append(parse(f, meta))
            except ResourceError as e:
                if errors is None:
                    raise
                errors.append(e)
    return cs


def _parse_one(
    cs: ConfigSet, f: Fields, order: int, seen: dict[tuple[str, str, str, str], ResourceMeta]
) -> tuple[str, ResourceMeta] | None:
    """The parser key and metadata of one document; None when it is skipped (recorded)."""
    doc = f.doc
    obj = f.mapping(doc.obj, "")
    kind = obj.get("kind")
    if kind is None:
        if set(obj) <= LOCAL_CONFIG_KEYS:
            cs.skipped.append(Skipped(doc.file, doc.line, "", "", "mesh state (local config)"))
            return None
        raise f.fail("kind", "is required (or the document is not a resource)")
    kind = f.string(kind, "kind")
    api = f.string(obj.get("apiVersion"), "apiVersion")
    group = api.rpartition("/")[0]
    versions: tuple[str, ...]
    extra = cs.options.analysis_kinds
    key = ALTERNATE_KINDS.get((kind, group), kind) if extra else kind
    if key != kind:
        versions, namespaced = NETWORKING_API_VERSIONS, True
    elif kind in KINDS:
        versions, namespaced = KINDS[kind]
    elif extra and kind in ANALYSIS_KINDS:
        versions, namespaced = ANALYSIS_KINDS[kind]
    else:
        name = str(f.mapping(obj.get("metadata"), "metadata").get("name", ""))
        cs.skipped.append(Skipped(doc.file, doc.line, kind, name, "kind not modelled"))
        return None
    if api not in versions:
        if kind in ("Service", "Pod", "Namespace", "Gateway") or kind in WORKLOAD_KINDS:
            # A different resource of the same kind name (another API group)
            name = str(f.mapping(obj.get("metadata"), "metadata").get("name", ""))
            cs.skipped.append(
                Skipped(doc.file, doc.line, kind, name, f"apiVersion {api} not modelled")
            )
            return None
        raise f.fail("apiVersion", f"expected one of {', '.join(versions)}, got {api!r}")
    f.check_keys(obj, "", ("apiVersion", "kind", "metadata", "spec", "status"))
    meta = read_meta(f, kind, api, order, namespaced, cs.options.default_namespace)
    f.meta = meta
    ident = (group, *meta.key)
    if ident in seen:
        first = seen[ident]
        raise f.fail("metadata.name", f"duplicate {meta.label} (first at {first.origin})")
    seen[ident] = meta
    return key, meta


def load_config(paths: Iterable[str | Path], options: ConfigOptions | None = None) -> ConfigSet:
    """Read files/directories of YAML and parse them (ConfigError on the first bad field)."""
    return parse_documents(read_documents(list(paths)), options)


def by_order(items: Iterable[T], key: Callable[[T], ResourceMeta]) -> list[T]:
    """Resources in Istio's order of precedence (oldest first)."""
    return sorted(items, key=lambda r: key(r).sort_key)
