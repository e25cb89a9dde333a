"""Gateway API resources (`gateway.networking.k8s.io/v1`): `HTTPRoute` attached to a Service
(GAMMA, as Istio waypoints use it), `Gateway` (the waypoint itself) and `ReferenceGrant`
(cross-namespace backends)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ztunnel.meshconfig.match import StringMatch
from ztunnel.meshconfig.networking import HeaderOperations
from ztunnel.meshconfig.resource import Fields, ResourceMeta

GATEWAY_API_VERSIONS = (
    "gateway.networking.k8s.io/v1",
    "gateway.networking.k8s.io/v1beta1",
    "gateway.networking.k8s.io/v1alpha2",
)
WAYPOINT_CLASS = "istio-waypoint"


@dataclass(frozen=True, slots=True)
class ParentRef:
    group: str
    kind: str
    name: str
    namespace: str  # resolved: the route's namespace when not written
    port: int | None = None
    section_name: str = ""

    @property
    def is_service(self) -> bool:
        return self.group in ("", "core") and self.kind == "Service"


@dataclass(frozen=True, slots=True)
class BackendRef:
    name: str
    namespace: str  # resolved
    port: int | None
    weight: int = 1
    group: str = ""
    kind: str = "Service"


@dataclass(frozen=True, slots=True)
class RouteMatch:
    path: str  # field path
    uri: StringMatch | None = None
    method: str = ""
    headers: tuple[tuple[str, StringMatch], ...] = ()
    query_params: tuple[tuple[str, StringMatch], ...] = ()


@dataclass(frozen=True, slots=True)
class RequestRedirect:
    scheme: str = ""
    hostname: str = ""
    port: int | None = None
    status_code: int = 302
    full_path: str | None = None
    prefix_path: str | None = None


@dataclass(frozen=True, slots=True)
class UrlRewrite:
    hostname: str = ""
    full_path: str | None = None
    prefix_path: str | None = None


@dataclass(frozen=True, slots=True)
class RequestMirror:
    backend: BackendRef
    percent: float = 100.0


@dataclass(frozen=True, slots=True)
class RouteRule:
    path: str
    name: str = ""
    matches: tuple[RouteMatch, ...] = ()
    backends: tuple[BackendRef, ...] = ()
    request_headers: HeaderOperations = HeaderOperations()
    response_headers: HeaderOperations = HeaderOperations()
    redirect: RequestRedirect | None = None
    rewrite: UrlRewrite | None = None
    mirrors: tuple[RequestMirror, ...] = ()
    timeout: float | None = None
    backend_timeout: float | None = None
    retry_attempts: int | None = None
    retry_codes: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class GatewayHTTPRoute:
    meta: ResourceMeta
    parents: tuple[ParentRef, ...]
    hostnames: tuple[str, ...]
    rules: tuple[RouteRule, ...]


@dataclass(frozen=True, slots=True)
class Listener:
    name: str
    port: int
    protocol: str
    hostname: str = ""
    # allowedRoutes.namespaces: which namespaces may attach (Same, All, Selector); for a
    # waypoint, which namespaces' services and workloads may use it.
    allowed_from: str = "Same"
    allowed_selector: tuple[tuple[str, str], ...] = ()

    def allows_namespace(
        self, gateway_namespace: str, namespace: str, labels: Mapping[str, str]
    ) -> bool:
        if self.allowed_from == "All":
            return True
        if self.allowed_from == "Selector":
            return all(labels.get(k) == v for k, v in self.allowed_selector)
        return namespace == gateway_namespace


@dataclass(frozen=True, slots=True)
class Gateway:
    meta: ResourceMeta
    class_name: str
    listeners: tuple[Listener, ...]

    @property
    def is_waypoint(self) -> bool:
        return self.class_name == WAYPOINT_CLASS

    @property
    def waypoint_for(self) -> str:
        """`istio.io/waypoint-for`: service (default), workload, all or none."""
        return self.meta.labels.get("istio.io/waypoint-for", "service")


@dataclass(frozen=True, slots=True)
class ReferenceGrant:
    meta: ResourceMeta
    from_: tuple[tuple[str, str, str], ...]  # (group, kind, namespace)
    to: tuple[tuple[str, str, str], ...]  # (group, kind, name or "")

    def allows(self, kind: str, namespace: str, to_kind: str, to_name: str) -> bool:
        """Whether a `kind` in `namespace` may refer to `to_kind`/`to_name` in ours."""
        ok_from = any(k == kind and ns == namespace for _, k, ns in self.from_)
        ok_to = any(k == to_kind and (not n or n == to_name) for _, k, n in self.to)
        return ok_from and ok_to


_HEADER = re.compile(r"^[!#$%&'*+\-.^_`|~0-9a-zA-Z]+$")


def _header_modifier(f: Fields, raw: Any, path: str) -> HeaderOperations:
    obj = f.mapping(raw, path, required=True)
    f.check_keys(obj, path, ("set", "add", "remove"))

    def pairs(key: str) -> tuple[tuple[str, str], ...]:
        out = []
        for i, item in enumerate(f.seq(obj.get(key), f"{path}.{key}")):
            ip = f"{path}.{key}[{i}]"
            it = f.mapping(item, ip, required=True)
            f.check_keys(it, ip, ("name", "value"))
            name = f.string(it.get("name"), f"{ip}.name")
            if not _HEADER.match(name):
                raise f.fail(f"{ip}.name", f"not a valid header name: {name!r}")
            out.append((name.lower(), f.string(it.get("value"), f"{ip}.value", empty=True)))
        return tuple(out)

    return HeaderOperations(
        pairs("set"),
        pairs("add"),
        tuple(h.lower() for h in f.strings(obj.get("remove"), f"{path}.remove")),
    )


def _backend(f: Fields, raw: Any, path: str, namespace: str, mirror: bool = False) -> BackendRef:
    obj = f.mapping(raw, path, required=True)
    f.check_keys(
        obj,
        path,
        ("name", "namespace", "port", "weight", "group", "kind"),
        unsupported=() if mirror else ("filters",),
    )
    kind = f.string(obj.get("kind", "Service"), f"{path}.kind")
    group = f.string(obj.get("group", ""), f"{path}.group", required=False)
    if kind != "Service" or group not in ("", "core"):
        raise f.fail(path, f"only Service backends are supported, got {group or 'core'}/{kind}")
    port = None if obj.get("port") is None else f.port(obj["port"], f"{path}.port")
    if port is None:
        raise f.fail(f"{path}.port", "is required for a Service backend")
    return BackendRef(
        f.string(obj.get("name"), f"{path}.name"),
        f.string(obj.get("namespace", namespace), f"{path}.namespace"),
        port,
        1 if mirror else f.integer(obj.get("weight", 1), f"{path}.weight", 0, 1_000_000),
        group,
        kind,
    )


def _path_modifier(f: Fields, raw: Any, path: str) -> tuple[str | None, str | None]:
    obj = f.mapping(raw, path, required=True)
    f.check_keys(obj, path, ("type", "replaceFullPath", "replacePrefixMatch"))
    kind = f.string(obj.get("type"), f"{path}.type")
    if kind == "ReplaceFullPath":
        return f.string(obj.get("replaceFullPath"), f"{path}.replaceFullPath"), None
    if kind == "ReplacePrefixMatch":
        return None, f.string(
            obj.get("replacePrefixMatch"), f"{path}.replacePrefixMatch", empty=True
        )
    raise f.fail(f"{path}.type", "must be ReplaceFullPath or ReplacePrefixMatch")


def _match(f: Fields, raw: Any, path: str) -> RouteMatch:
    obj = f.mapping(raw, path, required=True)
    f.check_keys(obj, path, ("path", "headers", "queryParams", "method"))
    uri = StringMatch.segment_prefix("/")
    if obj.get("path") is not None:
        pp = f"{path}.path"
        p = f.mapping(obj["path"], pp)
        f.check_keys(p, pp, ("type", "value"))
        kind = f.string(p.get("type", "PathPrefix"), f"{pp}.type")
        value = f.string(p.get("value", "/"), f"{pp}.value")
        if kind == "Exact":
            uri = StringMatch.exact(value)
        elif kind == "PathPrefix":
            if not value.startswith("/"):
                raise f.fail(f"{pp}.value", "a PathPrefix must start with '/'")
            uri = StringMatch.segment_prefix(value)
        elif kind == "RegularExpression":
            try:
                uri = StringMatch.regex(value)
            except re.error as e:
                raise f.fail(f"{pp}.value", f"invalid regular expression: {e}") from None
        else:
            raise f.fail(f"{pp}.type", "must be Exact, PathPrefix or RegularExpression")

    def named(key: str) -> tuple[tuple[str, StringMatch], ...]:
        out = []
        for i, item in enumerate(f.seq(obj.get(key), f"{path}.{key}")):
            ip = f"{path}.{key}[{i}]"
            it = f.mapping(item, ip, required=True)
            f.check_keys(it, ip, ("type", "name", "value"))
            name = f.string(it.get("name"), f"{ip}.name")
            value = f.string(it.get("value"), f"{ip}.value", empty=True)
            kind = f.string(it.get("type", "Exact"), f"{ip}.type")
            if kind == "Exact":
                out.append((name.lower() if key == "headers" else name, StringMatch.exact(value)))
            elif kind == "RegularExpression":
                try:
                    out.append(
                        (name.lower() if key == "headers" else name, StringMatch.regex(value))
                    )
                except re.error as e:
                    raise f.fail(f"{ip}.value", f"invalid regular expression: {e}") from None
            else:
                raise f.fail(f"{ip}.type", "must be Exact or RegularExpression")
        return tuple(out)

    method = f.string(obj.get("method"), f"{path}.method", required=False)
    return RouteMatch(path, uri, method.upper(), named("headers"), named("queryParams"))


def _rule(f: Fields, raw: Any, path: str, namespace: str) -> RouteRule:
    obj = f.mapping(raw, path, required=True)
    f.check_keys(
        obj,
        path,
        ("name", "matches", "filters", "backendRefs", "timeouts", "retry"),
        unsupported=("sessionPersistence",),
    )
    matches = tuple(
        _match(f, m, f"{path}.matches[{i}]")
        for i, m in enumerate(f.seq(obj.get("matches"), f"{path}.matches"))
    ) or (RouteMatch(f"{path}.matches", StringMatch.segment_prefix("/")),)
    req = resp = HeaderOperations()
    redirect = rewrite = None
    mirrors = []
    for i, raw_f in enumerate(f.seq(obj.get("filters"), f"{path}.filters")):
        fp = f"{path}.filters[{i}]"
        flt = f.mapping(raw_f, fp, required=True)
        kind = f.string(flt.get("type"), f"{fp}.type")
        keys = {
            "RequestHeaderModifier": "requestHeaderModifier",
            "ResponseHeaderModifier": "responseHeaderModifier",
            "RequestRedirect": "requestRedirect",
            "URLRewrite": "urlRewrite",
            "RequestMirror": "requestMirror",
        }
        if kind not in keys:
            raise f.fail(
                f"{fp}.type", f"unsupported filter {kind!r} (supported: {', '.join(keys)})"
            )
        f.check_keys(flt, fp, ("type", keys[kind]))
        body_path = f"{fp}.{keys[kind]}"
        body = flt.get(keys[kind])
        if kind == "RequestHeaderModifier":
            req = _header_modifier(f, body, body_path)
        elif kind == "ResponseHeaderModifier":
            resp = _header_modifier(f, body, body_path)
        elif kind == "RequestRedirect":
            r = f.mapping(body, body_path, required=True)
            f.check_keys(r, body_path, ("scheme", "hostname", "path", "port", "statusCode"))
            full = prefix = None
            if r.get("path") is not None:
                full, prefix = _path_modifier(f, r["path"], f"{body_path}.path")
            code = f.integer(r.get("statusCode", 302), f"{body_path}.statusCode")
            if code not in (301, 302, 303, 307, 308):
                raise f.fail(f"{body_path}.statusCode", "must be 301, 302, 303, 307 or 308")
            redirect = RequestRedirect(
                f.string(r.get("scheme"), f"{body_path}.scheme", required=False),
                f.string(r.get("hostname"), f"{body_path}.hostname", required=False),
                None if r.get("port") is None else f.port(r["port"], f"{body_path}.port"),
                code,
                full,
                prefix,
            )
        elif kind == "URLRewrite":
            r = f.mapping(body, body_path, required=True)
            f.check_keys(r, body_path, ("hostname", "path"))
            full = prefix = None
            if r.get("path") is not None:
                full, prefix = _path_modifier(f, r["path"], f"{body_path}.path")
            rewrite = UrlRewrite(
                f.string(r.get("hostname"), f"{body_path}.hostname", required=False), full, prefix
            )
        else:
            r = f.mapping(body, body_path, required=True)
            f.check_keys(r, body_path, ("backendRef", "percent", "fraction"))
            pct = 100.0
            if r.get("percent") is not None:
                pct = float(f.integer(r["percent"], f"{body_path}.percent", 0, 100))
            elif r.get("fraction") is not None:
                fr = f.mapping(r["fraction"], f"{body_path}.fraction")
                num = f.integer(fr.get("numerator"), f"{body_path}.fraction.numerator", 0)
                den = f.integer(fr.get("denominator", 100), f"{body_path}.fraction.denominator", 1)
                if num > den:
                    raise f.fail(f"{body_path}.fraction", "numerator must not exceed denominator")
                pct = 100.0 * num / den
            mirrors.append(
                RequestMirror(
                    _backend(f, r.get("backendRef"), f"{body_path}.backendRef", namespace, True),
                    pct,
                )
            )
    if redirect is not None and rewrite is not None:
        raise f.fail(f"{path}.filters", "RequestRedirect and URLRewrite cannot be combined")
    backends = tuple(
        _backend(f, b, f"{path}.backendRefs[{i}]", namespace)
        for i, b in enumerate(f.seq(obj.get("backendRefs"), f"{path}.backendRefs"))
    )
    if redirect is not None and backends:
        raise f.fail(f"{path}.backendRefs", "a rule with RequestRedirect cannot have backendRefs")
    timeout = backend_timeout = None
    if obj.get("timeouts") is not None:
        tp = f"{path}.timeouts"
        t = f.mapping(obj["timeouts"], tp)
        f.check_keys(t, tp, ("request", "backendRequest"))
        timeout = f.opt_duration(t.get("request"), f"{tp}.request")
        backend_timeout = f.opt_duration(t.get("backendRequest"), f"{tp}.backendRequest")
        if timeout and backend_timeout and backend_timeout > timeout:
            raise f.fail(f"{tp}.backendRequest", "must not be longer than timeouts.request")
    attempts = None
    codes: tuple[int, ...] = ()
    if obj.get("retry") is not None:
        rp = f"{path}.retry"
        r = f.mapping(obj["retry"], rp)
        f.check_keys(r, rp, ("attempts", "codes"), unsupported=("backoff",))
        attempts = f.integer(r.get("attempts", 2), f"{rp}.attempts", 0)
        codes = tuple(
            f.integer(c, f"{rp}.codes[{i}]", 400, 599)
            for i, c in enumerate(f.seq(r.get("codes"), f"{rp}.codes"))
        )
    return RouteRule(
        path,
        f.string(obj.get("name"), f"{path}.name", required=False),
        matches,
        backends,
        req,
        resp,
        redirect,
        rewrite,
        tuple(mirrors),
        timeout,
        backend_timeout,
        attempts,
        codes,
    )


def parse_http_route(f: Fields, meta: ResourceMeta) -> GatewayHTTPRoute:
    spec = f.mapping(f.doc.obj.get("spec"), "spec", required=True)
    f.check_keys(spec, "spec", ("parentRefs", "hostnames", "rules"))
    parents = []
    for i, raw in enumerate(f.seq(spec.get("parentRefs"), "spec.parentRefs")):
        pp = f"spec.parentRefs[{i}]"
        p = f.mapping(raw, pp, required=True)
        f.check_keys(p, pp, ("group", "kind", "name", "namespace", "port", "sectionName"))
        parents.append(
            ParentRef(
                f.string(
                    p.get("group", "gateway.networking.k8s.io"), f"{pp}.group", required=False
                ),
                f.string(p.get("kind", "Gateway"), f"{pp}.kind"),
                f.string(p.get("name"), f"{pp}.name"),
                f.string(p.get("namespace", meta.namespace), f"{pp}.namespace"),
                None if p.get("port") is None else f.port(p["port"], f"{pp}.port"),
                f.string(p.get("sectionName"), f"{pp}.sectionName", required=False),
            )
        )
    if not parents:
        raise f.fail("spec.parentRefs", "an HTTPRoute needs at least one parentRef")
    rules = tuple(
        _rule(f, r, f"spec.rules[{i}]", meta.namespace)
        for i, r in enumerate(f.seq(spec.get("rules"), "spec.rules"))
    ) or (
        RouteRule(
            "spec.rules", matches=(RouteMatch("spec.rules", StringMatch.segment_prefix("/")),)
        ),
    )
    return GatewayHTTPRoute(
        meta, tuple(parents), f.strings(spec.get("hostnames"), "spec.hostnames"), rules
    )


def parse_gateway(f: Fields, meta: ResourceMeta) -> Gateway:
    spec = f.mapping(f.doc.obj.get("spec"), "spec", required=True)
    f.check_keys(spec, "spec", ("gatewayClassName", "listeners", "addresses", "infrastructure"))
    listeners = []
    for i, raw in enumerate(f.seq(spec.get("listeners"), "spec.listeners")):
        lp = f"spec.listeners[{i}]"
        lst = f.mapping(raw, lp, required=True)
        f.check_keys(lst, lp, ("name", "port", "protocol", "hostname", "allowedRoutes", "tls"))
        allowed_from, selector = _allowed_namespaces(f, lst.get("allowedRoutes"), lp)
        listeners.append(
            Listener(
                f.string(lst.get("name"), f"{lp}.name"),
                f.port(lst.get("port"), f"{lp}.port"),
                f.string(lst.get("protocol"), f"{lp}.protocol"),
                f.string(lst.get("hostname"), f"{lp}.hostname", required=False),
                allowed_from,
                selector,
            )
        )
    return Gateway(
        meta, f.string(spec.get("gatewayClassName"), "spec.gatewayClassName"), tuple(listeners)
    )


def _allowed_namespaces(
    f: Fields, raw: Any, listener_path: str
) -> tuple[str, tuple[tuple[str, str], ...]]:
    """`allowedRoutes.namespaces`: (from, selector matchLabels); `from` defaults to Same."""
    ap = f"{listener_path}.allowedRoutes"
    allowed = f.mapping(raw, ap)
    np = f"{ap}.namespaces"
    ns = f.mapping(allowed.get("namespaces"), np)
    frm = f.string(ns.get("from", "Same"), f"{np}.from")
    if frm not in ("Same", "All", "Selector"):
        raise f.fail(f"{np}.from", f"must be Same, All or Selector, got {frm!r}")
    sel = f.mapping(ns.get("selector"), f"{np}.selector")
    if sel.get("matchExpressions"):
        f.warn(
            f"{np}.selector.matchExpressions",
            "not supported: only matchLabels selects namespaces",
            "unsupported-field",
        )
    labels = f.string_map(sel.get("matchLabels"), f"{np}.selector.matchLabels")
    return frm, tuple(sorted(labels.items()))


def parse_reference_grant(f: Fields, meta: ResourceMeta) -> ReferenceGrant:
    spec = f.mapping(f.doc.obj.get("spec"), "spec", required=True)
    f.check_keys(spec, "spec", ("from", "to"))

    def entries(key: str, third: str) -> tuple[tuple[str, str, str], ...]:
        out = []
        for i, raw in enumerate(f.seq(spec.get(key), f"spec.{key}")):
            ep = f"spec.{key}[{i}]"
            e = f.mapping(raw, ep, required=True)
            f.check_keys(e, ep, ("group", "kind", third))
            out.append(
                (
                    f.string(e.get("group", ""), f"{ep}.group", required=False),
                    f.string(e.get("kind"), f"{ep}.kind"),
                    f.string(e.get(third), f"{ep}.{third}", required=third == "namespace"),
                )
            )
        return tuple(out)

    return ReferenceGrant(meta, entries("from", "namespace"), entries("to", "name"))
