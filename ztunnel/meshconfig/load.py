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
    KubeService,
    Namespace,
    Pod,
    parse_namespace,
    parse_pod,
    parse_service,
)
from ztunnel.meshconfig.networking import (
    NETWORKING_API_VERSIONS,
    DestinationRule,
    VirtualService,
    parse_destination_rule,
    parse_virtual_service,
)
from ztunnel.meshconfig.resource import ConfigWarning, Fields, ResourceMeta, read_meta
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
    docs: Iterable[SourceDocument], options: ConfigOptions | None = None
) -> ConfigSet:
    """Parse documents into a ConfigSet; a bad field raises `ResourceError` (a ConfigError)
    naming the file, line, resource and field path."""
    cs = ConfigSet(options or ConfigOptions())
    seen: dict[tuple[str, str, str], ResourceMeta] = {}
    order = 0
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
    }
    for top in docs:
        for doc in _expand(top):
            cs.documents.append(doc)
            f = Fields(doc, cs.warnings)
            obj = f.mapping(doc.obj, "")
            kind = obj.get("kind")
            if kind is None:
                if set(obj) <= LOCAL_CONFIG_KEYS:
                    cs.skipped.append(
                        Skipped(doc.file, doc.line, "", "", "mesh state (local config)")
                    )
                    continue
                raise f.fail("kind", "is required (or the document is not a resource)")
            kind = f.string(kind, "kind")
            api = f.string(obj.get("apiVersion"), "apiVersion")
            if kind not in KINDS:
                name = str(f.mapping(obj.get("metadata"), "metadata").get("name", ""))
                cs.skipped.append(Skipped(doc.file, doc.line, kind, name, "kind not modelled"))
                continue
            versions, namespaced = KINDS[kind]
            if api not in versions:
                if kind in ("Service", "Pod", "Namespace", "Gateway"):
                    # e.g. networking.istio.io Gateway: a different resource of the same name
                    name = str(f.mapping(obj.get("metadata"), "metadata").get("name", ""))
                    cs.skipped.append(
                        Skipped(doc.file, doc.line, kind, name, f"apiVersion {api} not modelled")
                    )
                    continue
                raise f.fail("apiVersion", f"expected one of {', '.join(versions)}, got {api!r}")
            f.check_keys(obj, "", ("apiVersion", "kind", "metadata", "spec", "status"))
            meta = read_meta(f, kind, api, order, namespaced)
            order += 1
            f.meta = meta
            if meta.key in seen:
                first = seen[meta.key]
                raise f.fail("metadata.name", f"duplicate {meta.label} (first at {first.origin})")
            seen[meta.key] = meta
            parse, into = parsers[kind]
            into.append(parse(f, meta))
    return cs


def load_config(paths: Iterable[str | Path], options: ConfigOptions | None = None) -> ConfigSet:
    """Read files/directories of YAML and parse them (ConfigError on the first bad field)."""
    return parse_documents(read_documents(list(paths)), options)


def by_order(items: Iterable[T], key: Callable[[T], ResourceMeta]) -> list[T]:
    """Resources in Istio's order of precedence (oldest first)."""
    return sorted(items, key=lambda r: key(r).sort_key)
