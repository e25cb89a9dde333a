"""The waypoint end to end on loopback: curl -> agent A (SOCKS5) -> HBONE -> waypoint -> HBONE
-> agent -> HTTP backend. Each test asserts what the client (and the backends) observed."""

from __future__ import annotations

import asyncio
import collections
import json

import pytest

from tests.integration.waypoint.conftest import WaypointMesh
from ztunnel.testing import async_wait_for

pytestmark = pytest.mark.integration

DR = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
  - {name: v3, labels: {version: v3}}
"""


def vs(http: str) -> str:
    return (
        DR
        + """---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http:
"""
        + http
    )


async def versions(
    m: WaypointMesh, n: int, *args: str, path: str = "/"
) -> collections.Counter[str]:
    got: collections.Counter[str] = collections.Counter()
    for _ in range(n):
        status, _h, body = await m.curl(*args, path=path)
        got[json.loads(body)["version"] if status == 200 else str(status)] += 1
    return got


async def test_default_route_reaches_a_backend_through_the_waypoint(wmesh: WaypointMesh) -> None:
    status, _h, body = await wmesh.curl(path="/hello")
    assert status == 200, body
    got = json.loads(body)
    assert got["path"] == "/hello"
    assert got["pod"].startswith("reviews-")
    assert "traceparent" in got["headers"] and "x-request-id" in got["headers"]


@pytest.mark.timeout(120)
async def test_weighted_canary_and_header_match(wmesh: WaypointMesh) -> None:
    await wmesh.reload(
        vs(
            """
  - match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - route:
    - {destination: {host: reviews, subset: v1}, weight: 80}
    - {destination: {host: reviews, subset: v3}, weight: 20}
"""
        )
    )
    got = await versions(wmesh, 150)
    # 80/20 over 150 requests: binomial sd ~4.9; allow 4 sd.
    assert set(got) == {"v1", "v3"}
    assert abs(got["v3"] - 30) <= 20, got
    jason = await versions(wmesh, 5, "-H", "end-user: jason")
    assert jason == {"v2": 5}


async def test_injected_abort_and_delay(wmesh: WaypointMesh) -> None:
    await wmesh.reload(
        vs(
            """
  - match: [{uri: {prefix: /slow}}]
    fault: {delay: {fixedDelay: 1500ms, percentage: {value: 100}}}
    timeout: 1s
    route: [{destination: {host: reviews, subset: v1}}]
  - fault: {abort: {httpStatus: 418, percentage: {value: 100}}}
    route: [{destination: {host: reviews, subset: v1}}]
"""
        )
    )
    status, _h, body = await wmesh.curl(path="/x")
    assert status == 418 and "fault filter abort" in body
    assert not wmesh.backends["reviews-v1"].requests
    # The delay precedes the upstream; the route timeout holds for the upstream part only
    # (Envoy's router starts its timer after the fault filter). The delay is longer than the
    # timeout, and the timeout leaves the upstream ample time on a loaded machine.
    status, _h, _b = await wmesh.curl(path="/slow")
    assert status == 200


async def test_retry_hides_a_flaky_backend(wmesh: WaypointMesh) -> None:
    wmesh.backends["reviews-v1"].flaky = True
    await wmesh.reload(
        vs(
            """
  - route: [{destination: {host: reviews, subset: v1}}]
    retries: {attempts: 3, retryOn: 5xx}
"""
        )
    )
    got = await versions(wmesh, 10)
    assert got == {"v1": 10}
    assert len(wmesh.backends["reviews-v1"].requests) >= 15  # about half were retried


async def test_mirror_gets_copies_with_shadow_host(wmesh: WaypointMesh) -> None:
    await wmesh.reload(
        vs(
            """
  - route: [{destination: {host: reviews, subset: v1}}]
    mirror: {host: reviews, subset: v3}
    mirrorPercentage: {value: 100}
"""
        )
    )
    got = await versions(wmesh, 5)
    assert got == {"v1": 5}
    v3 = wmesh.backends["reviews-v3"]
    await async_wait_for(lambda: len(v3.requests) >= 5, 10)
    assert all(
        r["host"].startswith("reviews-shadow") or "-shadow" in r["host"] for r in v3.requests
    ), v3.requests


async def test_l7_deny_for_one_path(wmesh: WaypointMesh) -> None:
    await wmesh.reload(
        """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: "", name: reviews}]
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin*"]}}]}]
"""
    )
    status, _h, body = await wmesh.curl(path="/admin/users")
    assert status == 403 and body == "RBAC: access denied"
    status, _h, _b = await wmesh.curl(path="/public")
    assert status == 200


async def test_cookie_consistent_hash_sticks(wmesh: WaypointMesh) -> None:
    await wmesh.reload(
        """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer: {consistentHash: {httpCookie: {name: session, ttl: 60s}}}
"""
    )
    status, headers, _body = await wmesh.curl()
    assert status == 200
    cookie = headers["set-cookie"].split(";")[0]
    assert cookie.startswith("session=") and "Max-Age=60" in headers["set-cookie"]
    pods = set()
    for _ in range(12):
        _s, h, b = await wmesh.curl("-H", f"cookie: {cookie}")
        assert "set-cookie" not in h
        pods.add(json.loads(b)["pod"])
    assert len(pods) == 1


async def test_outlier_detection_ejects_a_failing_pod(wmesh: WaypointMesh) -> None:
    wmesh.backends["reviews-v2"].fail = True
    await wmesh.reload(
        """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    outlierDetection:
      {consecutive5xxErrors: 2, interval: 1s, baseEjectionTime: 60s, maxEjectionPercent: 50}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http: [{route: [{destination: {host: reviews}}], retries: {attempts: 0}}]
"""
    )
    first = [(await wmesh.curl())[0] for _ in range(9)]
    assert first.count(500) == 2  # two failures, then the pod is ejected
    later = [(await wmesh.curl())[0] for _ in range(9)]
    assert later == [200] * 9


async def test_redirect_rewrite_and_headers(wmesh: WaypointMesh) -> None:
    await wmesh.reload(
        vs(
            """
  - match: [{uri: {prefix: /old}}]
    redirect: {uri: /new, authority: example.com}
  - match: [{uri: {prefix: /api/}}]
    rewrite: {uri: /v2/}
    headers:
      request: {set: {x-added: "yes"}}
      response: {add: {x-served-by: waypoint}}
    route: [{destination: {host: reviews, subset: v1}}]
"""
        )
    )
    status, headers, _b = await wmesh.curl(path="/old/page?q=1")
    assert status == 301 and headers["location"] == "http://example.com/new?q=1"
    status, headers, body = await wmesh.curl(path="/api/items")
    got = json.loads(body)
    assert got["path"] == "/v2/items" and got["headers"]["x-added"] == "yes"
    assert headers["x-served-by"] == "waypoint"


async def test_unbound_address_is_refused(wmesh: WaypointMesh) -> None:
    import ipaddress

    from ztunnel.hbone.headers import ConnectRequest
    from ztunnel.hbone.pool import HbonePool, PoolKey

    assert wmesh.waypoint is not None
    pool = HbonePool(wmesh.waypoint.certs, wmesh.waypoint.contexts, 5.0)
    from ztunnel.errors import ConnectRejected
    from ztunnel.identity import SpiffeId

    key = PoolKey(
        wmesh.waypoint.identity,
        frozenset({SpiffeId("cluster.local", "shop", "waypoint")}),
        (ipaddress.ip_address(wmesh.ip(50)), wmesh.p[7]),
        None,
    )
    with pytest.raises(ConnectRejected) as e:
        await pool.open_stream(key, ConnectRequest(f"{wmesh.ip(2)}:8080"))
    assert e.value.status == 503
    await pool.close(1.0)


async def test_metrics_count_requests(wmesh: WaypointMesh) -> None:
    await wmesh.curl()
    assert wmesh.waypoint is not None
    from prometheus_client import generate_latest

    await asyncio.sleep(0.1)
    text = generate_latest(wmesh.waypoint.registry).decode()
    line = next(x for x in text.splitlines() if x.startswith("istio_requests_total{"))
    assert 'reporter="waypoint"' in line and 'response_code="200"' in line
    assert 'source_principal="spiffe://cluster.local/ns/frontend/sa/web"' in line
    assert 'destination_service="reviews.shop.svc.cluster.local"' in line
    assert "istio_request_duration_milliseconds_bucket" in text
