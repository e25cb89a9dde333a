"""VirtualService analyzers, as istioctl's (istio/istio pkg/config/analysis/analyzers/
virtualservice: conflictingmeshgatewayhosts.go, destinationhosts.go, destinationrules.go,
gateways.go; the unreachable-rule checks of pkg/config/validation/validation.go
`analyzeUnreachableHTTPRules` that istioctl reports through its schema analyzer).

Field lines follow istioctl's path templates (util/find_errorline_utils.go), including its
`mirrors` template, which names `mirrors[j].host` instead of `mirrors[j].destination.host` and
so never finds a line: such messages point at the document, as istioctl's do."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

from ztunnel.analyze import messages as msg
from ztunnel.analyze import registry
from ztunnel.analyze.context import Analyzer, Context
from ztunnel.analyze.messages import go_quote
from ztunnel.meshconfig.match import MatchKind, StringMatch
from ztunnel.meshconfig.networking import Destination, HTTPMatchRequest, VirtualService
from ztunnel.meshconfig.source import PathKey

MESH = "mesh"


@dataclass(frozen=True, slots=True)
class _Dest:
    """`AnnotatedDestination`: a destination with the path istioctl uses for its line."""

    destination: Destination
    rule: str  # "http", "tcp", "http.mirror", "http.mirrors"
    rule_index: int
    index: int

    @property
    def line_path(self) -> PathKey:
        if self.rule == "http.mirror":
            return ("spec", "http", self.rule_index, "mirror", "host")
        if self.rule == "http.mirrors":
            return ("spec", "http", self.rule_index, "mirrors", self.index, "host")
        return ("spec", self.rule, self.rule_index, "route", self.index, "destination", "host")


def _route_destinations(vs: VirtualService) -> Iterator[_Dest]:
    """`getRouteDestinations`: tcp, then http (TLS routes are not modelled)."""
    for i, t in enumerate(vs.tcp):
        for j, rd in enumerate(t.route):
            yield _Dest(rd.destination, "tcp", i, j)
    for i, h in enumerate(vs.http):
        for j, rd in enumerate(h.route):
            yield _Dest(rd.destination, "http", i, j)


def _mirror_destinations(vs: VirtualService) -> Iterator[_Dest]:
    """`getHTTPMirrorDestinations`: `mirror` or each of `mirrors`."""
    raw_http = (vs.raw or {}).get("http") or []
    for i, h in enumerate(vs.http):
        single = i < len(raw_http) and isinstance(raw_http[i], dict) and "mirror" in raw_http[i]
        for j, m in enumerate(h.mirrors):
            yield _Dest(m.destination, "http.mirror" if single else "http.mirrors", i, j)


def _mesh_bound(vs: VirtualService) -> bool:
    return not vs.gateways or MESH in vs.gateways


# ---- IST0109 --------------------------------------------------------------------------------


def conflicting_mesh_gateway_hosts(ctx: Context) -> None:
    hosts: dict[tuple[str, str], list[VirtualService]] = {}
    for vs in ctx.cs.virtual_services:
        if not _mesh_bound(vs):
            continue
        ns = vs.meta.namespace
        if not vs.export_to or registry.ALL in vs.export_to:
            scopes = [registry.ALL]
        else:
            scopes = list(dict.fromkeys(ns if e == registry.LOCAL else e for e in vs.export_to))
        for scope in scopes:
            for h in vs.hosts:
                group = hosts.setdefault(registry.scoped(scope, ns, h, ctx.domain), [])
                # istioctl lists a VirtualService twice when two of its hosts name one FQDN
                # (`reviews` and `reviews.shop.svc.cluster.local`) and reports it as conflicting
                # with itself (istio/istio#42561); it is listed once here.
                if all(v is not vs for v in group):
                    group.append(vs)
    reported: set[tuple[str, str]] = set()
    # istioctl walks a Go map (random order); a VirtualService in several conflicts is reported
    # once, for the first conflict met. Here: in the order the hosts were first written.
    for (scope, fqdn), vs_list in hosts.items():
        group = list(vs_list)
        if scope != registry.ALL:
            for (other_scope, other), more in hosts.items():
                if other_scope == registry.ALL and registry.names_overlap(fqdn, other):
                    group.extend(v for v in more if all(v is not g for g in group))
        if len(group) < 2:
            continue
        names = ",".join(sorted(f"{v.meta.namespace}/{v.meta.name}" for v in group))
        for vs in group:
            key = (vs.meta.namespace, vs.meta.name)
            if key in reported:
                continue
            reported.add(key)
            ctx.report(
                msg.ConflictingMeshGatewayVirtualServiceHosts,
                vs.meta,
                names,
                f"{scope}/{fqdn}",
                at=("metadata", "name"),
            )


# ---- IST0101 host, IST0112 ------------------------------------------------------------------


def destination_hosts(ctx: Context) -> None:
    services = registry.build(ctx)
    _ingress_subsets(ctx)
    for vs in ctx.cs.virtual_services:
        ns = vs.meta.namespace
        for kind, dests in (
            ("host", _route_destinations(vs)),
            ("mirror host", _mirror_destinations(vs)),
        ):
            for d in dests:
                host = d.destination.host
                entry = registry.lookup(services, ns, vs.export_to, host, ctx.domain)
                if entry is None:
                    ctx.report(msg.ReferencedResourceNotFound, vs.meta, kind, host, at=d.line_path)
                    continue
                port = d.destination.port
                if port is None:
                    if len(entry.ports) > 1:
                        ctx.report(
                            msg.VirtualServiceDestinationPortSelectorRequired,
                            vs.meta,
                            host,
                            list(entry.ports),
                            at=d.line_path,
                        )
                elif port not in entry.ports:
                    ctx.report(
                        msg.ReferencedResourceNotFound,
                        vs.meta,
                        "host:port",
                        f"{host}:{port}",
                        at=d.line_path,
                    )


def _ingress_subsets(ctx: Context) -> None:
    """IST0140 (`analyzeSubset`): a gateway-bound rule routes to a host without a subset
    while some VirtualService for that host splits it by subset: gateways ignore that split.
    istioctl's line template for it names the rule's name, not `http`: it never finds a line.
    """
    with_subsets: list[tuple[VirtualService, str]] = []
    for vs in ctx.cs.virtual_services:
        for rule in vs.http:
            for rd in rule.route:
                if rd.destination.subset and rd.destination.host in vs.hosts:
                    with_subsets.append((vs, rd.destination.host))
    for vs in ctx.cs.virtual_services:
        if not vs.gateways:
            continue
        for rule in vs.http:
            for rd in rule.route:
                if rd.destination.subset:
                    continue
                for other, host in with_subsets:
                    if host == rd.destination.host:
                        ctx.report(
                            msg.IngressRouteRulesNotAffected,
                            vs.meta,
                            f"{other.meta.namespace}/{other.meta.name}",
                            f"{vs.meta.namespace}/{vs.meta.name}",
                        )


# ---- IST0101 subset -------------------------------------------------------------------------


def destination_subsets(ctx: Context) -> None:
    domain = ctx.domain
    defined = {
        (registry.full_name(dr.meta.namespace, dr.host, domain), s.name)
        for dr in ctx.cs.destination_rules
        for s in dr.subsets
    }
    for vs in ctx.cs.virtual_services:
        ns = vs.meta.namespace
        for kind, dests in (
            ("host+subset in destinationrule", _route_destinations(vs)),
            ("mirror+subset in destinationrule", _mirror_destinations(vs)),
        ):
            for d in dests:
                dest = d.destination
                if not dest.subset:
                    continue
                if (registry.full_name(ns, dest.host, domain), dest.subset) not in defined:
                    ctx.report(
                        msg.ReferencedResourceNotFound,
                        vs.meta,
                        kind,
                        f"{dest.host}+{dest.subset}",
                        at=d.line_path,
                    )


# ---- IST0101 gateway, IST0132 ---------------------------------------------------------------


def _istio_gateway_hosts(ctx: Context, namespace: str, name: str, vs_namespace: str) -> list[str]:
    """The servers' hosts with `./` and `*/` resolved (`sanitizeServerHostNamespace`), then
    those visible to the VirtualService's namespace (`host.NamesForNamespace`)."""
    hosts: list[str] = []
    for gw in ctx.cs.istio_gateways:
        if (gw.meta.namespace, gw.meta.name) != (namespace, name):
            continue
        for server in gw.servers:
            sh: list[str] = []
            for h in server.hosts:
                scope, slash, rest = h.partition("/")
                if slash and scope == ".":
                    sh.append(f"{namespace}/{rest}")
                elif slash and scope == "*":
                    if rest == "*":
                        sh = ["*"]
                        break
                    sh.append(rest)
                else:
                    sh.append(h)
            hosts.extend(sh)
    out = []
    for h in hosts:
        scope, slash, rest = h.partition("/")
        if slash:
            if scope not in (vs_namespace, "*"):
                continue
            h = rest
        out.append(h)
    return out


def gateways(ctx: Context) -> None:
    for vs in ctx.cs.virtual_services:
        ns = vs.meta.namespace
        for i, name in enumerate(vs.gateways):
            if name == MESH:
                continue
            gw_ns, slash, gw_name = name.partition("/")
            if not slash:
                gw_ns, gw_name = ns, name
            istio = any(
                (g.meta.namespace, g.meta.name) == (gw_ns, gw_name) for g in ctx.cs.istio_gateways
            )
            kube = ctx.cs.gateway(gw_ns, gw_name) if not istio else None
            at: PathKey = ("spec", "gateways", i)
            if not istio and kube is None:
                ctx.report(msg.ReferencedResourceNotFound, vs.meta, "gateway", name, at=at)
            # As istioctl: a missing gateway also has none of the hosts (both are reported).
            if kube is not None:
                listeners = [lst.hostname for lst in kube.listeners]
                matched = any(not h for h in listeners) or any(
                    registry.names_overlap(g, h) for g in listeners for h in vs.hosts
                )
            else:
                gw_hosts = _istio_gateway_hosts(ctx, gw_ns, gw_name, ns)
                matched = any(registry.names_overlap(g, h) for g in gw_hosts for h in vs.hosts)
            if not matched:
                ctx.report(
                    msg.VirtualServiceHostNotFoundInGateway,
                    vs.meta,
                    list(vs.hosts),
                    f"{ns}/{vs.meta.name}",
                    f"{gw_ns}/{gw_name}",
                    at=at,
                )


# ---- IST0130, IST0131 -----------------------------------------------------------------------


def _rule_name(name: str, index: int) -> str:
    return go_quote(name) if name else f"#{index}"


def _match_key(m: HTTPMatchRequest) -> object:
    """A match without its name, for equality (`asJSON`: maps are compared unordered)."""
    return replace(
        m,
        path="",
        name="",
        headers=tuple(sorted(m.headers, key=lambda kv: kv[0])),
        without_headers=tuple(sorted(m.without_headers, key=lambda kv: kv[0])),
        query_params=tuple(sorted(m.query_params, key=lambda kv: kv[0])),
    )


def _exact_or_prefix(sm: StringMatch | None) -> str:
    """`assignExactOrPrefix`: `exact:v`, `prefix:v`, or "" for anything else."""
    if sm is not None and sm.value and sm.kind is MatchKind.EXACT:
        return f"exact:{sm.value}"
    if sm is not None and sm.value and sm.kind is MatchKind.PREFIX:
        return f"prefix:{sm.value}"
    return ""


@dataclass(frozen=True, slots=True)
class _PrefixMatch:
    """`OverlappingMatchValidationForHTTPRoute`."""

    route: str
    match: str
    prefix: str
    port: int
    method: str
    authority: str
    headers: dict[str, str]
    query: dict[str, str]
    without: dict[str, str]


def _prefix_match(route: str, m: HTTPMatchRequest, index: int) -> _PrefixMatch | None:
    """`genMatchHTTPRoutes`: only matches on a URI prefix take part; no method means GET."""
    if m.uri is None or m.uri.kind is not MatchKind.PREFIX or not m.uri.value:
        return None
    return _PrefixMatch(
        route,
        _rule_name(m.name, index),
        m.uri.value,
        m.port or 0,
        _exact_or_prefix(m.method) or "exact:GET",
        _exact_or_prefix(m.authority),
        {k: _exact_or_prefix(v) for k, v in m.headers},
        {k: _exact_or_prefix(v) for k, v in m.query_params},
        {k: _exact_or_prefix(v) for k, v in m.without_headers},
    )


def _covers(a: _PrefixMatch, b: _PrefixMatch) -> bool:
    """`coveredValidation`: does the earlier prefix match `a` take every request of `b`?"""
    if not b.prefix.startswith(a.prefix) or a.port != b.port:
        return False

    def value(x: str, y: str) -> bool:
        return x == y or x.startswith(y)

    if not value(a.method, b.method) or not value(a.authority, b.authority):
        return False
    for mine, theirs in ((a.headers, b.headers), (a.query, b.query), (a.without, b.without)):
        if len(mine) != len(theirs):
            return False
        for k, v in mine.items():
            if k not in theirs or not value(v, theirs[k]):
                return False
    return True


def unreachable_rules(ctx: Context) -> None:
    for vs in ctx.cs.virtual_services:
        _http_unreachable(ctx, vs)
        _tcp_unreachable(ctx, vs)


def _http_unreachable(ctx: Context, vs: VirtualService) -> None:
    def unused(rule: str, reason: str) -> None:
        ctx.report(msg.VirtualServiceUnreachableRule, vs.meta, rule, reason)

    def ineffective(rule: str, match: str, dup: str) -> None:
        ctx.report(msg.VirtualServiceIneffectiveMatch, vs.meta, rule, match, dup)

    seen: dict[object, int] = {}
    catch_all = -1
    prefixes: list[_PrefixMatch] = []
    for n, rule in enumerate(vs.http):
        name = _rule_name(rule.name, n)
        if not rule.match:
            if catch_all >= 0:
                unused(name, "only the last rule can have no matches")
            catch_all = n
            continue
        duplicates = 0
        for k, m in enumerate(rule.match):
            if catch_all >= 0:
                unused(name, "route without matches defined before")
                continue
            key = _match_key(m)
            if key in seen:
                dup = seen[key]
                ineffective(name, _rule_name(m.name, k), _rule_name(vs.http[dup].name, dup))
                duplicates += 1
                continue
            seen[key] = n
            pm = _prefix_match(name, m, k)
            if pm is not None:
                prefixes.append(pm)
        if duplicates == len(rule.match):
            unused(name, "all matches used by prior rules")
    for i, a in enumerate(prefixes):
        for b in prefixes[i + 1 :]:
            if b.prefix != a.prefix and _covers(a, b):
                ineffective(
                    b.route,
                    f"{b.match} of prefix {b.prefix}",
                    f"{a.match} of prefix {a.prefix} on {a.route}",
                )


def _tcp_unreachable(ctx: Context, vs: VirtualService) -> None:
    seen: dict[object, int] = {}
    catch_all = -1
    for n, rule in enumerate(vs.tcp):
        name = f"#{n}"
        if not rule.match:
            if catch_all >= 0:
                ctx.report(
                    msg.VirtualServiceUnreachableRule,
                    vs.meta,
                    name,
                    "only the last rule can have no matches",
                )
            catch_all = n
            continue
        duplicates = 0
        for k, m in enumerate(rule.match):
            if catch_all >= 0:
                ctx.report(
                    msg.VirtualServiceUnreachableRule,
                    vs.meta,
                    name,
                    "route without matches defined before",
                )
                continue
            if m in seen:
                ctx.report(
                    msg.VirtualServiceIneffectiveMatch, vs.meta, name, f"#{k}", f"#{seen[m]}"
                )
                duplicates += 1
            else:
                seen[m] = n
        if duplicates == len(rule.match):
            ctx.report(
                msg.VirtualServiceUnreachableRule, vs.meta, name, "all matches used by prior rules"
            )


ANALYZERS = (
    Analyzer(
        "virtualservice.ConflictingMeshGatewayHostsAnalyzer",
        "Checks if multiple virtual services associated with the mesh gateway have "
        "conflicting hosts",
        ("VirtualService",),
        conflicting_mesh_gateway_hosts,
    ),
    Analyzer(
        "virtualservice.DestinationHostAnalyzer",
        "Checks the destination hosts associated with each virtual service",
        ("ServiceEntry", "VirtualService", "Service"),
        destination_hosts,
    ),
    Analyzer(
        "virtualservice.DestinationRuleAnalyzer",
        "Checks the destination rules associated with each virtual service",
        ("VirtualService", "DestinationRule"),
        destination_subsets,
    ),
    Analyzer(
        "virtualservice.GatewayAnalyzer",
        "Checks the gateways associated with each virtual service",
        ("IstioGateway", "Gateway", "VirtualService"),
        gateways,
    ),
    Analyzer(
        "schema.ValidationAnalyzer.VirtualService",
        "Runs schema validation as an analyzer on 'VirtualService' resources",
        ("VirtualService",),
        unreachable_rules,
    ),
)
