"""The L4 authorization policy model, mirroring `istio.security.Authorization` (shared/WIRE.md).

The records are frozen and carry a plain, uncompiled `matches` that states the semantics in the
most direct way; the engine compiles the same records into faster matchers, and the explainer
uses the helpers here to say why something did or did not match.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ztunnel.identity import SpiffeId
from ztunnel.model import IPAddress, Workload

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Scope(enum.Enum):
    """Which workloads a policy applies to (`istio.security.Scope`)."""

    GLOBAL = "GLOBAL"
    NAMESPACE = "NAMESPACE"
    WORKLOAD_SELECTOR = "WORKLOAD_SELECTOR"


class Action(enum.Enum):
    """`istio.security.Action`."""

    ALLOW = "ALLOW"
    DENY = "DENY"


class StringMatchKind(enum.Enum):
    EXACT = "exact"
    PREFIX = "prefix"
    SUFFIX = "suffix"
    PRESENCE = "presence"


@dataclass(frozen=True, slots=True)
class StringMatch:
    """`istio.security.StringMatch`: exact, prefix, suffix, or presence (any non-empty value)."""

    kind: StringMatchKind
    value: str = ""

    @classmethod
    def exact(cls, value: str) -> StringMatch:
        return cls(StringMatchKind.EXACT, value)

    @classmethod
    def prefix(cls, value: str) -> StringMatch:
        return cls(StringMatchKind.PREFIX, value)

    @classmethod
    def suffix(cls, value: str) -> StringMatch:
        return cls(StringMatchKind.SUFFIX, value)

    @classmethod
    def presence(cls) -> StringMatch:
        return cls(StringMatchKind.PRESENCE)

    @classmethod
    def from_pattern(cls, pattern: str) -> StringMatch:
        """Istio's string form: `*` alone is presence, `*x` a suffix, `x*` a prefix, else exact.

        Follows `stringToMatch` in istio/istio
        pilot/pkg/serviceregistry/kube/controller/ambient/authorization.go.
        """
        if pattern == "*":
            return cls.presence()
        if pattern.startswith("*"):
            return cls.suffix(pattern[1:])
        if pattern.endswith("*"):
            return cls.prefix(pattern[:-1])
        return cls.exact(pattern)

    def matches(self, value: str) -> bool:
        if self.kind is StringMatchKind.EXACT:
            return value == self.value
        if self.kind is StringMatchKind.PREFIX:
            return value.startswith(self.value)
        if self.kind is StringMatchKind.SUFFIX:
            return value.endswith(self.value)
        return value != ""

    def __str__(self) -> str:
        if self.kind is StringMatchKind.PRESENCE:
            return "*"
        if self.kind is StringMatchKind.PREFIX:
            return f"{self.value}*"
        if self.kind is StringMatchKind.SUFFIX:
            return f"*{self.value}"
        return self.value


@dataclass(frozen=True, slots=True)
class ServiceAccountMatch:
    """`istio.security.ServiceAccountMatch`: (namespace, service account), any trust domain."""

    namespace: str
    service_account: str

    def matches(self, identity: SpiffeId) -> bool:
        return (
            identity.namespace == self.namespace
            and identity.service_account == self.service_account
        )

    def __str__(self) -> str:
        return f"{self.namespace}/{self.service_account}"


@dataclass(frozen=True, slots=True)
class ConnectionAttrs:
    """What L4 authorization sees of one inbound connection (destination side only).

    `source_identity` is the peer's SPIFFE identity from its client certificate, or None for
    plaintext (captured on 15006 without HBONE).
    """

    source_identity: SpiffeId | None
    source_ip: IPAddress
    destination_ip: IPAddress
    destination_port: int
    destination: Workload


def _in_networks(ip: IPAddress, networks: tuple[IPNetwork, ...]) -> bool:
    # `ip in net` is False across address families, which is what we want.
    return any(ip in net for net in networks)


# The field families of a Match, in the order the explainer reports them. Each is a
# (positive attribute, negative attribute) pair.
FIELD_FAMILIES: tuple[tuple[str, str], ...] = (
    ("namespaces", "not_namespaces"),
    ("principals", "not_principals"),
    ("service_accounts", "not_service_accounts"),
    ("source_ips", "not_source_ips"),
    ("destination_ips", "not_destination_ips"),
    ("destination_ports", "not_destination_ports"),
)


@dataclass(frozen=True, slots=True)
class Match:
    """`istio.security.Match`: every non-empty field family must pass.

    A positive list passes if any entry matches, a `not_` list passes if none does. Without a
    peer identity, positive principal/namespace/service-account lists fail and `not_` ones pass
    (shared/WIRE.md, "L4 authorization semantics"; istio/ztunnel src/rbac.rs).
    """

    namespaces: tuple[StringMatch, ...] = ()
    not_namespaces: tuple[StringMatch, ...] = ()
    principals: tuple[StringMatch, ...] = ()
    not_principals: tuple[StringMatch, ...] = ()
    source_ips: tuple[IPNetwork, ...] = ()
    not_source_ips: tuple[IPNetwork, ...] = ()
    destination_ips: tuple[IPNetwork, ...] = ()
    not_destination_ips: tuple[IPNetwork, ...] = ()
    destination_ports: tuple[int, ...] = ()
    not_destination_ports: tuple[int, ...] = ()
    service_accounts: tuple[ServiceAccountMatch, ...] = ()
    not_service_accounts: tuple[ServiceAccountMatch, ...] = ()

    def is_empty(self) -> bool:
        """A Match with every field empty is skipped: it never matches."""
        return not any(getattr(self, pos) or getattr(self, neg) for pos, neg in FIELD_FAMILIES)

    def entry_matches(self, attr: str, conn: ConnectionAttrs) -> tuple[bool, ...]:
        """For each entry of field `attr` (positive or `not_` name), whether the connection
        matches that entry. Entries about the identity never match without one."""
        entries = getattr(self, attr)
        family = attr.removeprefix("not_")
        ident = conn.source_identity
        if family == "namespaces":
            return tuple(ident is not None and m.matches(ident.namespace) for m in entries)
        if family == "principals":
            return tuple(ident is not None and m.matches(ident.principal) for m in entries)
        if family == "service_accounts":
            return tuple(ident is not None and m.matches(ident) for m in entries)
        if family == "source_ips":
            return tuple(conn.source_ip in net for net in entries)
        if family == "destination_ips":
            return tuple(conn.destination_ip in net for net in entries)
        return tuple(conn.destination_port == p for p in entries)

    def failing_fields(self, conn: ConnectionAttrs) -> tuple[str, ...]:
        """The names of the present fields that do not pass for this connection."""
        failed: list[str] = []
        for pos, neg in FIELD_FAMILIES:
            if getattr(self, pos) and not any(self.entry_matches(pos, conn)):
                failed.append(pos)
            if getattr(self, neg) and any(self.entry_matches(neg, conn)):
                failed.append(neg)
        return tuple(failed)

    def matches(self, conn: ConnectionAttrs) -> bool:
        return not self.is_empty() and not self.failing_fields(conn)


# A clause matches if it has no matches or any (non-empty) match matches; a rule matches if all
# of its clauses match (no clauses: everything). Named as in shared/WIRE.md.
Clause = tuple[Match, ...]
Rule = tuple[Clause, ...]


def clause_matches(clause: Clause, conn: ConnectionAttrs) -> bool:
    return not clause or any(m.matches(conn) for m in clause)


def rule_matches(rule: Rule, conn: ConnectionAttrs) -> bool:
    return all(clause_matches(c, conn) for c in rule)


@dataclass(frozen=True, slots=True)
class WorkloadSelector:
    """Which workloads a WORKLOAD_SELECTOR policy selects; not on the wire (istiod resolves it
    and lists the policy in `Workload.authorization_policies`), kept so that a local caller can
    do the same with `select_policies`.

    `namespace` None means any namespace (a policy in the root namespace). A workload matches
    if it carries every label of `match_labels` and no selector in `excluding` matches it.
    """

    namespace: str | None
    match_labels: tuple[tuple[str, str], ...] = ()
    excluding: tuple[WorkloadSelector, ...] = ()

    @classmethod
    def of(
        cls,
        namespace: str | None,
        labels: Mapping[str, str] | None = None,
        excluding: Iterable[WorkloadSelector] = (),
    ) -> WorkloadSelector:
        return cls(namespace, tuple(sorted((labels or {}).items())), tuple(excluding))

    def selects(self, namespace: str, labels: Mapping[str, str]) -> bool:
        if self.namespace is not None and self.namespace != namespace:
            return False
        if any(labels.get(k) != v for k, v in self.match_labels):
            return False
        return not any(ex.selects(namespace, labels) for ex in self.excluding)


@dataclass(frozen=True, slots=True)
class AuthorizationPolicy:
    """One `istio.security.Authorization`. Its key is `<namespace>/<name>`."""

    name: str
    namespace: str
    scope: Scope
    action: Action
    rules: tuple[Rule, ...] = ()
    dry_run: bool = False
    # Only for WORKLOAD_SELECTOR policies converted locally: any selector selects.
    selectors: tuple[WorkloadSelector, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def matches(self, conn: ConnectionAttrs) -> bool:
        """A policy matches if any rule matches; with no rules it never matches."""
        return any(rule_matches(r, conn) for r in self.rules)

    def selects(self, namespace: str, labels: Mapping[str, str]) -> bool:
        return self.scope is Scope.WORKLOAD_SELECTOR and any(
            s.selects(namespace, labels) for s in self.selectors
        )


def select_policies(
    policies: Iterable[AuthorizationPolicy], namespace: str, labels: Mapping[str, str]
) -> tuple[str, ...]:
    """The keys of the WORKLOAD_SELECTOR policies that select a workload, sorted.

    What istiod computes into `Workload.authorization_policies`; a caller building workloads
    from local configuration uses this to fill that field. One pass over the policies: it runs
    when configuration changes, never per connection.
    """
    return tuple(sorted({p.key for p in policies if p.selects(namespace, labels)}))
