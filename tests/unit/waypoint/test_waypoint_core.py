"""The waypoint's sans-I/O parts: L7 authorization, endpoint choice with outlier detection
and consistent hashing, and the router's rewrites, redirects and mirror authority."""

from __future__ import annotations

import collections
import ipaddress
import random
import textwrap

import pytest

from waypoint import router
from waypoint.authz import RequestAttrs, authorize, path_matches
from waypoint.balancer import Cluster, Endpoint
from waypoint.http.messages import RequestHead
from ztunnel.identity import SpiffeId
from ztunnel.meshconfig import ServiceRef, compile_routes, parse_documents, parse_yaml
from ztunnel.meshconfig.destinations import EffectivePolicy
from ztunnel.meshconfig.networking import ConsistentHash, LoadBalancer, OutlierDetection
from ztunnel.model import Workload

pytestmark = pytest.mark.unit

WEB = SpiffeId("cluster.local", "frontend", "web")


def policies(text: str):  # type: ignore[no-untyped-def]
    return parse_documents(parse_yaml(textwrap.dedent(text), "p.yaml")).authorization_policies


def attrs(
    path: str = "/", method: str = "GET", source: SpiffeId | None = WEB, **kw: object
) -> RequestAttrs:
    base = dict(
        method=method,
        path=path,
        host="reviews.shop:80",
        port=80,
        headers={},
        source=source,
        source_ip="10.0.0.1",
        destination_ip="10.96.0.1",
    )
    base.update(kw)
    return RequestAttrs(**base)  # type: ignore[arg-type]


POLICIES = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: shop}
spec:
  targetRefs: [{kind: Service, name: reviews}]
  action: DENY
  rules:
  - to: [{operation: {paths: ["/admin/*"], notMethods: [GET]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-frontend, namespace: shop}
spec:
  targetRefs: [{kind: Service, name: reviews}]
  rules:
  - from: [{source: {namespaces: [frontend]}}]
    when: [{key: "request.headers[x-team]", notValues: [blocked]}]
  - to: [{operation: {paths: ["/public/{*}/info"], hosts: ["reviews.shop"]}}]
"""


def test_deny_then_allow_semantics() -> None:
    ps = policies(POLICIES)
    assert authorize(ps, attrs("/x")).allowed
    v = authorize(ps, attrs("/admin/users", "POST"))
    assert not v.allowed and v.policy == "shop/deny-admin"
    assert authorize(ps, attrs("/admin/users", "GET")).allowed  # notMethods exempts GET
    # ALLOW policies exist: a plaintext caller matches none of them...
    v = authorize(ps, attrs("/x", source=None))
    assert not v.allowed and v.reason == "ALLOW policies apply but none matched"
    # ...unless the second rule (path template + host without port) takes it.
    assert authorize(ps, attrs("/public/a/info", source=None)).allowed
    assert not authorize(ps, attrs("/public/a/b/info", source=None)).allowed
    # `when` notValues on a header
    assert not authorize(ps, attrs("/x", headers={"x-team": ("blocked",)})).allowed


def test_path_templates_and_wildcards() -> None:
    assert path_matches("/a/*", "/a/b/c") and path_matches("*/c", "/a/b/c")
    assert path_matches("/a/{*}/c", "/a/b/c") and not path_matches("/a/{*}/c", "/a//c")
    assert path_matches("/a/{**}", "/a/b/c") and not path_matches("/a/{**}", "/a")


def test_dry_run_and_audit_do_not_decide() -> None:
    ps = policies(
        """
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: dry, namespace: shop, annotations: {istio.io/dry-run: "true"}}
        spec:
          targetRefs: [{kind: Service, name: reviews}]
          action: DENY
          rules: [{}]
        ---
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: audit, namespace: shop}
        spec:
          targetRefs: [{kind: Service, name: reviews}]
          action: AUDIT
          rules: [{}]
        """
    )
    v = authorize(ps, attrs())
    assert v.allowed and v.dry_run == ("shop/dry",) and v.audited == ("shop/audit",)


def _workloads(n: int) -> list[Endpoint]:
    out = []
    for i in range(n):
        ip = ipaddress.ip_address(f"10.0.0.{i + 1}")
        w = Workload(f"uid{i}", f"p{i}", "shop", (ip,))
        out.append(Endpoint(w, ip, 8080))
    return out


def test_outlier_detection_ejects_and_releases_with_growing_time() -> None:
    od = OutlierDetection(
        consecutive_5xx_errors=2, interval=1.0, base_ejection_time=10.0, max_ejection_percent=50
    )
    c = Cluster(
        "c", EffectivePolicy(LoadBalancer("ROUND_ROBIN"), outlier_detection=od), random.Random(1)
    )
    eps = _workloads(3)
    c.update(c.policy, eps)
    bad = eps[0]
    assert not c.finished(bad, 500, 0.0)
    assert c.finished(bad, 503, 0.1)  # second consecutive 5xx: ejected
    assert bad not in c.healthy(0.2)
    # maxEjectionPercent 50 of 3 hosts: a second ejection (67%) is not allowed.
    c.finished(eps[1], 500, 0.3)
    assert not c.finished(eps[1], 500, 0.4)
    assert bad in c.healthy(10.5)  # released at the first sweep after 10 s
    c.finished(bad, 500, 11.0)
    c.finished(bad, 500, 11.1)
    assert bad not in c.healthy(25.0) and bad in c.healthy(31.5)  # 2nd time: 20 s


def test_consistent_hash_is_sticky_and_spreads() -> None:
    lb = LoadBalancer("CONSISTENT_HASH", ConsistentHash("header", "x-user"))
    c = Cluster("c", EffectivePolicy(lb), random.Random(1))
    c.update(c.policy, _workloads(4))
    picks = {c.choose(0.0, f"user-{i}").key for i in range(200)}  # type: ignore[union-attr]
    assert len(picks) == 4
    for i in range(20):
        assert len({c.choose(0.0, f"user-{i}").key for _ in range(5)}) == 1  # type: ignore[union-attr]


def test_weighted_pick_tolerance() -> None:
    t = compile_routes(
        parse_documents(
            parse_yaml(
                textwrap.dedent(
                    """
                    apiVersion: networking.istio.io/v1
                    kind: VirtualService
                    metadata: {name: r, namespace: shop}
                    spec:
                      hosts: [r]
                      http:
                      - route:
                        - {destination: {host: r, subset: a}, weight: 90}
                        - {destination: {host: r, subset: b}, weight: 10}
                    """
                ),
                "x.yaml",
            )
        ),
        [ServiceRef("r.shop.svc.cluster.local", "shop", "r", (80,))],
        [],
        "shop",
    )
    clusters = t.routes_for("r.shop.svc.cluster.local").entries[0].route.clusters  # type: ignore[union-attr]
    rng = random.Random(7)
    got = collections.Counter(
        router.pick_weighted(clusters, rng).cluster.subset for _ in range(10_000)
    )  # type: ignore[union-attr]
    assert abs(got["b"] - 1000) < 120  # ~4 standard deviations


def test_shadow_authority() -> None:
    assert router.shadow_authority("reviews.shop:80") == "reviews.shop-shadow:80"
    assert router.shadow_authority("reviews") == "reviews-shadow"


def test_cookie_parsing() -> None:
    head = RequestHead("GET", "/", "h", headers=[("cookie", "a=1; session=xyz; b=2")])
    assert router.cookie(head.headers, "session") == "xyz"
    assert router.cookie(head.headers, "missing") is None
