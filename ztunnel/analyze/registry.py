"""The service registry as istioctl's analyzers see it: Kubernetes Services and ServiceEntry
hosts keyed by the namespace they are visible in (`*` for all) and FQDN, with Istio's lookup
of a destination host (istio/istio pkg/config/analysis/analyzers/util: service_lookup.go
`InitServiceEntryHostMap`, `GetDestinationHost`; hosts.go `ScopedFqdn`,
`GetResourceNameFromHost`; pkg/config/host `Name.Matches`)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ztunnel.analyze.context import Context
from ztunnel.meshconfig.hosts import resolve_host

EXPORT_TO_ANNOTATION = "networking.istio.io/exportTo"
ALL = "*"
LOCAL = "."


@dataclass(frozen=True, slots=True)
class RegistryEntry:
    """A ServiceEntry, or a Service as the analyzers convert it to one."""

    ports: tuple[int, ...]
    selector: tuple[tuple[str, str], ...] = ()


ScopedFqdn = tuple[str, str]  # (visible-in namespace or "*", FQDN); istioctl prints "ns/fqdn"


def scoped(scope: str, namespace: str, host: str, domain: str) -> ScopedFqdn:
    """`NewScopedFqdn`: the host made an FQDN relative to `namespace`, in `scope`."""
    return scope, resolve_host(host, namespace, domain)


def names_overlap(a: str, b: str) -> bool:
    """`host.Name.Matches`: equal, or one wildcard covers the other."""
    aw, bw = a.startswith("*"), b.startswith("*")
    if aw and bw:
        return b[1:].endswith(a[1:]) if len(a) < len(b) else a[1:].endswith(b[1:])
    if aw:
        return b.endswith(a[1:])
    if bw:
        return a.endswith(b[1:])
    return a == b


def full_name(namespace: str, host: str, domain: str) -> tuple[str, str]:
    """`GetResourceNameFromHost`: (namespace, name) of `name.ns.svc.<domain>`, else the host
    itself in `namespace` (short names and other names alike)."""
    m = re.fullmatch(rf"(.+)\.(.+)\.svc\.{re.escape(domain)}", host)
    if m:
        return m.group(2), m.group(1)
    return namespace, host


def build(ctx: Context) -> dict[ScopedFqdn, RegistryEntry]:
    """`InitServiceEntryHostMap`: ServiceEntries by exportTo, then Services (by the
    `networking.istio.io/exportTo` annotation), later entries replacing earlier ones."""
    out: dict[ScopedFqdn, RegistryEntry] = {}
    domain = ctx.domain
    for se in ctx.cs.service_entries:
        ns = se.meta.namespace
        entry = RegistryEntry(tuple(p.number for p in se.ports), se.workload_selector or ())
        for h in se.hosts:
            scopes = [ALL] if not se.export_to or ALL in se.export_to else []
            if not scopes:
                scopes = [ns if e == LOCAL else e for e in se.export_to]
            for scope in scopes:
                out[scoped(scope, ns, h, domain)] = entry
    for svc in ctx.cs.services:
        ns = svc.meta.namespace
        entry = RegistryEntry(tuple(p.port for p in svc.ports))
        anno = svc.meta.annotations.get(EXPORT_TO_ANNOTATION, "")
        scopes = (
            [ALL]
            if not anno
            else [ns if e.strip() == LOCAL else e.strip() for e in anno.split(",")]
        )
        for scope in scopes:
            out[scoped(scope, ns, svc.meta.name, domain)] = entry
    return out


def lookup(
    registry: dict[ScopedFqdn, RegistryEntry],
    source_namespace: str,
    export_to: tuple[str, ...],
    host: str,
    domain: str,
) -> RegistryEntry | None:
    """`GetDestinationHost`: exported to all, then to the resource's own export scopes, then
    the wildcard hosts visible to its namespace."""
    hit = registry.get(scoped(ALL, source_namespace, host, domain))
    if hit is not None:
        return hit
    scopes = (
        [source_namespace]
        if not export_to
        else [source_namespace if e == LOCAL else e for e in export_to]
    )
    for scope in scopes:
        hit = registry.get(scoped(scope, source_namespace, host, domain))
        if hit is not None:
            return hit
    bare = host.removeprefix("*")
    for (scope, se_host), entry in registry.items():
        visible = scope in (ALL, source_namespace)
        if visible and se_host.startswith("*") and bare.endswith(se_host[1:]):
            return entry
    return None
