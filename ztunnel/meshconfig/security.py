"""Istio `security.istio.io` AuthorizationPolicy with all of its L7 fields, as the waypoint
enforces it: policies bound with `targetRefs` to the waypoint's Gateway, to a Service, or (in
the root namespace) to the `istio-waypoint` GatewayClass (istio/istio
pilot/pkg/model/policyattachment.go). Selector and namespace-wide policies are the node
agent's (L4, `ztunnel.authz`); they are parsed here too so that analysis sees every policy."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from ztunnel.meshconfig.resource import Fields, ResourceMeta

SECURITY_API_VERSIONS = ("security.istio.io/v1", "security.istio.io/v1beta1")
DRY_RUN_ANNOTATION = "istio.io/dry-run"
ACTIONS = ("ALLOW", "DENY", "AUDIT", "CUSTOM")

# `when` keys (istio/istio pkg/config/security: ValidateAttribute and the RBAC builder).
WHEN_KEYS = (
    "source.ip",
    "source.namespace",
    "source.principal",
    "source.serviceAccount",
    "remote.ip",
    "remote.port",
    "destination.ip",
    "destination.port",
    "connection.sni",
    "request.auth.principal",
    "request.auth.audiences",
    "request.auth.presenter",
)
WHEN_PREFIXES = ("request.headers[", "request.auth.claims[", "experimental.envoy.filters.")

_SOURCE_KEYS = (
    "principals",
    "notPrincipals",
    "requestPrincipals",
    "notRequestPrincipals",
    "namespaces",
    "notNamespaces",
    "ipBlocks",
    "notIpBlocks",
    "remoteIpBlocks",
    "notRemoteIpBlocks",
    "serviceAccounts",
    "notServiceAccounts",
)
_OPERATION_KEYS = (
    "hosts",
    "notHosts",
    "ports",
    "notPorts",
    "methods",
    "notMethods",
    "paths",
    "notPaths",
)


@dataclass(frozen=True, slots=True)
class TargetRef:
    group: str
    kind: str
    name: str
    namespace: str = ""


@dataclass(frozen=True, slots=True)
class FieldSet:
    """A `from[].source` or a `to[].operation`: field name (as in the API) -> values."""

    fields: tuple[tuple[str, tuple[str, ...]], ...]

    def get(self, key: str) -> tuple[str, ...]:
        for k, v in self.fields:
            if k == key:
                return v
        return ()


@dataclass(frozen=True, slots=True)
class Condition:
    key: str
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Rule:
    path: str
    sources: tuple[FieldSet, ...] = ()
    operations: tuple[FieldSet, ...] = ()
    conditions: tuple[Condition, ...] = ()


@dataclass(frozen=True, slots=True)
class AuthorizationPolicy:
    meta: ResourceMeta
    action: str
    rules: tuple[Rule, ...]
    target_refs: tuple[TargetRef, ...] = ()
    selector: tuple[tuple[str, str], ...] | None = None
    provider: str = ""
    dry_run: bool = False

    @property
    def key(self) -> str:
        return f"{self.meta.namespace}/{self.meta.name}"


def _pattern(f: Fields, value: Any, path: str, allow_inner: bool = False) -> str:
    text = f.string(value, path)
    stars = text.count("*")
    if not allow_inner and (
        stars > 1 or (stars == 1 and not (text.startswith("*") or text.endswith("*")))
    ):
        raise f.fail(path, f"'*' is only allowed alone, as a prefix or as a suffix: {text!r}")
    return text


def _values(f: Fields, obj: dict[str, Any] | Any, key: str, path: str) -> tuple[str, ...]:
    raw = obj.get(key)
    items = f.seq(raw, f"{path}.{key}")
    if raw is not None and not items:
        raise f.fail(f"{path}.{key}", "must not be empty when present")
    out = []
    for i, v in enumerate(items):
        vp = f"{path}.{key}[{i}]"
        if key in ("ports", "notPorts"):
            out.append(str(f.port(v, vp)))
        elif key.lower().endswith("ipblocks"):
            text = f.string(v, vp)
            try:
                ipaddress.ip_network(text, strict=False)
            except ValueError:
                raise f.fail(vp, f"not an IP address or CIDR: {text!r}") from None
            out.append(text)
        elif key in ("paths", "notPaths"):
            text = f.string(v, vp)
            if not (text.startswith("/") or text.startswith("*")):
                raise f.fail(vp, f"a path must start with '/' or '*': {text!r}")
            if "{" in text:
                _check_template(f, text, vp)
            elif text.count("*") > 1 or (
                "*" in text and not (text.startswith("*") or text.endswith("*"))
            ):
                raise f.fail(
                    vp, f"'*' is only allowed as a prefix or suffix (or use {{*}}/{{**}}): {text!r}"
                )
            out.append(text)
        else:
            out.append(_pattern(f, v, vp))
    return tuple(out)


def _check_template(f: Fields, text: str, path: str) -> None:
    """Istio path templates: whole segments `{*}` (one segment) or `{**}` (the rest, last)."""
    segments = text.split("/")
    for i, seg in enumerate(segments):
        if "{" in seg or "}" in seg:
            if seg not in ("{*}", "{**}"):
                raise f.fail(path, f"a template segment must be exactly {{*}} or {{**}}: {seg!r}")
            if seg == "{**}" and i != len(segments) - 1:
                raise f.fail(path, "{**} must be the last segment")


def _entries(
    f: Fields, rule: Any, key: str, inner: str, keys: tuple[str, ...], path: str
) -> list[tuple[tuple[str, tuple[str, ...]], ...]]:
    out = []
    raw = rule.get(key)
    items = f.seq(raw, f"{path}.{key}")
    if raw is not None and not items:
        raise f.fail(f"{path}.{key}", "must not be empty when present")
    for i, entry_raw in enumerate(items):
        ep = f"{path}.{key}[{i}]"
        entry = f.mapping(entry_raw, ep, required=True)
        f.check_keys(entry, ep, (inner,))
        body = f.mapping(entry.get(inner), f"{ep}.{inner}", required=True)
        bp = f"{ep}.{inner}"
        f.check_keys(body, bp, keys)
        fields = tuple((k, _values(f, body, k, bp)) for k in keys if body.get(k) is not None)
        if not fields:
            raise f.fail(bp, f"`{key}.{inner}` must not be empty")
        if inner == "source":
            has_sa = any(k in body for k in ("serviceAccounts", "notServiceAccounts"))
            if has_sa and any(
                k in body for k in ("principals", "notPrincipals", "namespaces", "notNamespaces")
            ):
                raise f.fail(bp, "cannot set serviceAccounts with namespaces or principals")
        out.append(fields)
    return out


def _condition(f: Fields, raw: Any, path: str) -> Condition:
    c = f.mapping(raw, path, required=True)
    f.check_keys(c, path, ("key", "values", "notValues"))
    key = f.string(c.get("key"), f"{path}.key")
    if key not in WHEN_KEYS and not key.startswith(WHEN_PREFIXES):
        raise f.fail(f"{path}.key", f"unknown attribute {key!r}")
    if key.startswith(("request.headers[", "request.auth.claims[")) and not key.endswith("]"):
        raise f.fail(f"{path}.key", f"missing ']' in {key!r}")
    values = f.strings(c.get("values"), f"{path}.values")
    not_values = f.strings(c.get("notValues"), f"{path}.notValues")
    if not values and not not_values:
        raise f.fail(path, f"at least one of values or notValues must be set for key {key}")
    return Condition(key, values, not_values)


def parse_authorization_policy(f: Fields, meta: ResourceMeta) -> AuthorizationPolicy:
    spec = f.mapping(f.doc.obj.get("spec"), "spec")
    f.check_keys(
        spec, "spec", ("selector", "targetRef", "targetRefs", "rules", "action", "provider")
    )
    action = f.string(spec.get("action", "ALLOW"), "spec.action").upper()
    if action not in ACTIONS:
        raise f.fail("spec.action", f"must be one of {', '.join(ACTIONS)}, got {action!r}")
    provider = ""
    if spec.get("provider") is not None:
        if action != "CUSTOM":
            raise f.fail("spec.provider", "only allowed with the CUSTOM action")
        pv = f.mapping(spec["provider"], "spec.provider")
        provider = f.string(pv.get("name"), "spec.provider.name")
    elif action == "CUSTOM":
        raise f.fail("spec.provider", "the CUSTOM action needs a provider")
    refs = []
    raw_refs = list(f.seq(spec.get("targetRefs"), "spec.targetRefs"))
    ref_paths = [f"spec.targetRefs[{i}]" for i in range(len(raw_refs))]
    if spec.get("targetRef") is not None:
        if raw_refs:
            raise f.fail("spec.targetRef", "targetRef and targetRefs are mutually exclusive")
        raw_refs, ref_paths = [spec["targetRef"]], ["spec.targetRef"]
    for raw, rp in zip(raw_refs, ref_paths, strict=True):
        r = f.mapping(raw, rp, required=True)
        f.check_keys(r, rp, ("group", "kind", "name", "namespace"))
        refs.append(
            TargetRef(
                f.string(r.get("group", ""), f"{rp}.group", required=False),
                f.string(r.get("kind"), f"{rp}.kind"),
                f.string(r.get("name"), f"{rp}.name"),
                f.string(r.get("namespace"), f"{rp}.namespace", required=False),
            )
        )
    selector = None
    if spec.get("selector") is not None:
        if refs:
            raise f.fail("spec.selector", "cannot be set together with targetRef(s)")
        sel = f.mapping(spec["selector"], "spec.selector")
        f.check_keys(sel, "spec.selector", ("matchLabels",))
        selector = tuple(
            sorted(f.string_map(sel.get("matchLabels"), "spec.selector.matchLabels").items())
        )
    raw_rules = spec.get("rules")
    if action == "DENY" and not raw_rules:
        raise f.fail(
            "spec.rules", "a DENY policy without rules never matches; add `{}` to deny all"
        )
    rules = []
    for j, raw in enumerate(f.seq(raw_rules, "spec.rules")):
        rp = f"spec.rules[{j}]"
        rule = f.mapping(raw, rp, required=True)
        f.check_keys(rule, rp, ("from", "to", "when"))
        rules.append(
            Rule(
                rp,
                tuple(FieldSet(s) for s in _entries(f, rule, "from", "source", _SOURCE_KEYS, rp)),
                tuple(
                    FieldSet(o) for o in _entries(f, rule, "to", "operation", _OPERATION_KEYS, rp)
                ),
                tuple(
                    _condition(f, c, f"{rp}.when[{i}]")
                    for i, c in enumerate(f.seq(rule.get("when"), f"{rp}.when"))
                ),
            )
        )
    dry = meta.annotations.get(DRY_RUN_ANNOTATION, "false").lower()
    if dry not in ("true", "false"):
        raise f.fail(f"metadata.annotations.{DRY_RUN_ANNOTATION}", 'must be "true" or "false"')
    return AuthorizationPolicy(
        meta, action, tuple(rules), tuple(refs), selector, provider, dry == "true"
    )


def waypoint_policies(
    policies: list[AuthorizationPolicy],
    waypoint_namespace: str,
    waypoint_name: str,
    service: tuple[str, str] | None,
    root_namespace: str = "istio-system",
) -> list[AuthorizationPolicy]:
    """The policies a waypoint enforces for traffic to `service` ((namespace, name), None for
    workload-addressed traffic): `policyattachment.go ShouldAttachPolicy` for a waypoint."""
    out = []
    for p in policies:
        ns = p.meta.namespace
        for ref in p.target_refs:
            group = ref.group or "core"
            if ref.kind == "Service" and group in ("core", "") and service is not None:
                if ns == service[0] and ref.name == service[1]:
                    out.append(p)
                    break
            elif (
                ref.kind == "GatewayClass" and ns == root_namespace and ref.name == "istio-waypoint"
            ) or (
                ref.kind == "Gateway"
                and group == "gateway.networking.k8s.io"
                and ns == waypoint_namespace
                and ref.name == waypoint_name
                and ref.namespace in ("", waypoint_namespace)
            ):
                out.append(p)
                break
    return out
