"""HTTP/2 and gRPC through the waypoint with real clients: a grpcio client and server (unary
with trailing metadata, a server stream) and curl with HTTP/2 prior knowledge. The client
side enters the waypoint's HTTP layer through a plain loopback listener (the tunnel from a
node agent is covered by the other tests); upstream is HBONE to the node agent as usual."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import grpc
import pytest

from tests.integration.waypoint.conftest import WaypointMesh
from waypoint.http.streams import AsyncioByteStream
from waypoint.proxy import Source, Target
from ztunnel.identity import SpiffeId

pytestmark = pytest.mark.integration

CONFIG = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  subsets:
  - name: grpc
    labels: {version: v3}
    trafficPolicy: {connectionPool: {http: {h2UpgradePolicy: UPGRADE}}}
  - {name: v1, labels: {version: v1}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - match: [{headers: {content-type: {prefix: application/grpc}}}]
    route: [{destination: {host: reviews, subset: grpc}}]
  - route: [{destination: {host: reviews, subset: v1}}]
"""


async def _front_door(m: WaypointMesh) -> tuple[asyncio.AbstractServer, int]:
    assert m.waypoint is not None
    wp = m.waypoint
    view = wp.view
    svc = next(iter(view.services.values()))
    client = view.mesh.workload_by_ip(m.ip(1))

    async def on(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        io = AsyncioByteStream(r, w)
        target = Target(m.vip, 80, svc, None, "http")
        source = Source(SpiffeId("cluster.local", "frontend", "web"), m.ip(1), 1, client)
        try:
            await wp.server.serve(io, target, source)
        finally:
            io.close()

    srv = await asyncio.start_server(on, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1]


async def _grpc_backend(m: WaypointMesh) -> grpc.aio.Server:
    m.backends["reviews-v3"].server.close()  # type: ignore[union-attr]
    await m.backends["reviews-v3"].server.wait_closed()  # type: ignore[union-attr]

    async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await context.send_initial_metadata((("x-initial", "1"),))
        context.set_trailing_metadata((("x-trailer", "yes"),))
        return request[::-1]

    async def stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        for i in range(3):
            yield f"{request.decode()}-{i}".encode()

    async def fail(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "nope")
        return b""

    handler = grpc.method_handlers_generic_handler(
        "test.Echo",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
            "Fail": grpc.unary_unary_rpc_method_handler(fail),
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"{m.ip(4)}:8080")
    await server.start()
    return server


@pytest.mark.timeout(90)
async def test_grpc_unary_stream_and_status_through_the_waypoint(wmesh: WaypointMesh) -> None:
    await wmesh.reload(CONFIG)
    backend = await _grpc_backend(wmesh)
    srv, port = await _front_door(wmesh)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = ch.unary_unary("/test.Echo/Unary")(b"hello", timeout=10)
            assert await call == b"olleh"
            trailing = dict(await call.trailing_metadata())  # type: ignore[arg-type]
            assert trailing["x-trailer"] == "yes"
            assert dict(await call.initial_metadata())["x-initial"] == "1"  # type: ignore[arg-type]
            got = [r async for r in ch.unary_stream("/test.Echo/Stream")(b"s", timeout=10)]
            assert got == [b"s-0", b"s-1", b"s-2"]
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await ch.unary_unary("/test.Echo/Fail")(b"x", timeout=10)
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert e.value.details() == "nope"
    finally:
        srv.close()
        await backend.stop(0.5)
    assert wmesh.waypoint is not None
    series = wmesh.waypoint.metrics.series
    codes = {(lbl.request_protocol, lbl.grpc_response_status) for lbl in series}
    assert ("grpc", "0") in codes and ("grpc", "7") in codes


async def test_curl_http2_prior_knowledge(wmesh: WaypointMesh) -> None:
    await wmesh.reload(CONFIG)
    srv, port = await _front_door(wmesh)
    try:
        proc = await asyncio.create_subprocess_exec(
            "curl",
            "-sS",
            "--http2-prior-knowledge",
            "-d",
            "payload",
            f"http://127.0.0.1:{port}/h2?x=1",
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await proc.communicate()
    finally:
        srv.close()
    got = json.loads(out)
    assert got["version"] == "v1" and got["path"] == "/h2?x=1"
    assert wmesh.backends["reviews-v1"].requests[-1]["body"] == "payload"
