"""L7 authorization as Istio's waypoint enforces it (Envoy RBAC built by istiod): CUSTOM and
DENY policies first, then ALLOW (no ALLOW policy: allowed; ALLOW policies but no match:
denied); AUDIT and dry-run policies are only reported. A rule matches when each of its
`from` (any source), `to` (any operation) and `when` (all conditions) match; within a source
or operation every present field must pass (a `not` field passes when nothing matches).

Not available here and failing closed for ALLOW (they never match): request principals and
`request.auth.*` (no RequestAuthentication/JWT), `connection.sni`, `experimental.*`. A CUSTOM
policy (external authorization) has no provider to ask: it denies what it matches.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ztunnel.identity import SpiffeId
from ztunnel.meshconfig.security import AuthorizationPolicy, Condition, FieldSet, Rule

DENIED_BODY = "RBAC: access denied"


@dataclass(frozen=True)
class RequestAttrs:
    method: str
    path: str  # without the query
    host: str  # :authority
    port: int  # destination (service) port
    headers: Mapping[str, tuple[str, ...]]
    source: SpiffeId | None
    source_ip: str
    destination_ip: str


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    policy: str = ""  # "<ns>/<name>" of the deciding policy
    reason: str = ""
    audited: tuple[str, ...] = ()
    dry_run: tuple[str, ...] = field(default=())  # dry-run policies that would have matched


def _pattern(p: str, value: str | None, icase: bool = False) -> bool:
    if value is None:
        return False
    if icase:
        p, value = p.lower(), value.lower()
    if p == "*":
        return value != ""
    if p.startswith("*"):
        return value.endswith(p[1:])
    if p.endswith("*"):
        return value.startswith(p[:-1])
    return value == p


def path_matches(p: str, path: str) -> bool:
    """Istio's path forms: exact, `prefix*`, `*suffix`, `*`, and templates with whole
    segments `{*}` (one segment) and `{**}` (the rest)."""
    if "{" not in p:
        return _pattern(p, path)
    want = p.split("/")
    got = path.split("/")
    for i, seg in enumerate(want):
        if seg == "{**}":
            return len(got) > i and all(got[i:]) if i < len(got) else False
        if i >= len(got):
            return False
        if seg == "{*}":
            if not got[i]:
                return False
        elif seg != got[i]:
            return False
    return len(got) == len(want)


def _in_cidr(cidr: str, ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip) in ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        return False


def _host_match(p: str, host: str) -> bool:
    """Case-insensitive; a pattern without a port also matches the host with any port."""
    if _pattern(p, host, True):
        return True
    h, sep, port = host.rpartition(":")
    return bool(sep) and port.isdigit() and ":" not in p and _pattern(p, h, True)


def _one(key: str, value: str, a: RequestAttrs, policy_ns: str) -> bool:
    """Does one entry of field `key` (camelCase, without `not`) match the request?"""
    ident = a.source
    if key == "principals":
        return _pattern(value, ident.principal if ident else None)
    if key == "namespaces":
        return _pattern(value, ident.namespace if ident else None)
    if key == "serviceAccounts":
        ns, sep, sa = value.partition("/")
        if not sep:
            ns, sa = policy_ns, value
        return ident is not None and ident.namespace == ns and ident.service_account == sa
    if key in ("ipBlocks", "remoteIpBlocks"):
        return _in_cidr(value, a.source_ip)
    if key == "requestPrincipals":
        return False
    if key == "hosts":
        return _host_match(value, a.host)
    if key == "ports":
        return str(a.port) == value
    if key == "methods":
        return _pattern(value, a.method)
    if key == "paths":
        return path_matches(value, a.path)
    return False


def _fields_match(fs: FieldSet, a: RequestAttrs, policy_ns: str) -> bool:
    for key, values in fs.fields:
        negative = key.startswith("not")
        base = key[3].lower() + key[4:] if negative else key
        hit = any(_one(base, v, a, policy_ns) for v in values)
        if hit == negative:
            return False
    return True


def _condition(c: Condition, a: RequestAttrs, policy_ns: str) -> bool:
    key = c.key

    def test(v: str) -> bool:
        if key.startswith("request.headers["):
            name = key[len("request.headers[") : -1].lower()
            return any(_pattern(v, h) for h in a.headers.get(name, ()))
        if key in ("source.ip", "remote.ip"):
            return _in_cidr(v, a.source_ip)
        if key == "destination.ip":
            return _in_cidr(v, a.destination_ip)
        if key == "destination.port":
            return v == str(a.port)
        if key == "source.namespace":
            return _one("namespaces", v, a, policy_ns)
        if key == "source.principal":
            return _one("principals", v, a, policy_ns)
        if key == "source.serviceAccount":
            return _one("serviceAccounts", v, a, policy_ns)
        return False  # request.auth.*, connection.sni, experimental.*: not available

    if c.values and not any(test(v) for v in c.values):
        return False
    return not any(test(v) for v in c.not_values)


def rule_matches(rule: Rule, a: RequestAttrs, policy_ns: str) -> bool:
    if rule.sources and not any(_fields_match(s, a, policy_ns) for s in rule.sources):
        return False
    if rule.operations and not any(_fields_match(o, a, policy_ns) for o in rule.operations):
        return False
    return all(_condition(c, a, policy_ns) for c in rule.conditions)


def policy_matches(p: AuthorizationPolicy, a: RequestAttrs) -> bool:
    return any(rule_matches(r, a, p.meta.namespace) for r in p.rules)


def authorize(policies: Sequence[AuthorizationPolicy], a: RequestAttrs) -> Verdict:
    enforced = [p for p in policies if not p.dry_run]
    dry = tuple(p.key for p in policies if p.dry_run and policy_matches(p, a))
    audited = tuple(p.key for p in enforced if p.action == "AUDIT" and policy_matches(p, a))
    for action in ("CUSTOM", "DENY"):
        for p in enforced:
            if p.action == action and policy_matches(p, a):
                return Verdict(False, p.key, f"{action} policy matched", audited, dry)
    allows = [p for p in enforced if p.action == "ALLOW"]
    if not allows:
        return Verdict(True, "", "no ALLOW policy applies", audited, dry)
    for p in allows:
        if policy_matches(p, a):
            return Verdict(True, p.key, "ALLOW policy matched", audited, dry)
    return Verdict(False, "", "ALLOW policies apply but none matched", audited, dry)
