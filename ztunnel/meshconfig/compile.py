"""Compilation: the parsed configuration, the services a proxy serves and the proxy's
namespace in; one `RouteTable` out, with every choice it made as `Decision`s.

For each served service the route list follows what Istio builds for a waypoint
(istio/istio pilot/pkg/networking/core/listener_waypoint.go): the VirtualServices in the
waypoint's or the service's namespace whose hosts cover the service (visible to the waypoint's
namespace, bound to `mesh`), oldest first, their HTTP rules concatenated (several
VirtualServices for one host are merged and reported, as for gateways); each rule's matches
in order, first match wins, and nothing after a catch-all is reachable; delegate
VirtualServices merged into their root rules (virtualservice.go `MergeHTTPRoutes`).
Gateway API `HTTPRoute`s attached to the Service are ordered by the Gateway API's precedence
(exact path, longest prefix, method, most headers, most query params, oldest route). A
service with neither gets one default route to itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from ztunnel.meshconfig.destinations import DestinationRules, EffectivePolicy
from ztunnel.meshconfig.gateway import BackendRef, GatewayHTTPRoute, RouteMatch, RouteRule
from ztunnel.meshconfig.hosts import host_matches, resolve_host
from ztunnel.meshconfig.load import ConfigSet, by_order
from ztunnel.meshconfig.match import MatchKind, StringMatch
from ztunnel.meshconfig.networking import (
    DEFAULT_RETRIABLE_CODES,
    DEFAULT_RETRY,
    DEFAULT_RETRY_ON,
    CorsPolicy,
    Destination,
    DirectResponse,
    HeaderOperations,
    Headers,
    HTTPFault,
    HTTPMatchRequest,
    HTTPRetry,
    HTTPRoute,
    VirtualService,
)
from ztunnel.meshconfig.resource import Decision, ResourceMeta


@dataclass(frozen=True, slots=True)
class ServiceRef:
    """A service as compilation needs it (from the mesh state or a Kubernetes Service)."""

    hostname: str
    namespace: str
    name: str
    ports: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class RuleOrigin:
    resource: str  # "VirtualService shop/reviews"
    path: str  # "spec.http[1]"
    file: str = ""
    line: int = 0

    def __str__(self) -> str:
        return f"{self.resource} {self.path}"


@dataclass(frozen=True, slots=True)
class RequestMatch:
    """One match condition, protocol-neutral (VirtualService or HTTPRoute)."""

    path: str  # field path
    uri: StringMatch | None = None
    method: StringMatch | None = None
    authority: StringMatch | None = None
    scheme: StringMatch | None = None
    headers: tuple[tuple[str, StringMatch], ...] = ()
    without_headers: tuple[tuple[str, StringMatch], ...] = ()
    query: tuple[tuple[str, StringMatch], ...] = ()
    port: int | None = None
    source_labels: tuple[tuple[str, str], ...] = ()
    source_namespace: str = ""

    def covers(self, other: RequestMatch) -> bool:
        """Every request `other` matches is matched by this one too (conservative)."""

        def one(a: StringMatch | None, b: StringMatch | None) -> bool:
            return a is None or (b is not None and a.covers(b))

        def named(
            a: tuple[tuple[str, StringMatch], ...], b: tuple[tuple[str, StringMatch], ...]
        ) -> bool:
            theirs = dict(b)
            return all(k in theirs and m.covers(theirs[k]) for k, m in a)

        return (
            one(self.uri, other.uri)
            and one(self.method, other.method)
            and one(self.authority, other.authority)
            and one(self.scheme, other.scheme)
            and named(self.headers, other.headers)
            and set(self.without_headers) <= set(other.without_headers)
            and named(self.query, other.query)
            and (self.port is None or self.port == other.port)
            and set(self.source_labels) <= set(other.source_labels)
            and (not self.source_namespace or self.source_namespace == other.source_namespace)
        )


@dataclass(frozen=True, slots=True)
class Cluster:
    """A destination: a service host (resolved), a subset, a port (None: the request's)."""

    host: str
    subset: str = ""
    port: int | None = None
    namespace: str = ""  # the service's namespace when known
    invalid: str = ""  # why requests for it must fail (Gateway API: 500)


@dataclass(frozen=True, slots=True)
class WeightedCluster:
    cluster: Cluster
    weight: int
    headers: Headers = Headers()


@dataclass(frozen=True, slots=True)
class MirrorTarget:
    cluster: Cluster
    percentage: float


@dataclass(frozen=True, slots=True)
class Redirect:
    scheme: str = ""
    host: str = ""
    port: int | None = None
    derive_port: str = ""
    full_path: str | None = None
    prefix_path: str | None = None  # replaces the matched prefix
    code: int = 301


@dataclass(frozen=True, slots=True)
class Rewrite:
    full_path: str | None = None
    prefix_path: str | None = None  # replaces the matched prefix (VS `uri`, GW ReplacePrefixMatch)
    authority: str = ""
    regex: tuple[object, str] | None = None  # (compiled pattern, substitution)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int
    per_try_timeout: float | None
    retry_on: frozenset[str]
    codes: frozenset[int]


NO_RETRY = RetryPolicy(0, None, frozenset(), frozenset())


def retry_policy(r: HTTPRetry | None) -> RetryPolicy:
    r = DEFAULT_RETRY if r is None else r
    return RetryPolicy(
        r.attempts, r.per_try_timeout, frozenset(r.retry_on), frozenset(r.retriable_codes)
    )


@dataclass(frozen=True, slots=True)
class Route:
    """A compiled rule: what to do with a request that matched one of its entries."""

    name: str
    origin: RuleOrigin
    clusters: tuple[WeightedCluster, ...] = ()
    redirect: Redirect | None = None
    direct_response: DirectResponse | None = None
    rewrite: Rewrite | None = None
    timeout: float | None = None  # None or 0: none
    retry: RetryPolicy = NO_RETRY
    fault: HTTPFault | None = None
    mirrors: tuple[MirrorTarget, ...] = ()
    cors: CorsPolicy | None = None
    request_headers: HeaderOperations = HeaderOperations()
    response_headers: HeaderOperations = HeaderOperations()


@dataclass(frozen=True, slots=True)
class RouteEntry:
    match: RequestMatch | None  # None: matches every request
    route: Route


@dataclass(frozen=True, slots=True)
class TcpEntry:
    port: int | None
    clusters: tuple[WeightedCluster, ...]
    origin: RuleOrigin


@dataclass(frozen=True, slots=True)
class ServiceRoutes:
    service: ServiceRef
    entries: tuple[RouteEntry, ...]
    tcp: tuple[TcpEntry, ...] = ()
    sources: tuple[str, ...] = ()  # labels of the resources the routes came from
    default: bool = False


@dataclass(frozen=True)
class RouteTable:
    """Routes per served service hostname, the DestinationRule index seen from the proxy's
    namespace, and the decisions compilation made."""

    proxy_namespace: str
    services: Mapping[str, ServiceRoutes]
    destination_rules: DestinationRules
    known: Mapping[str, ServiceRef] = field(default_factory=dict)
    decisions: tuple[Decision, ...] = ()

    def routes_for(self, hostname: str) -> ServiceRoutes | None:
        return self.services.get(hostname)

    def policy(self, cluster: Cluster, port: int | None) -> EffectivePolicy:
        svc = self.known.get(cluster.host)
        ns = cluster.namespace or (svc.namespace if svc else "")
        return self.destination_rules.effective(
            cluster.host, ns, self.proxy_namespace, cluster.subset, port
        )


# ---- compilation ---------------------------------------------------------------------------


class _Compiler:
    def __init__(self, cs: ConfigSet, known: Sequence[ServiceRef], proxy_namespace: str) -> None:
        self.cs = cs
        self.opts = cs.options
        self.proxy_ns = proxy_namespace
        self.known = {s.hostname: s for s in known}
        self.decisions: list[Decision] = []
        self.drs = DestinationRules.build(cs.destination_rules, cs.options)
        self.decisions.extend(self.drs.decisions)

    def decide(
        self, code: str, meta: ResourceMeta, path: str, message: str, related: tuple[str, ...] = ()
    ) -> None:
        line = 0
        for d in self.cs.documents:
            if d.file == meta.origin.file and d.line == meta.origin.line:
                line = d.line_of(path)
                break
        self.decisions.append(
            Decision(
                code, meta.label, path, message, meta.origin.file, line or meta.origin.line, related
            )
        )

    # ---- destinations ----

    def cluster(self, meta: ResourceMeta, dest: Destination, path: str, namespace: str) -> Cluster:
        host = resolve_host(dest.host, namespace, self.opts.domain)
        svc = self.known.get(host)
        if svc is None:
            self.decide(
                "host-not-found", meta, f"{path}.host", f"host {host} is not a known service"
            )
        else:
            if dest.port is None and len(svc.ports) > 1:
                self.decide(
                    "port-required",
                    meta,
                    path,
                    f"{host} has several ports ({', '.join(map(str, svc.ports))}): the request's "
                    "port is used; set destination.port to choose",
                )
            if dest.subset:
                rule = self.drs.lookup(host, svc.namespace, self.proxy_ns)
                if rule is None or rule.subset(dest.subset) is None:
                    self.decide(
                        "subset-not-found",
                        meta,
                        f"{path}.subset",
                        f"subset {dest.subset!r} of {host} is defined by no DestinationRule "
                        "visible here; requests to it fail with 503 (no healthy upstream)",
                    )
        return Cluster(host, dest.subset, dest.port, svc.namespace if svc else "")

    # ---- VirtualService ----

    def vs_applies(self, vs: VirtualService, svc: ServiceRef) -> bool:
        if vs.is_delegate:
            return False
        if vs.meta.namespace not in (self.proxy_ns, svc.namespace):
            return False
        if vs.gateways and "mesh" not in vs.gateways:
            return False
        if vs.export_to and not (
            "*" in vs.export_to
            or self.proxy_ns in vs.export_to
            or (self.proxy_ns == vs.meta.namespace and "." in vs.export_to)
        ):
            return False
        return any(
            host_matches(resolve_host(h, vs.meta.namespace, self.opts.domain), svc.hostname)
            for h in vs.hosts
        )

    def http_rules(self, vs: VirtualService) -> list[tuple[VirtualService, HTTPRoute]]:
        """The VS's rules with delegates merged in; each with the VS that wrote it."""
        out: list[tuple[VirtualService, HTTPRoute]] = []
        for rule in vs.http:
            if rule.delegate is None:
                out.append((vs, rule))
                continue
            ns = rule.delegate.namespace or vs.meta.namespace
            child = next(
                (
                    d
                    for d in self.cs.virtual_services
                    if d.meta.namespace == ns and d.meta.name == rule.delegate.name
                ),
                None,
            )
            if child is None or not child.is_delegate:
                what = "not found" if child is None else "has hosts (not a delegate)"
                self.decide(
                    "delegate-not-found",
                    vs.meta,
                    f"{rule.path}.delegate",
                    f"delegate VirtualService {ns}/{rule.delegate.name} {what}; rule ignored",
                )
                continue
            if child.export_to and not (
                "*" in child.export_to
                or vs.meta.namespace in child.export_to
                or (ns == vs.meta.namespace and "." in child.export_to)
            ):
                self.decide(
                    "delegate-not-exported",
                    vs.meta,
                    f"{rule.path}.delegate",
                    f"delegate {ns}/{child.meta.name} is not exported to "
                    f"{vs.meta.namespace}; rule ignored",
                )
                continue
            for sub in child.http:
                merged = _merge_delegate(rule, sub)
                if merged is None:
                    self.decide(
                        "delegate-conflict",
                        child.meta,
                        sub.path,
                        f"the matches conflict with the root rule {vs.meta.label} {rule.path}; "
                        "this rule is ignored",
                    )
                    continue
                out.append((child, merged))
        return out

    def vs_routes(
        self, vs_list: list[VirtualService], svc: ServiceRef
    ) -> tuple[list[RouteEntry], list[TcpEntry]]:
        entries: list[RouteEntry] = []
        tcp: list[TcpEntry] = []
        for vs in vs_list:
            rules = self.http_rules(vs)
            for n, (owner, rule) in enumerate(rules):
                route = self.vs_route(owner, rule)
                if not rule.match:
                    entries.append(RouteEntry(None, route))
                    for later_owner, later in rules[n + 1 :]:
                        self.decide(
                            "rule-unreachable",
                            later_owner.meta,
                            later.path,
                            f"follows the catch-all rule {rule.path} (no match): never used",
                        )
                    break
                for m in rule.match:
                    if m.source_labels:
                        self.decide(
                            "source-labels-at-waypoint",
                            owner.meta,
                            f"{m.path}.sourceLabels",
                            "Istio's waypoint drops matches with sourceLabels (istio/istio#51565); "
                            "this waypoint evaluates them against the source workload",
                        )
                    entries.append(RouteEntry(_vs_match(m), route))
            for t in vs.tcp:
                origin = RuleOrigin(vs.meta.label, t.path, vs.meta.origin.file, vs.meta.origin.line)
                clusters = tuple(
                    WeightedCluster(
                        self.cluster(
                            vs.meta,
                            d.destination,
                            f"{t.path}.route[{i}].destination",
                            vs.meta.namespace,
                        ),
                        d.weight,
                    )
                    for i, d in enumerate(t.route)
                )
                ports = [m.port for m in t.match] or [None]
                for p in ports:
                    tcp.append(TcpEntry(p, clusters, origin))
        return entries, tcp

    def vs_route(self, vs: VirtualService, rule: HTTPRoute) -> Route:
        ns = vs.meta.namespace
        clusters = tuple(
            WeightedCluster(
                self.cluster(vs.meta, d.destination, f"{rule.path}.route[{i}].destination", ns),
                d.weight,
                d.headers,
            )
            for i, d in enumerate(rule.route)
        )
        mirrors = tuple(
            MirrorTarget(
                self.cluster(vs.meta, m.destination, f"{rule.path}.mirrors[{i}].destination", ns),
                m.percentage,
            )
            for i, m in enumerate(rule.mirrors)
        )
        redirect = None
        if rule.redirect is not None:
            r = rule.redirect
            redirect = Redirect(
                r.scheme, r.authority, r.port, r.derive_port, r.uri or None, None, r.code
            )
        rewrite = None
        if rule.rewrite is not None:
            w = rule.rewrite
            rewrite = Rewrite(None, w.uri, w.authority, w.uri_regex)
        return Route(
            name=rule.name,
            origin=RuleOrigin(vs.meta.label, rule.path, vs.meta.origin.file, vs.meta.origin.line),
            clusters=clusters,
            redirect=redirect,
            direct_response=rule.direct_response,
            rewrite=rewrite,
            timeout=rule.timeout or None,
            retry=retry_policy(rule.retries),
            fault=rule.fault,
            mirrors=mirrors,
            cors=rule.cors,
            request_headers=rule.headers.request,
            response_headers=rule.headers.response,
        )

    # ---- HTTPRoute ----

    def gw_backend(self, route: GatewayHTTPRoute, b: BackendRef, path: str) -> Cluster:
        host = f"{b.name}.{b.namespace}.svc.{self.opts.domain}"
        invalid = ""
        if b.namespace != route.meta.namespace and not any(
            g.meta.namespace == b.namespace
            and g.allows("HTTPRoute", route.meta.namespace, "Service", b.name)
            for g in self.cs.reference_grants
        ):
            invalid = (
                f"no ReferenceGrant in {b.namespace} allows HTTPRoutes from {route.meta.namespace}"
            )
            self.decide("backend-not-permitted", route.meta, path, invalid)
        elif host not in self.known:
            invalid = f"backend service {b.namespace}/{b.name} not found"
            self.decide("host-not-found", route.meta, path, invalid)
        return Cluster(host, "", b.port, b.namespace, invalid)

    def gw_entries(self, routes: list[GatewayHTTPRoute], svc: ServiceRef) -> list[RouteEntry]:
        keyed: list[tuple[tuple[object, ...], RouteEntry]] = []
        for rank, route in enumerate(by_order(routes, lambda r: r.meta)):
            ports = [
                p.port
                for p in route.parents
                if p.is_service and p.name == svc.name and p.namespace == svc.namespace
            ]
            for ri, rule in enumerate(route.rules):
                compiled = self.gw_route(route, rule)
                for mi, m in enumerate(rule.matches):
                    for port in ports:
                        rm = _gw_match(m, port)
                        keyed.append(((*_gw_precedence(m), rank, ri, mi), RouteEntry(rm, compiled)))
        keyed.sort(key=lambda kv: kv[0])
        return [e for _, e in keyed]

    def gw_route(self, route: GatewayHTTPRoute, rule: RouteRule) -> Route:
        clusters = tuple(
            WeightedCluster(self.gw_backend(route, b, f"{rule.path}.backendRefs[{i}]"), b.weight)
            for i, b in enumerate(rule.backends)
        )
        mirrors = tuple(
            MirrorTarget(self.gw_backend(route, m.backend, f"{rule.path}.filters"), m.percent)
            for m in rule.mirrors
        )
        direct = None
        if rule.redirect is None and (not clusters or sum(c.weight for c in clusters) == 0):
            direct = DirectResponse(500, b"no backend for this route\n")
        redirect = None
        if rule.redirect is not None:
            r = rule.redirect
            redirect = Redirect(
                r.scheme, r.hostname, r.port, "", r.full_path, r.prefix_path, r.status_code
            )
        rewrite = None
        if rule.rewrite is not None:
            rewrite = Rewrite(
                rule.rewrite.full_path, rule.rewrite.prefix_path, rule.rewrite.hostname
            )
        if rule.retry_attempts is not None:
            retry = RetryPolicy(
                rule.retry_attempts,
                rule.backend_timeout,
                frozenset({"retriable-status-codes", "connect-failure", "refused-stream"}),
                frozenset(rule.retry_codes or DEFAULT_RETRIABLE_CODES),
            )
        else:
            retry = RetryPolicy(
                DEFAULT_RETRY.attempts,
                rule.backend_timeout,
                frozenset(DEFAULT_RETRY_ON),
                frozenset(DEFAULT_RETRIABLE_CODES),
            )
        return Route(
            name=rule.name,
            origin=RuleOrigin(
                route.meta.label, rule.path, route.meta.origin.file, route.meta.origin.line
            ),
            clusters=clusters,
            redirect=redirect,
            direct_response=direct,
            rewrite=rewrite,
            timeout=rule.timeout or None,
            retry=retry,
            mirrors=mirrors,
            request_headers=rule.request_headers,
            response_headers=rule.response_headers,
        )

    # ---- per service ----

    def service(self, svc: ServiceRef) -> ServiceRoutes:
        vss = [
            vs
            for vs in by_order(self.cs.virtual_services, lambda v: v.meta)
            if self.vs_applies(vs, svc)
        ]
        for vs in self.cs.virtual_services:
            if (
                not vs.is_delegate
                and vs not in vss
                and vs.meta.namespace not in (self.proxy_ns, svc.namespace)
                and any(
                    host_matches(resolve_host(h, vs.meta.namespace, self.opts.domain), svc.hostname)
                    for h in vs.hosts
                )
            ):
                self.decide(
                    "vs-not-applicable",
                    vs.meta,
                    "metadata.namespace",
                    f"a waypoint only uses VirtualServices in the service's namespace "
                    f"({svc.namespace}) or its own ({self.proxy_ns}); ignored for {svc.hostname}",
                )
        gws = [
            r
            for r in self.cs.http_routes
            if r.meta.namespace in (self.proxy_ns, svc.namespace)
            and any(
                p.is_service and p.name == svc.name and p.namespace == svc.namespace
                for p in r.parents
            )
        ]
        if len(vss) > 1:
            for vs in vss[1:]:
                self.decide(
                    "vs-conflict",
                    vs.meta,
                    "spec.hosts",
                    f"{len(vss)} VirtualServices select {svc.hostname}; their rules are merged "
                    f"in creation order after those of {vss[0].meta.label} (use one VirtualService "
                    "per host, or delegates)",
                    tuple(v.meta.label for v in vss),
                )
        for vs in vss:
            self.decide("vs-selected", vs.meta, "spec.hosts", f"routes {svc.hostname}")
        entries, tcp = self.vs_routes(vss, svc)
        if gws:
            gw_entries = self.gw_entries(gws, svc)
            if vss:
                self.decide(
                    "route-mixed-kinds",
                    gws[0].meta,
                    "spec.parentRefs",
                    f"{svc.hostname} has VirtualServices and HTTPRoutes; the VirtualServices' "
                    "rules come first",
                )
            entries.extend(gw_entries)
        sources = tuple(v.meta.label for v in vss) + tuple(r.meta.label for r in gws)
        default = not entries
        if default:
            route = Route(
                "default",
                RuleOrigin("default route", svc.hostname),
                (WeightedCluster(Cluster(svc.hostname, "", None, svc.namespace), 100),),
                retry=retry_policy(None),
            )
            entries = [RouteEntry(None, route)]
        self.reachability(entries)
        return ServiceRoutes(svc, tuple(entries), tuple(tcp), sources, default)

    def reachability(self, entries: list[RouteEntry]) -> None:
        """Report matches that an earlier match always takes, and rules left with none."""
        reachable: dict[int, bool] = {}
        catch_all: RouteEntry | None = None
        for i, e in enumerate(entries):
            shadow = catch_all
            if shadow is None and e.match is not None:
                shadow = next(
                    (p for p in entries[:i] if p.match is not None and p.match.covers(e.match)),
                    None,
                )
            if shadow is not None:
                path = e.match.path if e.match is not None else e.route.origin.path
                self.decisions.append(
                    Decision(
                        "match-ineffective",
                        e.route.origin.resource,
                        path,
                        f"never used: {shadow.route.origin} matches every such request first",
                        e.route.origin.file,
                        e.route.origin.line,
                        (str(shadow.route.origin),),
                    )
                )
            reachable[id(e.route)] = reachable.get(id(e.route), False) or shadow is None
            if e.match is None and catch_all is None:
                catch_all = e
        done: set[int] = set()
        for e in entries:
            if id(e.route) in done:
                continue
            done.add(id(e.route))
            if not reachable[id(e.route)]:
                self.decisions.append(
                    Decision(
                        "rule-unreachable",
                        e.route.origin.resource,
                        e.route.origin.path,
                        "no request can reach this rule: earlier rules match all of its requests",
                        e.route.origin.file,
                        e.route.origin.line,
                    )
                )


def _vs_match(m: HTTPMatchRequest) -> RequestMatch:
    return RequestMatch(
        path=m.path,
        uri=m.uri,
        method=m.method,
        authority=m.authority,
        scheme=m.scheme,
        headers=m.headers,
        without_headers=m.without_headers,
        query=m.query_params,
        port=m.port,
        source_labels=m.source_labels,
        source_namespace=m.source_namespace,
    )


def _gw_match(m: RouteMatch, port: int | None) -> RequestMatch:
    return RequestMatch(
        path=m.path,
        uri=m.uri,
        method=StringMatch.exact(m.method) if m.method else None,
        headers=m.headers,
        query=m.query_params,
        port=port,
    )


def _gw_precedence(m: RouteMatch) -> tuple[object, ...]:
    """Gateway API rule precedence: Exact path, then the longest prefix, then regex; then a
    method match, more header matches, more query matches (smaller sorts first)."""
    uri = m.uri
    if uri is None:
        kind, length = 1, 0
    elif uri.kind is MatchKind.EXACT:
        kind, length = 0, len(uri.value)
    elif uri.kind is MatchKind.REGEX:
        kind, length = 2, len(uri.value)
    else:
        kind, length = 1, len(uri.value)
    return (kind, -length, 0 if m.method else 1, -len(m.headers), -len(m.query_params))


def _string_conflict(root: StringMatch | None, leaf: StringMatch | None) -> bool:
    """virtualservice.go `stringMatchConflict`: a delegate match must stay inside the root's."""
    if root is None or leaf is None:
        return False
    if root.kind is MatchKind.REGEX or leaf.kind is MatchKind.REGEX:
        return True
    if root.kind is MatchKind.EXACT:
        return leaf.kind is not MatchKind.EXACT or leaf.value != root.value
    if root.kind is MatchKind.PREFIX:
        return not leaf.value.startswith(root.value)
    return True


def _merge_match(root: HTTPMatchRequest, leaf: HTTPMatchRequest) -> HTTPMatchRequest | None:
    for a, b in (
        (root.uri, leaf.uri),
        (root.scheme, leaf.scheme),
        (root.method, leaf.method),
        (root.authority, leaf.authority),
    ):
        if _string_conflict(a, b):
            return None
    rh = dict(root.headers)
    if any(_string_conflict(rh.get(k), v) for k, v in leaf.headers):
        return None
    rq = dict(root.query_params)
    if any(_string_conflict(rq.get(k), v) for k, v in leaf.query_params):
        return None
    if root.ignore_uri_case != leaf.ignore_uri_case:
        return None
    if root.port and leaf.port and root.port != leaf.port:
        return None
    if root.source_namespace and leaf.source_namespace != root.source_namespace:
        return None
    rl = dict(root.source_labels)
    if any(k in rl and rl[k] != v for k, v in leaf.source_labels):
        return None
    return replace(
        leaf,
        name=f"{root.name}-{leaf.name}" if root.name and leaf.name else (leaf.name or root.name),
        uri=leaf.uri or root.uri,
        scheme=leaf.scheme or root.scheme,
        method=leaf.method or root.method,
        authority=leaf.authority or root.authority,
        headers=tuple({**dict(root.headers), **dict(leaf.headers)}.items()),
        without_headers=tuple({**dict(root.without_headers), **dict(leaf.without_headers)}.items()),
        query_params=tuple({**dict(root.query_params), **dict(leaf.query_params)}.items()),
        port=leaf.port or root.port,
        source_labels=tuple(sorted({**rl, **dict(leaf.source_labels)}.items())),
        source_namespace=leaf.source_namespace or root.source_namespace,
    )


def _merge_delegate(root: HTTPRoute, leaf: HTTPRoute) -> HTTPRoute | None:
    """`mergeHTTPRoute`: each delegate match must fit inside some root match; unset fields of
    the delegate rule are taken from the root rule."""
    matches: tuple[HTTPMatchRequest, ...]
    if not root.match:
        matches = leaf.match
    elif not leaf.match:
        matches = root.match
    else:
        merged: list[HTTPMatchRequest] = []
        for sub in leaf.match:
            found = [m for r in root.match if (m := _merge_match(r, sub)) is not None]
            if not found:
                return None
            merged.extend(found)
        matches = tuple(merged)
    return replace(
        leaf,
        name=f"{root.name}-{leaf.name}" if root.name and leaf.name else (leaf.name or root.name),
        match=matches,
        rewrite=leaf.rewrite or root.rewrite,
        direct_response=leaf.direct_response or root.direct_response,
        timeout=leaf.timeout if leaf.timeout is not None else root.timeout,
        retries=leaf.retries or root.retries,
        fault=leaf.fault or root.fault,
        mirrors=leaf.mirrors or root.mirrors,
        cors=leaf.cors or root.cors,
        headers=leaf.headers if (leaf.headers.request or leaf.headers.response) else root.headers,
    )


def compile_routes(
    cs: ConfigSet,
    served: Iterable[ServiceRef],
    known: Sequence[ServiceRef],
    proxy_namespace: str,
) -> RouteTable:
    """The route table of a proxy in `proxy_namespace` serving `served`; `known` lists every
    service of the mesh (destinations are checked against it)."""
    c = _Compiler(cs, list(known) + [s for s in served if s not in known], proxy_namespace)
    services = {svc.hostname: c.service(svc) for svc in served}
    return RouteTable(proxy_namespace, services, c.drs, dict(c.known), tuple(c.decisions))
