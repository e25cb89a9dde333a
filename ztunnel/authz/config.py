"""Reading authorization policies from the local mesh-state file.

Two shapes: Istio ztunnel's local-config `policies:` list (the wire model written as YAML,
`parse_local_policies`), and Kubernetes `AuthorizationPolicy` / `PeerAuthentication`
documents converted the way istiod converts them for ztunnel (`parse_istio_resources`, see
`ztunnel.authz.istio`). Every error is a `ConfigError` naming the file and the field path;
conversions that change what a policy means are reported through the optional `warnings` list.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ztunnel.authz import _fields as f
from ztunnel.authz.istio import ROOT_NAMESPACE, convert_istio_resources
from ztunnel.authz.policy import (
    Action,
    AuthorizationPolicy,
    Clause,
    Match,
    Rule,
    Scope,
    ServiceAccountMatch,
    StringMatch,
    StringMatchKind,
)

_POLICY_KEYS = ("name", "namespace", "scope", "action", "rules", "dryRun")

# camelCase YAML key -> Match attribute, and how each value is parsed.
_STRING_FIELDS = {
    "namespaces": "namespaces",
    "notNamespaces": "not_namespaces",
    "principals": "principals",
    "notPrincipals": "not_principals",
}
_NETWORK_FIELDS = {
    "sourceIps": "source_ips",
    "notSourceIps": "not_source_ips",
    "destinationIps": "destination_ips",
    "notDestinationIps": "not_destination_ips",
}
_PORT_FIELDS = {
    "destinationPorts": "destination_ports",
    "notDestinationPorts": "not_destination_ports",
}
_SA_FIELDS = {
    "serviceAccounts": "service_accounts",
    "notServiceAccounts": "not_service_accounts",
}
_MATCH_KEYS = (*_STRING_FIELDS, *_NETWORK_FIELDS, *_PORT_FIELDS, *_SA_FIELDS)

_SCOPES = {
    "global": Scope.GLOBAL,
    "namespace": Scope.NAMESPACE,
    "workloadselector": Scope.WORKLOAD_SELECTOR,
}
_ACTIONS = {"allow": Action.ALLOW, "deny": Action.DENY}


def _match(ctx: f.Ctx, raw: Any, path: str) -> Match:
    obj = f.mapping(ctx, raw, path, required=True)
    f.check_keys(ctx, obj, _MATCH_KEYS, path)
    fields: dict[str, Any] = {}
    for key, value in obj.items():
        p = f"{path}.{key}"
        items = f.seq(ctx, value, p)
        if key in _STRING_FIELDS:
            fields[_STRING_FIELDS[key]] = tuple(
                f.string_match(ctx, v, f"{p}[{i}]") for i, v in enumerate(items)
            )
        elif key in _NETWORK_FIELDS:
            fields[_NETWORK_FIELDS[key]] = tuple(
                f.network(ctx, v, f"{p}[{i}]") for i, v in enumerate(items)
            )
        elif key in _PORT_FIELDS:
            fields[_PORT_FIELDS[key]] = tuple(
                f.port(ctx, v, f"{p}[{i}]") for i, v in enumerate(items)
            )
        else:
            fields[_SA_FIELDS[key]] = tuple(
                f.service_account(ctx, v, f"{p}[{i}]", None) for i, v in enumerate(items)
            )
    return Match(**fields)


def _rules(ctx: f.Ctx, raw: Any, path: str) -> tuple[Rule, ...]:
    rules: list[Rule] = []
    for j, rule_raw in enumerate(f.seq(ctx, raw, path)):
        rp = f"{path}[{j}]"
        if rule_raw is None:
            raise ctx.fail(rp, "a rule must be a list of clauses, got null")
        clauses: list[Clause] = []
        for k, clause_raw in enumerate(f.seq(ctx, rule_raw, rp)):
            cp = f"{rp}[{k}]"
            if clause_raw is None:
                raise ctx.fail(cp, "a clause must be a list of matches, got null")
            clauses.append(
                tuple(
                    _match(ctx, m, f"{cp}[{i}]") for i, m in enumerate(f.seq(ctx, clause_raw, cp))
                )
            )
        rules.append(tuple(clauses))
    return tuple(rules)


def _enum_value(
    ctx: f.Ctx, obj: Mapping[str, Any], key: str, path: str, table: Mapping[str, Any]
) -> Any:
    raw = obj.get(key)
    if raw is None:
        raise ctx.fail(f"{path}.{key}", "is required")
    text = f.string(ctx, raw, f"{path}.{key}")
    found = table.get(text.replace("_", "").replace("-", "").lower())
    if found is None:
        names = ", ".join(v.name for v in table.values())
        raise ctx.fail(f"{path}.{key}", f"must be one of {names} (any case), got {text!r}")
    return found


def _local_policy(ctx: f.Ctx, raw: Any, path: str) -> AuthorizationPolicy:
    obj = f.mapping(ctx, raw, path, required=True)
    f.check_keys(ctx, obj, _POLICY_KEYS, path)
    name = f.string(ctx, obj.get("name"), f"{path}.name")
    namespace = f.string(ctx, obj.get("namespace", "default"), f"{path}.namespace")
    if "/" in name or "/" in namespace:
        raise ctx.fail(path, "name and namespace must not contain '/'")
    dry_run = obj.get("dryRun", False)
    if not isinstance(dry_run, bool):
        raise ctx.fail(f"{path}.dryRun", "expected true or false")
    return AuthorizationPolicy(
        name=name,
        namespace=namespace,
        scope=_enum_value(ctx, obj, "scope", path, _SCOPES),
        action=_enum_value(ctx, obj, "action", path, _ACTIONS),
        rules=_rules(ctx, obj.get("rules"), f"{path}.rules"),
        dry_run=dry_run,
    )


def parse_local_policies(
    raw: list[Any], source: str, path: str, *, warnings: list[str] | None = None
) -> list[AuthorizationPolicy]:
    """Parse a local-config `policies:` list.

    Each item: `name`, `namespace` (default `default`), `scope` (Global, Namespace,
    WorkloadSelector; any case), `action` (Allow, Deny), `rules` (a list of rules; a rule is a
    list of clauses; a clause is a list of matches), `dryRun`. Match keys are the camelCase
    names of `istio.security.Match` fields. Raises ConfigError naming `source` and the field
    path (`<path>[i].rules[j][k][m].<field>[n]`); duplicate keys are errors. This shape has
    nothing that needs a warning, `warnings` is accepted for symmetry.
    """
    ctx = f.Ctx(source, warnings)
    out: list[AuthorizationPolicy] = []
    seen: dict[str, str] = {}
    for i, item in enumerate(f.seq(ctx, raw, path)):
        ip = f"{path}[{i}]"
        policy = _local_policy(ctx, item, ip)
        if policy.key in seen:
            raise ctx.fail(
                f"{ip}.name", f"duplicate policy {policy.key} (first at {seen[policy.key]})"
            )
        seen[policy.key] = ip
        out.append(policy)
    return out


def parse_istio_resources(
    docs: list[tuple[str, Mapping[str, Any]]],
    source: str,
    *,
    warnings: list[str] | None = None,
    root_namespace: str = ROOT_NAMESPACE,
) -> list[AuthorizationPolicy]:
    """Convert `security.istio.io/v1` or `v1beta1` AuthorizationPolicy and PeerAuthentication
    documents, each given as (its path in the file, its mapping), into L4 policies.

    What ztunnel cannot enforce at L4 fails closed (ALLOW rules needing HTTP are dropped, DENY
    rules keep their L4 part) with a warning per rule; see `ztunnel.authz.istio`.
    """
    return convert_istio_resources(docs, f.Ctx(source, warnings), root_namespace)


def _string_match_dict(m: StringMatch) -> dict[str, Any]:
    if m.kind is StringMatchKind.PRESENCE:
        return {"presence": {}}
    return {m.kind.value: m.value}


def _sa_dict(m: ServiceAccountMatch) -> dict[str, str]:
    return {"namespace": m.namespace, "serviceAccount": m.service_account}


def _match_dict(m: Match) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, attr in _STRING_FIELDS.items():
        if getattr(m, attr):
            out[key] = [_string_match_dict(s) for s in getattr(m, attr)]
    for key, attr in _NETWORK_FIELDS.items():
        if getattr(m, attr):
            out[key] = [str(n) for n in getattr(m, attr)]
    for key, attr in _PORT_FIELDS.items():
        if getattr(m, attr):
            out[key] = list(getattr(m, attr))
    for key, attr in _SA_FIELDS.items():
        if getattr(m, attr):
            out[key] = [_sa_dict(s) for s in getattr(m, attr)]
    return out


def policy_to_dict(policy: AuthorizationPolicy) -> dict[str, Any]:
    """The local-config form of a policy (what `parse_local_policies` reads back), for config
    dumps. Workload selectors are not part of that form and are left out."""
    scope = {
        Scope.GLOBAL: "Global",
        Scope.NAMESPACE: "Namespace",
        Scope.WORKLOAD_SELECTOR: "WorkloadSelector",
    }[policy.scope]
    return {
        "name": policy.name,
        "namespace": policy.namespace,
        "scope": scope,
        "action": policy.action.value.capitalize(),
        "rules": [[[_match_dict(m) for m in clause] for clause in rule] for rule in policy.rules],
        "dryRun": policy.dry_run,
    }
