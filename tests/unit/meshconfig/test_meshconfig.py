"""The mesh-configuration model: parsing with errors that name file, line, resource and field;
Istio's host, VirtualService, delegate and DestinationRule semantics; Gateway API ordering;
the compilation's decisions as data."""

from __future__ import annotations

import textwrap

import pytest

from ztunnel.errors import ConfigError
from ztunnel.meshconfig import (
    ConfigOptions,
    ResourceError,
    ServiceRef,
    compile_routes,
    parse_documents,
    parse_yaml,
)
from ztunnel.meshconfig.match import MatchKind
from ztunnel.meshconfig.security import waypoint_policies

pytestmark = pytest.mark.unit

REVIEWS = ServiceRef("reviews.shop.svc.cluster.local", "shop", "reviews", (9080,))
RATINGS = ServiceRef("ratings.shop.svc.cluster.local", "shop", "ratings", (9080, 9090))


def load(text: str, **opts: object):  # type: ignore[no-untyped-def]
    return parse_documents(
        parse_yaml(textwrap.dedent(text), "mesh.yaml"),
        ConfigOptions(**opts),  # type: ignore[arg-type]
    )


def table(text: str, proxy_ns: str = "shop", served=(REVIEWS,), **opts: object):  # type: ignore[no-untyped-def]
    return compile_routes(load(text, **opts), served, [REVIEWS, RATINGS], proxy_ns)


def codes(t) -> list[str]:  # type: ignore[no-untyped-def]
    return [d.code for d in t.decisions]


VS_CANARY = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - name: jason
    match:
    - headers: {end-user: {exact: jason}}
    route:
    - destination: {host: reviews, subset: v2}
  - route:
    - destination: {host: reviews, subset: v1}
      weight: 90
    - destination: {host: reviews, subset: v2}
      weight: 10
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      loadBalancer:
        consistentHash: {httpCookie: {name: user, ttl: 60s}}
"""


def test_canary_routes_resolve_short_names_and_keep_order() -> None:
    t = table(VS_CANARY)
    routes = t.routes_for(REVIEWS.hostname)
    assert routes is not None and not routes.default
    assert routes.sources == ("VirtualService shop/reviews",)
    first, second = routes.entries
    assert first.match is not None and dict(first.match.headers)["end-user"].value == "jason"
    assert [(c.cluster.host, c.cluster.subset, c.weight) for c in second.route.clusters] == [
        (REVIEWS.hostname, "v1", 90),
        (REVIEWS.hostname, "v2", 10),
    ]
    assert second.match is None
    # The mesh default retry policy applies when the rule sets none.
    assert second.route.retry.attempts == 2 and 503 in second.route.retry.codes
    assert "vs-selected" in codes(t)


def test_subset_policy_overrides_the_host_policy_field_by_field() -> None:
    t = table(VS_CANARY)
    v1 = t.destination_rules.effective(REVIEWS.hostname, "shop", "shop", "v1", 9080)
    v2 = t.destination_rules.effective(REVIEWS.hostname, "shop", "shop", "v2", 9080)
    assert v1.load_balancer.simple == "ROUND_ROBIN" and v1.subset_labels == (("version", "v1"),)
    assert v2.load_balancer.consistent_hash is not None
    assert v2.load_balancer.consistent_hash.kind == "cookie"
    assert v2.load_balancer.consistent_hash.cookie_ttl == 60.0


def test_error_names_file_line_resource_and_field() -> None:
    bad = VS_CANARY.replace("weight: 10", "weight: -3")
    with pytest.raises(ResourceError) as e:
        load(bad)
    msg = str(e.value)
    assert msg.startswith("mesh.yaml:")
    assert "VirtualService shop/reviews" in msg
    assert "spec.http[1].route[1].weight" in msg
    line = int(msg.split(":")[1])
    assert "weight: -3" in textwrap.dedent(bad).splitlines()[line - 1]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ("subset: v2}\n  - route", "spec.http[0].route[0].destination.subset"),
        ("{exact: jason}", "spec.http[0].match[0].headers.end-user"),
        ("simple: ROUND_ROBIN", "spec.trafficPolicy.loadBalancer.simple"),
        ("ttl: 60s", "spec.subsets[1].trafficPolicy.loadBalancer.consistentHash.httpCookie.ttl"),
        ("name: v1", "spec.subsets[1].name"),
    ],
)
def test_each_bad_field_is_named(change: str, field: str) -> None:
    bad = {
        "subset: v2}\n  - route": VS_CANARY.replace(
            "subset: v2}\n  - route", "subset: [v2]}\n  - route"
        ),
        "{exact: jason}": VS_CANARY.replace("{exact: jason}", "{exact: jason, prefix: j}"),
        "simple: ROUND_ROBIN": VS_CANARY.replace("simple: ROUND_ROBIN", "simple: FASTEST"),
        "ttl: 60s": VS_CANARY.replace("ttl: 60s", "ttl: sixty"),
        "name: v1": VS_CANARY.replace("name: v2\n", "name: v1\n"),
    }[change]
    with pytest.raises(ConfigError) as e:
        load(bad)
    assert field in str(e.value)


def test_unknown_field_is_an_error_and_unsupported_one_a_warning() -> None:
    with pytest.raises(ResourceError, match=r"spec\.http\[1\]\.retrys: unknown field"):
        load(
            VS_CANARY.replace(
                "  - route:\n    - destination: {host: reviews, subset: v1}",
                "  - retrys: {}\n    route:\n    - destination: {host: reviews, subset: v1}",
            )
        )
    cs = load(
        VS_CANARY.replace(
            "simple: ROUND_ROBIN", "simple: ROUND_ROBIN, localityLbSetting: {enabled: true}"
        )
    )
    assert any("localityLbSetting" in w.path for w in cs.warnings)


def test_unknown_kinds_and_local_config_are_skipped_not_errors() -> None:
    cs = load(
        """
        workloads: []
        ---
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {name: ext}
        spec: {}
        """
    )
    assert [(s.kind, s.reason) for s in cs.skipped] == [
        ("", "mesh state (local config)"),
        ("ServiceEntry", "kind not modelled"),
    ]


def test_catch_all_makes_later_rules_unreachable_and_covered_matches_ineffective() -> None:
    t = table(
        """
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: reviews, namespace: shop}
        spec:
          hosts: [reviews.shop.svc.cluster.local]
          http:
          - match: [{uri: {prefix: /api}}]
            route: [{destination: {host: reviews}}]
          - match: [{uri: {prefix: /api/v2}}, {uri: {exact: /health}}]
            route: [{destination: {host: ratings, port: {number: 9080}}}]
          - route: [{destination: {host: reviews}}]
          - route: [{destination: {host: ratings}}]
        """
    )
    ineffective = [d.path for d in t.decisions if d.code == "match-ineffective"]
    assert ineffective == ["spec.http[1].match[0]"]
    unreachable = [d.path for d in t.decisions if d.code == "rule-unreachable"]
    # The last rule follows a catch-all: Istio drops it; it is reported.
    assert unreachable == ["spec.http[3]"]
    assert len(t.routes_for(REVIEWS.hostname).entries) == 4  # type: ignore[union-attr]


def test_unknown_host_subset_and_port_are_decisions() -> None:
    t = table(
        """
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: reviews, namespace: shop}
        spec:
          hosts: [reviews]
          http:
          - route:
            - destination: {host: nosuch}
              weight: 50
            - destination: {host: ratings, subset: v9}
              weight: 50
        """
    )
    got = {d.code: d for d in t.decisions}
    assert got["host-not-found"].path == "spec.http[0].route[0].destination.host"
    assert got["subset-not-found"].path == "spec.http[0].route[1].destination.subset"
    assert got["port-required"].path == "spec.http[0].route[1].destination"
    assert got["host-not-found"].line == 9


def test_several_virtual_services_for_one_host_are_merged_oldest_first_and_reported() -> None:
    text = """
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: b, namespace: shop, creationTimestamp: "2024-01-02T00:00:00Z"}
        spec:
          hosts: [reviews]
          http: [{match: [{uri: {prefix: /b}}], route: [{destination: {host: reviews}}]}]
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: a, namespace: shop, creationTimestamp: "2024-01-01T00:00:00Z"}
        spec:
          hosts: [reviews]
          http: [{match: [{uri: {prefix: /a}}], route: [{destination: {host: reviews}}]}]
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: elsewhere, namespace: other}
        spec:
          hosts: [reviews.shop.svc.cluster.local]
          http: [{route: [{destination: {host: reviews.shop.svc.cluster.local}}]}]
        """
    t = table(text)
    entries = t.routes_for(REVIEWS.hostname).entries  # type: ignore[union-attr]
    assert [e.route.origin.resource for e in entries] == [
        "VirtualService shop/a",
        "VirtualService shop/b",
    ]
    conflict = [d for d in t.decisions if d.code == "vs-conflict"]
    assert conflict and conflict[0].resource == "VirtualService shop/b"
    assert any(
        d.code == "vs-not-applicable" and "other/elsewhere" in d.resource for d in t.decisions
    )


def test_delegate_rules_merge_with_the_root_match_and_conflicts_are_dropped() -> None:
    t = table(
        """
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: root, namespace: shop}
        spec:
          hosts: [reviews]
          http:
          - match: [{uri: {prefix: /api}}]
            timeout: 3s
            delegate: {name: api, namespace: team}
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: api, namespace: team}
        spec:
          http:
          - match: [{uri: {prefix: /api/v1}}]
            route: [{destination: {host: ratings.shop.svc.cluster.local, port: {number: 9080}}}]
          - match: [{uri: {prefix: /other}}]
            route: [{destination: {host: reviews.shop.svc.cluster.local}}]
        """
    )
    entries = t.routes_for(REVIEWS.hostname).entries  # type: ignore[union-attr]
    assert len(entries) == 1
    e = entries[0]
    assert e.match is not None and e.match.uri is not None and e.match.uri.value == "/api/v1"
    assert e.route.timeout == 3.0
    assert e.route.clusters[0].cluster.host == RATINGS.hostname
    assert [d.code for d in t.decisions if d.code.startswith("delegate")] == ["delegate-conflict"]


DRS = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: mesh-default, namespace: istio-system}
spec:
  host: "*.svc.cluster.local"
  trafficPolicy:
    connectionPool: {tcp: {maxConnections: 7}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  exportTo: ["."]
  trafficPolicy:
    loadBalancer: {simple: RANDOM}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews-for-waypoints, namespace: wp}
spec:
  host: reviews.shop.svc.cluster.local
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 2, interval: 1s, baseEjectionTime: 3m}
"""


def test_destination_rule_lookup_order_proxy_then_service_then_root() -> None:
    cs = load(DRS)
    t = compile_routes(cs, [REVIEWS], [REVIEWS, RATINGS], "wp")
    # proxy namespace first
    p = t.destination_rules.effective(REVIEWS.hostname, "shop", "wp")
    assert p.outlier_detection is not None and p.outlier_detection.base_ejection_time == 180.0
    assert p.sources == ("DestinationRule wp/reviews-for-waypoints",)
    # shop's rule is private (exportTo "."): invisible to a proxy in `other`; the root one applies
    p = t.destination_rules.effective(REVIEWS.hostname, "shop", "other")
    assert p.connection_pool.max_connections == 7 and p.load_balancer.simple == "LEAST_REQUEST"
    # ... but visible in its own namespace, where it replaces the root one (no inheritance)
    p = t.destination_rules.effective(REVIEWS.hostname, "shop", "shop")
    assert p.load_balancer.simple == "RANDOM" and p.connection_pool.max_connections is None


def test_inheritance_merges_namespace_and_mesh_rules_into_the_specific_one() -> None:
    text = DRS + textwrap.dedent(
        """
        ---
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: mesh, namespace: istio-system}
        spec:
          trafficPolicy:
            connectionPool: {http: {http1MaxPendingRequests: 3}}
        """
    )
    with pytest.raises(ResourceError, match=r"spec\.host: is required"):
        load(text)
    cs = load(text, destination_rule_inheritance=True)
    t = compile_routes(cs, [REVIEWS], [REVIEWS], "shop")
    p = t.destination_rules.effective(REVIEWS.hostname, "shop", "shop")
    assert p.load_balancer.simple == "RANDOM"
    assert p.connection_pool.http1_max_pending_requests == 3


def test_http_route_precedence_and_segment_prefix() -> None:
    t = table(
        """
        apiVersion: gateway.networking.k8s.io/v1
        kind: HTTPRoute
        metadata: {name: reviews, namespace: shop}
        spec:
          parentRefs: [{group: "", kind: Service, name: reviews, port: 9080}]
          rules:
          - matches: [{path: {type: PathPrefix, value: /api}}]
            backendRefs: [{name: reviews, port: 9080}]
          - matches: [{path: {type: Exact, value: /api/login}}]
            filters:
            - type: RequestHeaderModifier
              requestHeaderModifier: {set: [{name: X-Login, value: "1"}]}
            backendRefs:
            - {name: ratings, port: 9080, weight: 3}
            - {name: ratings, namespace: other, port: 9080}
        """
    )
    entries = t.routes_for(REVIEWS.hostname).entries  # type: ignore[union-attr]
    assert [e.match.uri.kind for e in entries if e.match and e.match.uri] == [
        MatchKind.EXACT,
        MatchKind.SEGMENT_PREFIX,
    ]
    exact = entries[0]
    assert exact.route.request_headers.set == (("x-login", "1"),)
    assert exact.match is not None and exact.match.port == 9080
    assert exact.route.clusters[1].cluster.invalid.startswith("no ReferenceGrant")
    prefix = entries[1].match
    assert prefix is not None and prefix.uri is not None
    assert (
        prefix.uri.matches("/api/x")
        and prefix.uri.matches("/api")
        and not prefix.uri.matches("/apix")
    )


def test_default_route_when_nothing_configured() -> None:
    t = table("")
    routes = t.routes_for(REVIEWS.hostname)
    assert routes is not None and routes.default
    assert routes.entries[0].route.clusters[0].cluster.host == REVIEWS.hostname


def test_waypoint_policy_attachment() -> None:
    cs = load(
        """
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: gw, namespace: wp}
        spec:
          targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
          rules: [{to: [{operation: {paths: ["/admin*"]}}]}]
          action: DENY
        ---
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: svc, namespace: shop}
        spec:
          targetRefs: [{kind: Service, group: "", name: reviews}]
          rules: [{from: [{source: {namespaces: [frontend]}}]}]
        ---
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: l4, namespace: shop}
        spec:
          selector: {matchLabels: {app: reviews}}
          rules: [{}]
        """
    )
    got = waypoint_policies(cs.authorization_policies, "wp", "waypoint", ("shop", "reviews"))
    assert [p.key for p in got] == ["wp/gw", "shop/svc"]
    got = waypoint_policies(cs.authorization_policies, "wp", "waypoint", ("shop", "ratings"))
    assert [p.key for p in got] == ["wp/gw"]


def test_authorization_policy_errors_name_the_field() -> None:
    with pytest.raises(
        ResourceError,
        match=r"AuthorizationPolicy shop/p: spec.rules\[0\].to\[0\].operation.paths\[0\]",
    ):
        load(
            """
            apiVersion: security.istio.io/v1
            kind: AuthorizationPolicy
            metadata: {name: p, namespace: shop}
            spec:
              targetRefs: [{kind: Service, name: reviews}]
              rules: [{to: [{operation: {paths: ["/a/*/b"]}}]}]
            """
        )
