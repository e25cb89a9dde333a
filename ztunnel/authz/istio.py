"""Istio `AuthorizationPolicy` and `PeerAuthentication` resources converted to L4 policies.

Follows what istiod does for ztunnel (istio/istio
pilot/pkg/serviceregistry/kube/controller/ambient/authorization.go: `convertAuthorizationPolicy`,
`handleRule`, `convertedSelectorPeerAuthentications`, `convertPeerAuthentication`; and
policies.go for the static STRICT policy), with validation from
pkg/config/validation (`ValidateAuthorizationPolicy`, `ValidatePeerAuthentication`).

Where istiod's result would not fail closed we deliberately differ, and say so:
- A DENY rule entry (a `from`/`to` item or a `when` condition) that only has HTTP attributes
  becomes "matches everything" for its clause, so the DENY still fires with its L4 part.
  istiod emits an empty Match there, which ztunnel skips, so such a DENY never fires
  (istio/istio#61126).
- A `*` inside a principal/namespace value (not at an end) is refused: Istio compares it
  literally and it would never match.
As in istiod, `remoteIpBlocks`/`notRemoteIpBlocks` (the client address from proxy headers) are
HTTP attributes at L4, and the AUDIT and CUSTOM actions and `targetRef(s)` policies are ignored.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ztunnel.authz import _fields as f
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
    WorkloadSelector,
)

ROOT_NAMESPACE = "istio-system"
API_VERSIONS = ("security.istio.io/v1", "security.istio.io/v1beta1")
DRY_RUN_ANNOTATION = "istio.io/dry-run"
# Names istiod gives the policies it derives; '_' is illegal in Kubernetes names, so they
# cannot collide with a user's policy.
STATIC_STRICT_NAME = "istio_converted_static_strict"
PEER_AUTHN_PREFIX = "converted_peer_authentication_"

_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

# `when` keys ztunnel can evaluate are those of authorization.go `l4WhenAttributes`:
# source.ip, source.namespace, source.principal, destination.ip, destination.port.
# Other keys Istio accepts (security.ValidateAttribute); all need HTTP or proxy metadata.
_L7_WHEN_KEYS = (
    "remote.ip",
    "remote.port",
    "source.serviceAccount",
    "request.auth.principal",
    "request.auth.audiences",
    "request.auth.presenter",
    "connection.sni",
)
_L7_WHEN_PREFIXES = ("request.headers[", "request.auth.claims[", "experimental.envoy.filters.")

_SOURCE_L4 = (
    "principals",
    "notPrincipals",
    "namespaces",
    "notNamespaces",
    "ipBlocks",
    "notIpBlocks",
    "serviceAccounts",
    "notServiceAccounts",
)
_SOURCE_L7 = ("requestPrincipals", "notRequestPrincipals", "remoteIpBlocks", "notRemoteIpBlocks")
_OPERATION_L4 = ("ports", "notPorts")
_OPERATION_L7 = ("hosts", "notHosts", "methods", "notMethods", "paths", "notPaths")

_PRESENCE = (StringMatch.presence(),)


@dataclass(frozen=True, slots=True)
class _Doc:
    """One resource, with where it is for messages."""

    kind: str
    name: str
    namespace: str
    spec: Mapping[str, Any]
    annotations: Mapping[str, Any]
    order: tuple[int, float, int]  # (no timestamp?, creation time, document index): oldest first
    base: str  # path prefix of the document ("" or "document[3].")
    where: str  # path of the document itself

    @property
    def label(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"

    def path(self, rest: str) -> str:
        return f"{self.base}{rest}"


def _created(ctx: f.Ctx, value: Any, path: str) -> float | None:
    """metadata.creationTimestamp as seconds."""
    if value is None:
        return None
    # Imported here: `ztunnel.meshconfig` (the waypoint's route compiler, 4 MB) is not
    # otherwise needed by the node agent.
    from ztunnel.meshconfig.resource import parse_timestamp

    try:
        return parse_timestamp(value)
    except ValueError:
        raise ctx.fail(path, f"not an RFC 3339 timestamp: {value!r}") from None


def _read_doc(ctx: f.Ctx, index: int, where: str, obj: Mapping[str, Any]) -> _Doc:
    base = "" if where == "<top>" else f"{where}."
    f.check_keys(ctx, obj, ("apiVersion", "kind", "metadata", "spec", "status"), where)
    api = obj.get("apiVersion")
    if api not in API_VERSIONS:
        raise ctx.fail(
            f"{base}apiVersion", f"expected one of {', '.join(API_VERSIONS)}, got {api!r}"
        )
    kind = f.string(ctx, obj.get("kind"), f"{base}kind")
    meta = f.mapping(ctx, obj.get("metadata"), f"{base}metadata", required=True)
    name = f.string(ctx, meta.get("name"), f"{base}metadata.name")
    if len(name) > 253 or not _NAME.match(name):
        raise ctx.fail(f"{base}metadata.name", f"not a valid Kubernetes name: {name!r}")
    namespace = f.string(ctx, meta.get("namespace", "default"), f"{base}metadata.namespace")
    if len(namespace) > 63 or not _NAMESPACE.match(namespace):
        raise ctx.fail(f"{base}metadata.namespace", f"not a valid namespace: {namespace!r}")
    annotations = f.mapping(ctx, meta.get("annotations"), f"{base}metadata.annotations")
    created = _created(ctx, meta.get("creationTimestamp"), f"{base}metadata.creationTimestamp")
    order = (0, created, index) if created is not None else (1, 0.0, index)
    spec = f.mapping(ctx, obj.get("spec"), f"{base}spec")
    return _Doc(kind, name, namespace, spec, annotations, order, base, where)


def _labels(ctx: f.Ctx, raw: Any, path: str) -> dict[str, str] | None:
    """`selector: {matchLabels: {...}}`; None when absent or empty (which selects the whole
    namespace, as istiod treats it for PeerAuthentication and as it is for authorization)."""
    if raw is None:
        return None
    sel = f.mapping(ctx, raw, path)
    f.check_keys(ctx, sel, ("matchLabels",), path)
    labels: dict[str, str] = {}
    for k, v in f.mapping(ctx, sel.get("matchLabels"), f"{path}.matchLabels").items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ctx.fail(
                f"{path}.matchLabels.{k}",
                "label keys and values must be strings (quote numbers and booleans)",
            )
        labels[k] = v
    return labels or None


# --- AuthorizationPolicy ---------------------------------------------------------------------


class _RuleReader:
    """Converts one `rules[j]` entry, remembering the HTTP attributes it met."""

    def __init__(self, ctx: f.Ctx, doc: _Doc, action: Action, path: str) -> None:
        self.ctx = ctx
        self.doc = doc
        self.action = action
        self.path = path
        self.http: list[str] = []

    def _list(self, obj: Mapping[str, Any], key: str, path: str) -> list[Any]:
        items = f.seq(self.ctx, obj.get(key), f"{path}.{key}")
        if obj.get(key) is not None and not items:
            # An explicitly empty list is a mistake (null is taken as absent).
            raise self.ctx.fail(f"{path}.{key}", "must not be empty when present")
        return items

    def _patterns(self, obj: Mapping[str, Any], key: str, path: str) -> tuple[StringMatch, ...]:
        return tuple(
            f.pattern(self.ctx, v, f"{path}.{key}[{i}]")
            for i, v in enumerate(self._list(obj, key, path))
        )

    def _networks(self, obj: Mapping[str, Any], key: str, path: str) -> tuple[IPNetwork, ...]:
        return tuple(
            f.network(self.ctx, v, f"{path}.{key}[{i}]")
            for i, v in enumerate(self._list(obj, key, path))
        )

    def _ports(self, obj: Mapping[str, Any], key: str, path: str) -> tuple[int, ...]:
        return tuple(
            f.port(self.ctx, v, f"{path}.{key}[{i}]")
            for i, v in enumerate(self._list(obj, key, path))
        )

    def _accounts(
        self, obj: Mapping[str, Any], key: str, path: str
    ) -> tuple[ServiceAccountMatch, ...]:
        return tuple(
            f.service_account(self.ctx, v, f"{path}.{key}[{i}]", self.doc.namespace)
            for i, v in enumerate(self._list(obj, key, path))
        )

    def _strings(self, obj: Mapping[str, Any], key: str, path: str) -> list[str]:
        return [
            f.string(self.ctx, v, f"{path}.{key}[{i}]")
            for i, v in enumerate(self._list(obj, key, path))
        ]

    def _http(self, obj: Mapping[str, Any], keys: Sequence[str], path: str) -> None:
        """Validate and remember the HTTP-only fields present."""
        for k in keys:
            if k in obj:
                self._strings(obj, k, path)
                self.http.append(f"{path}.{k}")

    def source(self, raw: Any, path: str) -> Match:
        src = f.mapping(self.ctx, raw, path, required=True)
        f.check_keys(self.ctx, src, (*_SOURCE_L4, *_SOURCE_L7), path)
        if not any(src.get(k) is not None for k in (*_SOURCE_L4, *_SOURCE_L7)):
            raise self.ctx.fail(path, "`from.source` must not be empty")
        if any(k in src for k in ("serviceAccounts", "notServiceAccounts")) and any(
            k in src for k in ("principals", "notPrincipals", "namespaces", "notNamespaces")
        ):
            raise self.ctx.fail(path, "cannot set serviceAccounts with namespaces or principals")
        for k in ("remoteIpBlocks", "notRemoteIpBlocks"):
            self._networks(src, k, path)
        self._http(src, _SOURCE_L7, path)
        return Match(
            principals=self._patterns(src, "principals", path),
            not_principals=self._patterns(src, "notPrincipals", path),
            namespaces=self._patterns(src, "namespaces", path),
            not_namespaces=self._patterns(src, "notNamespaces", path),
            source_ips=self._networks(src, "ipBlocks", path),
            not_source_ips=self._networks(src, "notIpBlocks", path),
            service_accounts=self._accounts(src, "serviceAccounts", path),
            not_service_accounts=self._accounts(src, "notServiceAccounts", path),
        )

    def operation(self, raw: Any, path: str) -> Match:
        op = f.mapping(self.ctx, raw, path, required=True)
        f.check_keys(self.ctx, op, (*_OPERATION_L4, *_OPERATION_L7), path)
        if not any(op.get(k) is not None for k in (*_OPERATION_L4, *_OPERATION_L7)):
            raise self.ctx.fail(path, "`to.operation` must not be empty")
        self._http(op, _OPERATION_L7, path)
        return Match(
            destination_ports=self._ports(op, "ports", path),
            not_destination_ports=self._ports(op, "notPorts", path),
        )

    def condition(self, raw: Any, path: str) -> Match | None:
        """One `when` entry as a Match; None when it needs HTTP (the caller decides)."""
        cond = f.mapping(self.ctx, raw, path, required=True)
        f.check_keys(self.ctx, cond, ("key", "values", "notValues"), path)
        key = f.string(self.ctx, cond.get("key"), f"{path}.key")
        if not cond.get("values") and not cond.get("notValues"):
            raise self.ctx.fail(
                path, f"at least one of `values` or `notValues` must be set for key {key}"
            )
        if key == "source.ip":
            return Match(
                source_ips=self._networks(cond, "values", path),
                not_source_ips=self._networks(cond, "notValues", path),
            )
        if key == "destination.ip":
            return Match(
                destination_ips=self._networks(cond, "values", path),
                not_destination_ips=self._networks(cond, "notValues", path),
            )
        if key == "destination.port":
            return Match(
                destination_ports=self._ports(cond, "values", path),
                not_destination_ports=self._ports(cond, "notValues", path),
            )
        if key == "source.namespace":
            return Match(
                namespaces=self._patterns(cond, "values", path),
                not_namespaces=self._patterns(cond, "notValues", path),
            )
        if key == "source.principal":
            return Match(
                principals=self._patterns(cond, "values", path),
                not_principals=self._patterns(cond, "notValues", path),
            )
        if key == "remote.ip":
            self._networks(cond, "values", path)
            self._networks(cond, "notValues", path)
        elif key in _L7_WHEN_KEYS or key.startswith(_L7_WHEN_PREFIXES):
            self._strings(cond, "values", path)
            self._strings(cond, "notValues", path)
        else:
            raise self.ctx.fail(f"{path}.key", f"unknown attribute {key!r}")
        self.http.append(f"{path}.key={key}")
        return None

    def _entries(self, rule: Mapping[str, Any], key: str, inner: str, path: str) -> Clause | None:
        """`from` or `to` as one clause (any entry may match). None: the clause matches
        everything, because an entry only had HTTP attributes (only meaningful for DENY)."""
        entries = self._list(rule, key, path)
        matches: list[Match] = []
        wildcard = False
        for i, raw in enumerate(entries):
            ep = f"{path}.{key}[{i}]"
            entry = f.mapping(self.ctx, raw, ep, required=True)
            f.check_keys(self.ctx, entry, (inner,), ep)
            m = (self.source if inner == "source" else self.operation)(
                entry.get(inner), f"{ep}.{inner}"
            )
            if m.is_empty():
                wildcard = True
            else:
                matches.append(m)
        return None if wildcard else tuple(matches)

    def read(self, raw: Any) -> Rule | None:
        """The rule, or None when it must be dropped (an ALLOW rule needing HTTP)."""
        rule = f.mapping(self.ctx, raw, self.path, required=True)
        f.check_keys(self.ctx, rule, ("from", "to", "when"), self.path)
        clauses: list[Clause] = []
        # istiod's order: the `to` clause, the `from` clause, then one clause per condition.
        for key, inner in (("to", "operation"), ("from", "source")):
            if rule.get(key) is not None:
                clause = self._entries(rule, key, inner, self.path)
                if clause is not None:
                    clauses.append(clause)
        for i, raw_cond in enumerate(self._list(rule, "when", self.path)):
            m = self.condition(raw_cond, f"{self.path}.when[{i}]")
            if m is not None:
                clauses.append((m,))
        if not self.http:
            return tuple(clauses)
        where = ", ".join(self.http)
        if self.action is Action.ALLOW:
            self.ctx.warn(
                self.path,
                f"{self.doc.label}: ztunnel cannot enforce HTTP attributes ({where}); this "
                f"ALLOW rule is dropped and matches nothing (more restrictive than requested; "
                f"use a waypoint for HTTP rules)",
            )
            return None
        l4 = "only its L4 conditions" if clauses else "no conditions, denying every connection"
        self.ctx.warn(
            self.path,
            f"{self.doc.label}: ztunnel cannot enforce HTTP attributes ({where}); this DENY "
            f"rule is enforced with {l4} (more restrictive than requested; use a waypoint for "
            f"HTTP rules)",
        )
        return tuple(clauses)


def _authorization_policy(ctx: f.Ctx, doc: _Doc, root: str) -> AuthorizationPolicy | None:
    spec = doc.spec
    f.check_keys(
        ctx,
        spec,
        ("selector", "targetRef", "targetRefs", "rules", "action", "provider"),
        doc.path("spec"),
    )
    action_raw = f.string(ctx, spec.get("action", "ALLOW"), doc.path("spec.action")).upper()
    if action_raw in ("AUDIT", "CUSTOM"):
        ctx.warn(
            doc.path("spec.action"),
            f"{doc.label}: ztunnel does not support the {action_raw} action; policy ignored",
        )
        return None
    if action_raw not in ("ALLOW", "DENY"):
        raise ctx.fail(
            doc.path("spec.action"), f"must be ALLOW, DENY, AUDIT or CUSTOM, got {action_raw!r}"
        )
    action = Action(action_raw)
    if spec.get("provider") is not None:
        raise ctx.fail(doc.path("spec.provider"), "only allowed with the CUSTOM action")
    if spec.get("targetRef") is not None or spec.get("targetRefs"):
        if spec.get("selector") is not None:
            raise ctx.fail(doc.path("spec.selector"), "cannot be set together with targetRef(s)")
        ctx.warn(
            doc.path("spec.targetRefs"),
            f"{doc.label}: binds to a waypoint or gateway (targetRef), not enforced by "
            f"ztunnel; ignored",
        )
        return None
    labels = _labels(ctx, spec.get("selector"), doc.path("spec.selector"))
    selectors: tuple[WorkloadSelector, ...] = ()
    if labels is None:
        scope = Scope.GLOBAL if doc.namespace == root else Scope.NAMESPACE
    else:
        # A selector in the root namespace selects workloads in every namespace.
        scope = Scope.WORKLOAD_SELECTOR
        selectors = (WorkloadSelector.of(None if doc.namespace == root else doc.namespace, labels),)
    rules_raw = spec.get("rules")
    if action is Action.DENY and not rules_raw:
        raise ctx.fail(
            doc.path("spec.rules"),
            "a DENY policy without rules never matches; add an empty rule `{}` to deny everything",
        )
    rules: list[Rule] = []
    for j, raw in enumerate(f.seq(ctx, rules_raw, doc.path("spec.rules"))):
        rule = _RuleReader(ctx, doc, action, doc.path(f"spec.rules[{j}]")).read(raw)
        if rule is not None:
            rules.append(rule)
    dry = doc.annotations.get(DRY_RUN_ANNOTATION, "false")
    if not isinstance(dry, str | bool) or str(dry).lower() not in ("true", "false"):
        raise ctx.fail(
            doc.path(f"metadata.annotations.{DRY_RUN_ANNOTATION}"), 'must be "true" or "false"'
        )
    # An ALLOW policy without rules (e.g. `spec: {}`) stays: it applies and matches nothing,
    # which denies everything it covers (Istio's allow-nothing policy).
    return AuthorizationPolicy(
        doc.name,
        doc.namespace,
        scope,
        action,
        tuple(rules),
        dry_run=str(dry).lower() == "true",
        selectors=selectors,
    )


# --- PeerAuthentication ----------------------------------------------------------------------


_MODES = ("UNSET", "DISABLE", "PERMISSIVE", "STRICT")


@dataclass(frozen=True, slots=True)
class _PeerAuthn:
    doc: _Doc
    mode: str
    labels: dict[str, str] | None
    ports: tuple[tuple[int, str], ...]


def _mode(ctx: f.Ctx, raw: Any, path: str) -> str:
    obj = f.mapping(ctx, raw, path)
    f.check_keys(ctx, obj, ("mode",), path)
    mode = f.string(ctx, obj.get("mode", "UNSET"), f"{path}.mode").upper()
    if mode not in _MODES:
        raise ctx.fail(f"{path}.mode", f"must be one of {', '.join(_MODES)}, got {mode!r}")
    return mode


def _peer_authentication(ctx: f.Ctx, doc: _Doc) -> _PeerAuthn:
    spec = doc.spec
    f.check_keys(ctx, spec, ("selector", "mtls", "portLevelMtls"), doc.path("spec"))
    labels = _labels(ctx, spec.get("selector"), doc.path("spec.selector"))
    mode = _mode(ctx, spec.get("mtls"), doc.path("spec.mtls"))
    ports: list[tuple[int, str]] = []
    if "portLevelMtls" in spec:
        pp = doc.path("spec.portLevelMtls")
        raw_ports = f.mapping(ctx, spec.get("portLevelMtls"), pp)
        if not raw_ports:
            raise ctx.fail(pp, "port level mTLS, if defined, must have at least one element")
        if labels is None:
            raise ctx.fail(pp, "mesh/namespace peer authentication cannot have port level mTLS")
        for key, value in raw_ports.items():
            ports.append((f.port(ctx, key, f"{pp}.{key}"), _mode(ctx, value, f"{pp}.{key}")))
    return _PeerAuthn(doc, mode, labels, tuple(sorted(ports)))


def _oldest(ctx: f.Ctx, candidates: list[_PeerAuthn], what: str) -> _PeerAuthn | None:
    """istiod uses the oldest (creationTimestamp) of several competing policies."""
    if not candidates:
        return None
    ordered = sorted(candidates, key=lambda p: p.doc.order)
    for extra in ordered[1:]:
        ctx.warn(
            extra.doc.where,
            f"{extra.doc.label}: ignored, the older {what} {ordered[0].doc.label} takes precedence",
        )
    return ordered[0]


def _workload_outcome(parent_strict: bool, pa: _PeerAuthn) -> tuple[bool, bool, bool]:
    """(static STRICT applies, a port-level policy applies, the workload-wide mode is strict)
    for workloads a workload-level PeerAuthentication selects, as
    `convertedSelectorPeerAuthentications` decides. We treat DISABLE ports like PERMISSIVE
    ones under an inherited STRICT (istiod only looks for PERMISSIVE there)."""
    strict = parent_strict
    if pa.mode == "STRICT":
        strict = True
    elif pa.mode in ("PERMISSIVE", "DISABLE"):
        strict = False
    default_strict = strict
    port_policy = False
    if default_strict and any(m in ("PERMISSIVE", "DISABLE") for _, m in pa.ports):
        port_policy, strict = True, False
    elif not default_strict and any(m == "STRICT" for _, m in pa.ports):
        port_policy = True
    return strict, port_policy, default_strict


def _port_level_rules(pa: _PeerAuthn, default_strict: bool) -> tuple[Rule, ...]:
    """Deny plaintext on the ports whose effective mode is STRICT; equivalent to istiod's
    `convertPeerAuthentication` output (its per-port clauses folded into one Match)."""
    if default_strict:
        exempt = tuple(p for p, m in pa.ports if m in ("PERMISSIVE", "DISABLE"))
        return (((Match(not_principals=_PRESENCE),), (Match(not_destination_ports=exempt),)),)
    strict_ports = tuple(p for p, m in pa.ports if m == "STRICT")
    return (((Match(not_principals=_PRESENCE, destination_ports=strict_ports),),),)


def _strict_policy(
    namespace: str,
    scope: Scope,
    name: str = STATIC_STRICT_NAME,
    selectors: tuple[WorkloadSelector, ...] = (),
) -> AuthorizationPolicy:
    """istiod's static STRICT policy: deny any connection without a peer identity."""
    return AuthorizationPolicy(
        name,
        namespace,
        scope,
        Action.DENY,
        (((Match(not_principals=_PRESENCE),),),),
        selectors=selectors,
    )


def _convert_peer_authentications(
    ctx: f.Ctx, pas: list[_PeerAuthn], root: str
) -> list[AuthorizationPolicy]:
    """Resolve PeerAuthentication precedence the way istiod does per workload (mesh, then
    namespace, then the oldest selecting workload policy; UNSET inherits), and express the
    result with the broadest scope that is exact:

    - every workload effectively STRICT: one GLOBAL `<root>/istio_converted_static_strict`;
    - a namespace whose workloads are all STRICT: a NAMESPACE policy of that name in it;
    - anything finer (a mesh STRICT overridden somewhere, workload-level modes): the
      WORKLOAD_SELECTOR policy `<root>/istio_converted_static_strict` with selectors, and
      `<ns>/converted_peer_authentication_<name>` for port-level mTLS. Those apply to the
      workloads that name them: fill `Workload.authorization_policies` with
      `select_policies`, as istiod fills it.
    """
    if not pas:
        return []
    mesh_candidates: list[_PeerAuthn] = []
    ns_candidates: dict[str, list[_PeerAuthn]] = {}
    workload_pas: dict[str, list[_PeerAuthn]] = {}
    for pa in pas:
        if pa.labels is None:
            if pa.doc.namespace == root:
                mesh_candidates.append(pa)
            else:
                ns_candidates.setdefault(pa.doc.namespace, []).append(pa)
        elif pa.doc.namespace == root:
            ctx.warn(
                pa.doc.where,
                f"{pa.doc.label}: a workload selector in the root namespace "
                f"is ignored for ambient workloads, as istiod does",
            )
        else:
            workload_pas.setdefault(pa.doc.namespace, []).append(pa)
    mesh = _oldest(ctx, mesh_candidates, "mesh-wide PeerAuthentication")
    mesh_strict = mesh is not None and mesh.mode == "STRICT"

    out: list[AuthorizationPolicy] = []
    full: list[str] = []
    pieces: list[WorkloadSelector] = []
    known = sorted({*ns_candidates, *workload_pas})
    for ns in known:
        ns_pa = _oldest(ctx, ns_candidates.get(ns, []), "namespace-wide PeerAuthentication")
        ns_strict = (
            mesh_strict if ns_pa is None or ns_pa.mode == "UNSET" else (ns_pa.mode == "STRICT")
        )
        earlier: list[WorkloadSelector] = []
        strict_pieces: list[WorkloadSelector] = []
        all_strict = ns_strict
        for pa in sorted(workload_pas.get(ns, []), key=lambda p: p.doc.order):
            # The oldest selecting policy wins: exclude what older ones already select.
            sel = WorkloadSelector.of(ns, pa.labels, excluding=earlier)
            strict, port_policy, default_strict = _workload_outcome(ns_strict, pa)
            if strict:
                strict_pieces.append(sel)
            else:
                all_strict = False
            if port_policy:
                out.append(
                    AuthorizationPolicy(
                        PEER_AUTHN_PREFIX + pa.doc.name,
                        ns,
                        Scope.WORKLOAD_SELECTOR,
                        Action.DENY,
                        _port_level_rules(pa, default_strict),
                        selectors=(sel,),
                    )
                )
            earlier.append(WorkloadSelector.of(ns, pa.labels))
        if all_strict:
            full.append(ns)
        else:
            if ns_strict:
                pieces.append(WorkloadSelector.of(ns, None, excluding=earlier))
            pieces.extend(strict_pieces)
    if mesh_strict and len(full) == len(known):
        return [_strict_policy(root, Scope.GLOBAL), *out]
    if mesh_strict:
        pieces.insert(
            0, WorkloadSelector.of(None, None, excluding=[WorkloadSelector.of(ns) for ns in known])
        )
    strict_policies = [_strict_policy(ns, Scope.NAMESPACE) for ns in full]
    if pieces:
        strict_policies.append(
            _strict_policy(root, Scope.WORKLOAD_SELECTOR, selectors=tuple(pieces))
        )
    return [*strict_policies, *out]


def convert_istio_resources(
    docs: list[tuple[str, Mapping[str, Any]]], ctx: f.Ctx, root: str = ROOT_NAMESPACE
) -> list[AuthorizationPolicy]:
    """AuthorizationPolicies (document order), then the policies derived from
    PeerAuthentications."""
    policies: list[AuthorizationPolicy] = []
    peer: list[_PeerAuthn] = []
    seen: dict[tuple[str, str, str], str] = {}
    for index, (where, obj) in enumerate(docs):
        doc = _read_doc(ctx, index, where, f.mapping(ctx, obj, where, required=True))
        ident = (doc.kind, doc.namespace, doc.name)
        if ident in seen:
            raise ctx.fail(
                doc.path("metadata.name"), f"duplicate {doc.label} (first in {seen[ident]})"
            )
        seen[ident] = where
        if doc.kind == "AuthorizationPolicy":
            policy = _authorization_policy(ctx, doc, root)
            if policy is not None:
                policies.append(policy)
        elif doc.kind == "PeerAuthentication":
            peer.append(_peer_authentication(ctx, doc))
        else:
            raise ctx.fail(doc.path("kind"), f"unsupported kind {doc.kind!r}")
    return [*policies, *_convert_peer_authentications(ctx, peer, root)]
