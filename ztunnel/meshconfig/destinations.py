"""DestinationRule selection and merging with Istio's semantics
(istio/istio pilot/pkg/model/push_context.go `destinationRule`, destination_rule.go
`mergeDestinationRule`, networking/util `MergeSubsetTrafficPolicy`):

- rules for the same host in one namespace are merged: the oldest keeps its traffic policy,
  subsets of later ones are appended (a duplicate subset name is dropped and reported);
- lookup for a proxy (for a waypoint: its own namespace) and a service: the proxy's
  namespace, then the service's namespace (rules exported to the proxy's), then the root
  namespace; within a namespace an exact host beats the longest covering wildcard;
- a subset's policy overrides the host's field by field (load balancer, connection pool,
  outlier detection, TLS); port-level settings replace the whole policy for their port;
- with inheritance on (as `PILOT_ENABLE_DESTINATION_RULE_INHERITANCE`), a host-less rule in
  the root namespace and one in the proxy's namespace are inherited by the chosen rule
  (child fields override, lists are appended, as proto.Merge); without it a namespace rule
  simply replaces the root one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ztunnel.meshconfig.hosts import most_specific, resolve_host
from ztunnel.meshconfig.load import ConfigOptions, by_order
from ztunnel.meshconfig.networking import (
    ConnectionPool,
    DestinationRule,
    LoadBalancer,
    OutlierDetection,
    Subset,
    TrafficPolicy,
    read_traffic_policy,
)
from ztunnel.meshconfig.resource import Decision, Fields
from ztunnel.meshconfig.source import SourceDocument


@dataclass(frozen=True, slots=True)
class MergedRule:
    """The DestinationRule(s) that apply to one host, merged."""

    host: str
    namespace: str
    rules: tuple[DestinationRule, ...]  # oldest first; rules[0] gives the traffic policy
    traffic_policy: TrafficPolicy | None
    subsets: tuple[Subset, ...]
    export_to: tuple[str, ...]

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(r.meta.label for r in self.rules)

    def subset(self, name: str) -> Subset | None:
        return next((s for s in self.subsets if s.name == name), None)


@dataclass(frozen=True, slots=True)
class EffectivePolicy:
    """What applies to traffic for (host, subset, port): defaults filled in."""

    load_balancer: LoadBalancer = LoadBalancer()
    connection_pool: ConnectionPool = ConnectionPool()
    outlier_detection: OutlierDetection | None = None
    subset_labels: tuple[tuple[str, str], ...] | None = None  # None: no subset
    sources: tuple[str, ...] = ()


def _visible(export_to: tuple[str, ...], owner: str, client: str) -> bool:
    if not export_to or "*" in export_to:
        return True
    if client == owner and ("." in export_to or owner in export_to):
        return True
    return client in export_to


def _deep_merge(parent: Mapping[str, Any], child: Mapping[str, Any]) -> dict[str, Any]:
    """proto.Merge on JSON-shaped data: child scalars win, mappings merge, lists append."""
    out = dict(parent)
    for k, v in child.items():
        pv = out.get(k)
        if isinstance(pv, Mapping) and isinstance(v, Mapping):
            out[k] = _deep_merge(pv, v)
        elif isinstance(pv, list) and isinstance(v, list):
            out[k] = [*pv, *v]
        else:
            out[k] = v
    return out


def merge_traffic_policy(
    host_policy: TrafficPolicy | None, subset_policy: TrafficPolicy | None, port: int | None
) -> TrafficPolicy | None:
    """`MergeSubsetTrafficPolicy`: port-level first, then subset fields over host fields."""
    original = host_policy.for_port(port)[0] if host_policy is not None and port else host_policy
    if subset_policy is None:
        return original
    sub, port_level = subset_policy.for_port(port) if port else (subset_policy, False)
    if original is None:
        return sub
    return TrafficPolicy(
        load_balancer=sub.load_balancer
        if sub.load_balancer is not None or port_level
        else original.load_balancer,
        connection_pool=sub.connection_pool
        if sub.connection_pool is not None or port_level
        else original.connection_pool,
        outlier_detection=sub.outlier_detection
        if sub.outlier_detection is not None or port_level
        else original.outlier_detection,
        tls_mode=sub.tls_mode if sub.tls_mode or port_level else original.tls_mode,
    )


@dataclass
class DestinationRules:
    """The DestinationRule index of one configuration, for lookups by a given proxy."""

    options: ConfigOptions
    # namespace -> resolved host -> merged rule (all rules of the namespace)
    by_namespace: dict[str, dict[str, MergedRule]] = field(default_factory=dict)
    # namespace -> host-less (inheritable) rule
    inheritable: dict[str, DestinationRule] = field(default_factory=dict)
    decisions: list[Decision] = field(default_factory=list)

    @classmethod
    def build(cls, rules: Iterable[DestinationRule], options: ConfigOptions) -> DestinationRules:
        index = cls(options)
        grouped: dict[tuple[str, str], list[DestinationRule]] = {}
        for dr in by_order(rules, lambda r: r.meta):
            if dr.workload_selector:
                continue  # sidecar-only rules
            if not dr.host:
                if dr.meta.namespace in index.inheritable:
                    index._decide(
                        "dr-shadowed",
                        dr,
                        "spec",
                        f"a host-less rule already exists in {dr.meta.namespace} "
                        f"({index.inheritable[dr.meta.namespace].meta.label}); ignored",
                    )
                    continue
                index.inheritable[dr.meta.namespace] = dr
                continue
            host = resolve_host(dr.host, dr.meta.namespace, options.domain)
            grouped.setdefault((dr.meta.namespace, host), []).append(dr)
        for (ns, host), group in grouped.items():
            subsets: list[Subset] = []
            names: set[str] = set()
            export_to: tuple[str, ...] = ()
            policy = None
            for dr in group:
                for s in dr.subsets:
                    if s.name in names:
                        index._decide(
                            "dr-duplicate-subset",
                            dr,
                            s.path,
                            f"subset {s.name!r} of {host} is already defined by an older rule; "
                            "this one is ignored",
                        )
                        continue
                    names.add(s.name)
                    subsets.append(s)
                if policy is None:
                    policy = dr.traffic_policy
                export_to = export_to or dr.export_to
            if len(group) > 1:
                index._decide(
                    "dr-merged",
                    group[-1],
                    "spec.host",
                    f"{len(group)} DestinationRules for {host} in {ns} are merged "
                    f"(traffic policy from the oldest, {group[0].meta.label})",
                    tuple(d.meta.label for d in group),
                )
            index.by_namespace.setdefault(ns, {})[host] = MergedRule(
                host, ns, tuple(group), policy, tuple(subsets), export_to
            )
        return index

    def _decide(
        self, code: str, dr: DestinationRule, path: str, message: str, related: tuple[str, ...] = ()
    ) -> None:
        self.decisions.append(
            Decision(
                code,
                dr.meta.label,
                path,
                message,
                dr.meta.origin.file,
                dr.meta.origin.line,
                related,
            )
        )

    def _find(
        self, namespace: str, hostname: str, client: str, exported_only: bool
    ) -> MergedRule | None:
        rules = self.by_namespace.get(namespace)
        if not rules:
            return None
        host = most_specific(hostname, rules)
        if host is None:
            return None
        rule = rules[host]
        if exported_only and not _visible(rule.export_to, namespace, client):
            return None
        return rule

    def lookup(
        self, hostname: str, service_namespace: str, proxy_namespace: str
    ) -> MergedRule | None:
        """The rule for `hostname` seen from `proxy_namespace` (Istio's lookup order)."""
        root = self.options.root_namespace
        found = None
        if proxy_namespace != root:
            rule = self._find(proxy_namespace, hostname, proxy_namespace, False)
            if rule is not None and _visible(rule.export_to, proxy_namespace, proxy_namespace):
                found = rule
        else:
            rule = self._find(root, hostname, root, False)
            if rule is not None and rule.export_to and set(rule.export_to) <= {".", root}:
                found = rule
        if found is None and service_namespace:
            found = self._find(service_namespace, hostname, proxy_namespace, True)
        if found is None:
            found = self._find(root, hostname, proxy_namespace, True)
        if self.options.destination_rule_inheritance:
            return self._inherit(found, hostname, proxy_namespace)
        return found

    def _inherit(
        self, found: MergedRule | None, hostname: str, proxy_namespace: str
    ) -> MergedRule | None:
        root = self.options.root_namespace
        parents = [
            p for p in (self.inheritable.get(root), self.inheritable.get(proxy_namespace)) if p
        ]
        if not parents:
            return found
        raw: dict[str, Any] = {}
        for p in parents:
            raw = _deep_merge(raw, p.raw or {})
        if found is not None:
            raw = _deep_merge(raw, (found.rules[0].raw or {}))
        policy_raw = raw.get("trafficPolicy")
        policy = found.traffic_policy if found is not None else None
        if policy_raw is not None:
            origin = found.rules[0] if found is not None else parents[-1]
            doc = SourceDocument({"spec": raw}, origin.meta.origin.file, 0, origin.meta.origin.line)
            policy = read_traffic_policy(
                Fields(doc, [], origin.meta), policy_raw, "spec.trafficPolicy"
            )
        rules = tuple(parents) + (found.rules if found is not None else ())
        return MergedRule(
            found.host if found is not None else hostname,
            found.namespace if found is not None else parents[-1].meta.namespace,
            rules,
            policy,
            found.subsets if found is not None else (),
            found.export_to if found is not None else (),
        )

    def effective(
        self,
        hostname: str,
        service_namespace: str,
        proxy_namespace: str,
        subset: str = "",
        port: int | None = None,
    ) -> EffectivePolicy:
        rule = self.lookup(hostname, service_namespace, proxy_namespace)
        if rule is None:
            return EffectivePolicy()
        sub = rule.subset(subset) if subset else None
        policy = merge_traffic_policy(
            rule.traffic_policy, sub.traffic_policy if sub else None, port
        )
        labels = sub.labels if sub is not None else None
        if subset and sub is None:
            labels = (("\x00missing-subset", subset),)  # selects nothing
        return EffectivePolicy(
            policy.load_balancer or LoadBalancer() if policy else LoadBalancer(),
            policy.connection_pool or ConnectionPool() if policy else ConnectionPool(),
            policy.outlier_detection if policy else None,
            labels,
            rule.sources,
        )
