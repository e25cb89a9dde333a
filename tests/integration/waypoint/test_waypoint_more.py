"""More of the waypoint end to end: Gateway API HTTPRoute, circuit breaking (UO), CORS, route
timeouts (UT), TCP passthrough, the access log, and spans exported over OTLP to a stand-in
collector that decodes the real OTLP protobuf messages."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from tests.integration.waypoint.conftest import WaypointMesh
from ztunnel.testing import async_wait_for, free_port, socks5_connect

pytestmark = pytest.mark.integration


async def test_http_route_weights_and_header_modifier(wmesh: WaypointMesh) -> None:
    await wmesh.reload(
        """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /v3}}]
    filters:
    - type: URLRewrite
      urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}
    - type: RequestHeaderModifier
      requestHeaderModifier: {add: [{name: x-route, value: gamma}]}
    backendRefs: [{name: reviews, port: 80}]
    timeouts: {request: 5s}
"""
    )
    status, _h, body = await wmesh.curl(path="/v3/items")
    got = json.loads(body)
    assert status == 200 and got["path"] == "/items" and got["headers"]["x-route"] == "gamma"
    status, _h, _b = await wmesh.curl(path="/v3x")  # not a whole segment: no route
    assert status == 404


async def test_connection_pool_overflow_is_503_uo(wmesh: WaypointMesh) -> None:
    for b in wmesh.backends.values():
        b.delay = 0.5
    await wmesh.reload(
        """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy:
      connectionPool: {tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http: [{route: [{destination: {host: reviews, subset: v1}}]}]
"""
    )
    results = await asyncio.gather(*(wmesh.curl() for _ in range(6)))
    statuses = sorted(s for s, _h, _b in results)
    # One connection, one pending request; the other four overflow.
    assert statuses == [200, 200, 503, 503, 503, 503], results
    overloaded = [h for s, h, _b in results if s == 503]
    assert all(h.get("x-envoy-overloaded") == "true" for h in overloaded)


async def test_cors_preflight_and_route_timeout(wmesh: WaypointMesh) -> None:
    wmesh.backends["reviews-v1"].delay = 1.0
    await wmesh.reload(
        """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  subsets: [{name: v1, labels: {version: v1}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - timeout: 200ms
    corsPolicy:
      allowOrigins: [{exact: "https://app.example"}]
      allowMethods: [GET, POST]
      maxAge: 1h
    route: [{destination: {host: reviews, subset: v1}}]
"""
    )
    status, headers, _b = await wmesh.curl(
        "-X",
        "OPTIONS",
        "-H",
        "origin: https://app.example",
        "-H",
        "access-control-request-method: POST",
    )
    assert status == 200
    assert headers["access-control-allow-origin"] == "https://app.example"
    assert headers["access-control-allow-methods"] == "GET,POST"
    assert headers["access-control-max-age"] == "3600"
    status, _h, body = await wmesh.curl()
    assert status == 504 and body == "upstream request timeout"


async def test_tcp_port_is_passed_through(wmesh: WaypointMesh) -> None:
    r, w = await socks5_connect(("127.0.0.1", wmesh.socks), wmesh.vip, 9000, source_ip=wmesh.ip(1))
    hello = await asyncio.wait_for(r.readline(), 10)
    assert hello.startswith(b"reviews-")
    w.write(b"ping")
    assert await asyncio.wait_for(r.readexactly(4), 10) == b"ping"
    w.close()


class _Collector:
    """An OTLP/HTTP trace receiver: POST /v1/traces with an ExportTraceServiceRequest."""

    def __init__(self) -> None:
        self.spans: list[object] = []

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        head = await r.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
        body = await r.readexactly(length)
        req = trace_service_pb2.ExportTraceServiceRequest()
        req.ParseFromString(body)
        for rs in req.resource_spans:
            for ss in rs.scope_spans:
                self.spans.extend(ss.spans)
        w.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n"
        )
        await w.drain()
        w.close()


OTLP_PORT = free_port()


@pytest.mark.parametrize(
    "wmesh", [{"otlp_endpoint": f"http://127.0.0.1:{OTLP_PORT}"}], indirect=True
)
async def test_traceparent_propagated_and_span_exported(
    wmesh: WaypointMesh, caplog: pytest.LogCaptureFixture
) -> None:
    collector = _Collector()
    server = await asyncio.start_server(collector.handle, "127.0.0.1", OTLP_PORT)
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    try:
        with caplog.at_level(logging.INFO, logger="waypoint.access"):
            status, _h, body = await wmesh.curl(
                "-H", f"traceparent: 00-{trace_id}-00f067aa0ba902b7-01"
            )
        assert status == 200
        sent = json.loads(body)["headers"]["traceparent"]
        assert sent.startswith(f"00-{trace_id}-") and not sent.endswith("00f067aa0ba902b7-01")
        await async_wait_for(lambda: bool(collector.spans), 15)
        span = collector.spans[0]
        assert span.trace_id.hex() == trace_id  # type: ignore[attr-defined]
        assert span.parent_span_id.hex() == "00f067aa0ba902b7"  # type: ignore[attr-defined]
        assert span.span_id.hex() == sent.split("-")[2]  # type: ignore[attr-defined]
        rec = next(r for r in caplog.records if r.getMessage() == "request complete")
        assert rec.response_code == 200 and rec.trace_id == trace_id
    finally:
        server.close()
