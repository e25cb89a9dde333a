"""AuthorizationPolicy analyzers.

- `auth.AuthorizationPoliciesAnalyzer`, as istioctl's (istio/istio pkg/config/analysis/
  analyzers/authz/authorizationpolicies.go): a selector or namespace that matches no workload
  of the mesh (IST0127), a `from.source.namespaces` entry naming no namespace (IST0101).
  "Of the mesh" counts ambient pods as this mesh selects them (labels), not only pods with
  the CNI's redirection annotation, so that pods and templates read from files count.
- Ambient: what istiod writes into the policy's status, reported as istioctl reports status
  conditions (IST0171, conditions.go): a policy the node agent enforces (no `targetRefs`)
  with HTTP attributes, which it cannot see (`ZtunnelAccepted`, reason UnsupportedValue,
  pilot/pkg/serviceregistry/ambient/authorization.go `convertAuthorizationPolicy`; istiod
  keeps the condition's status True for these "accepted with warnings" cases, but an ALLOW
  rule with HTTP attributes is dropped, so the policy denies what it was meant to allow, and a
  DENY is enforced without its HTTP conditions, denying more than meant); and a policy
  bound with `targetRefs` to a Service, Gateway or GatewayClass that no waypoint serves
  (`WaypointAccepted` False, policies.go `WaypointPolicyStatusCollection`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ztunnel.analyze import mesh
from ztunnel.analyze import messages as msg
from ztunnel.analyze.context import Analyzer, Context, selector_string, selects
from ztunnel.meshconfig.gateway import WAYPOINT_CLASS
from ztunnel.meshconfig.security import AuthorizationPolicy, Rule, TargetRef

# ---- IST0127, IST0101 namespace --------------------------------------------------------------


def policies(ctx: Context) -> None:
    in_mesh: dict[str, list[dict[str, str]]] = {}
    for pod in ctx.pods():
        if mesh.in_mesh(ctx, pod):
            in_mesh.setdefault(pod.namespace, []).append(dict(pod.labels))
    namespaces = [n.meta.name for n in ctx.cs.namespaces]
    for ap in ctx.cs.authorization_policies:
        _no_matching_workloads(ctx, ap, in_mesh)
        _namespaces_not_found(ctx, ap, namespaces)


def _no_matching_workloads(
    ctx: Context, ap: AuthorizationPolicy, in_mesh: dict[str, list[dict[str, str]]]
) -> None:
    ns = ap.meta.namespace
    if ns == ctx.root_namespace:
        # mesh-wide: a selector must match a pod in some namespace
        if ap.selector is not None and not any(
            selects(ap.selector, labels) for pods in in_mesh.values() for labels in pods
        ):
            ctx.report(msg.NoMatchingWorkloadsFound, ap.meta, selector_string(ap.selector))
        return
    if ap.selector is None:
        if not in_mesh.get(ns):
            ctx.report(msg.NoMatchingWorkloadsFound, ap.meta, "")
        return
    if not any(selects(ap.selector, labels) for labels in in_mesh.get(ns, [])):
        ctx.report(msg.NoMatchingWorkloadsFound, ap.meta, selector_string(ap.selector))


def _namespace_match(namespace: str, pattern: str) -> bool:
    """`namespaceMatch`: `*`, `*suffix`, `prefix*`, or equal ignoring case."""
    if pattern == "*":
        return True
    if pattern.startswith("*"):
        return namespace.endswith(pattern[1:])
    if pattern.endswith("*"):
        return namespace.startswith(pattern[:-1])
    return namespace.lower() == pattern.lower()


def _namespaces_not_found(ctx: Context, ap: AuthorizationPolicy, namespaces: list[str]) -> None:
    for i, rule in enumerate(ap.rules):
        for j, source in enumerate(rule.sources):
            positive = source.get("namespaces")
            for k, pattern in enumerate((*positive, *source.get("notNamespaces"))):
                if any(_namespace_match(n, pattern) for n in namespaces):
                    continue
                # istioctl's line template names `namespaces[k]` for notNamespaces too, with
                # k counted within notNamespaces.
                index = k if k < len(positive) else k - len(positive)
                at = ("spec", "rules", i, "from", j, "source", "namespaces", index)
                ctx.report(msg.ReferencedResourceNotFound, ap.meta, "namespace", pattern, at=at)


# ---- IST0171 ZtunnelAccepted ----------------------------------------------------------------

_HTTP_OPERATIONS = ("hosts", "notHosts", "methods", "notMethods", "paths", "notPaths")
_HTTP_SOURCES = ("remoteIpBlocks", "notRemoteIpBlocks", "requestPrincipals", "notRequestPrincipals")
_L4_WHEN = frozenset(
    {"source.ip", "source.namespace", "source.principal", "destination.ip", "destination.port"}
)
_HTTP_RULE = (
    "ztunnel does not support HTTP attributes (found: %s). In ambient mode you must use a "
    "waypoint proxy to enforce HTTP rules. %s"
)
_DENY_MIXED = (
    "DENY policy with HTTP attributes is enforced without the HTTP rules. This will be more "
    "restrictive than requested."
)
_ALLOW_RULE = (
    "Within an ALLOW policy, rules matching HTTP attributes are omitted. This will be more "
    "restrictive than requested."
)


def http_attributes(rule: Rule) -> set[str]:
    """`handleRule`: the HTTP-only fields and `when` keys of a rule."""
    found: set[str] = set()
    for op in rule.operations:
        found.update(k for k in _HTTP_OPERATIONS if op.get(k))
    for src in rule.sources:
        found.update(k for k in _HTTP_SOURCES if src.get(k))
    found.update(c.key for c in rule.conditions if c.key not in _L4_WHEN)
    return found


def ztunnel_acceptance(ap: AuthorizationPolicy) -> str | None:
    """The message istiod puts in the policy's ZtunnelAccepted condition, when not plain
    "attached to ztunnel"; None for waypoint (targetRefs) policies and clean ones."""
    if ap.target_refs:
        return None
    if ap.action not in ("ALLOW", "DENY"):
        return f"ztunnel does not support the {ap.action} action"
    found: set[str] = set()
    for rule in ap.rules:
        found |= http_attributes(rule)
    if not found:
        return None
    # istiod says a DENY left without L4 conditions "will have no effect" (Istio's ztunnel
    # skips empty matches). This node agent enforces such a clause as matching everything
    # (ztunnel/authz/istio.py, istio/istio#61126), so every DENY is enforced without its HTTP
    # rules: istiod's text for that case is the true one here.
    boilerplate = _DENY_MIXED if ap.action == "DENY" else _ALLOW_RULE
    return _HTTP_RULE % (", ".join(sorted(found)), boilerplate)


def ztunnel_policies(ctx: Context) -> None:
    for ap in ctx.cs.authorization_policies:
        message = ztunnel_acceptance(ap)
        if message is not None:
            ctx.report(
                msg.NegativeConditionStatus, ap.meta, "ZtunnelAccepted", "UnsupportedValue", message
            )


# ---- IST0171 WaypointAccepted ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _TargetStatus:
    ancestor: str
    bound: bool
    reason: str
    message: str


def _target_status(ctx: Context, ap: AuthorizationPolicy, ref: TargetRef) -> _TargetStatus:
    namespace = ref.namespace or ap.meta.namespace
    key = f"{namespace}/{ref.name}"
    group = ref.group or "core"
    ancestor = f"{ref.kind}.{group}:{key}"
    bound, reason, message = False, "unknown", "not bound"
    if ref.kind == "GatewayClass":
        if namespace != ctx.root_namespace:
            reason = "Invalid"
            message = (
                "AuthorizationPolicy must be in the root namespace "
                f"`{ctx.root_namespace}` when referencing a GatewayClass"
            )
        elif ref.name == WAYPOINT_CLASS:  # classes are not modelled: Istio's own is assumed
            bound, reason, message = True, "Accepted", f"bound to {ref.name}"
        else:
            reason = "TargetNotFound"
    elif ref.kind == "Gateway":
        gw = ctx.cs.gateway(namespace, ref.name)
        if gw is not None and gw.is_waypoint and mesh.waypoint_ready(ctx, gw):
            bound, reason, message = True, "Accepted", f"bound to {key}"
        else:
            reason = "TargetNotFound"
    elif ref.kind in ("Service", "ServiceEntry"):
        items = ctx.cs.services if ref.kind == "Service" else ctx.cs.service_entries
        target = next(
            (x.meta for x in items if (x.meta.namespace, x.meta.name) == (namespace, ref.name)),
            None,
        )
        if target is None:
            reason, message = "TargetNotFound", f"{ref.kind} {key} was not found"
        else:
            b = mesh.service_binding(ctx, target)
            if b.waypoint is not None and not b.reason:
                wp = f"{b.waypoint.meta.namespace}/{b.waypoint.meta.name}"
                bound, reason, message = True, "Accepted", f"bound to {wp}"
            else:
                reason = "AncestorNotBound"
                message = f"{ref.kind} {key} is not bound to a waypoint"
    return _TargetStatus(ancestor, bound, reason, message)


def waypoint_acceptance(ctx: Context, ap: AuthorizationPolicy) -> tuple[bool, str, str] | None:
    """istiod's WaypointAccepted condition (status, reason, message), flattened over the
    targetRefs as `flattenConditions` does; None without targetRefs."""
    if not ap.target_refs:
        return None
    targets = [_target_status(ctx, ap, ref) for ref in ap.target_refs]
    if len(targets) == 1:
        t = targets[0]
        return t.bound, t.reason, t.message
    status = any(t.bound for t in targets)
    unbound = [t.ancestor for t in targets if not t.bound]
    reason = "Invalid"
    if status:
        reason = "PartiallyInvalid" if unbound else "Accepted"
    message = f"Invalid targetRefs: {', '.join(unbound)}" if unbound else ""
    return status, reason, message


def waypoint_policies(ctx: Context) -> None:
    for ap in ctx.cs.authorization_policies:
        acceptance = waypoint_acceptance(ctx, ap)
        if acceptance is None:
            continue
        bound, reason, message = acceptance
        if not bound or reason == "PartiallyInvalid":
            ctx.report(msg.NegativeConditionStatus, ap.meta, "WaypointAccepted", reason, message)


ANALYZERS = (
    Analyzer(
        "auth.AuthorizationPoliciesAnalyzer",
        "Checks the validity of authorization policies",
        ("AuthorizationPolicy", "Namespace", "Pod|Workload"),
        policies,
    ),
    Analyzer(
        "ambient.ZtunnelPolicyAnalyzer",
        "Checks that policies the node agent enforces (no targetRefs) use no HTTP attributes",
        ("AuthorizationPolicy",),
        ztunnel_policies,
    ),
    Analyzer(
        "ambient.WaypointPolicyAnalyzer",
        "Checks that policies bound with targetRefs reach a waypoint",
        ("AuthorizationPolicy", "Gateway", "Service"),
        waypoint_policies,
    ),
)
