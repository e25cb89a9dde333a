"""The waypoint's inbound side: HBONE CONNECT streams from node agents. The `:authority` is
the original destination; only services and workloads bound to this waypoint are served
(others get 503). HTTP is detected by the port's app protocol or by sniffing the first
bytes (HTTP/2 preface, an HTTP/1 request line); anything else is passed through as TCP to an
endpoint chosen like an HTTP request's (VirtualService `tcp` routes, DestinationRule load
balancing)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from waypoint.http.h1 import ServerLimits, serve_h1
from waypoint.http.h2conn import PREFACE, serve_h2
from waypoint.http.messages import BodyChannel, RequestHead
from waypoint.http.streams import ByteStream, HboneByteStream, PrefixedStream
from waypoint.proxy import RequestHandler, Source, Target
from waypoint.router import pick_weighted
from waypoint.state import WaypointView
from ztunnel.hbone.connection import HboneStream
from ztunnel.hbone.protocol import ConnectRequested
from ztunnel.proxy.inbound import forwarded_client

log = logging.getLogger(__name__)

HTTP_PROTOCOLS = ("http", "http2", "grpc", "grpc-web", "h2c", "kubernetes.io/h2c")
_METHODS = (b"GET ", b"POST", b"PUT ", b"HEAD", b"DELE", b"OPTI", b"PATC", b"TRAC", b"CONN")


class WaypointServer:
    def __init__(
        self,
        view: Callable[[], WaypointView],
        handler: RequestHandler,
        limits: ServerLimits | None = None,
        sniff_timeout: float = 0.3,
    ) -> None:
        self.view = view
        self.handler = handler
        self.limits = limits or ServerLimits()
        self.sniff_timeout = sniff_timeout

    def classify(self, view: WaypointView, ip: str, port: int) -> Target | None:
        import ipaddress

        addr = ipaddress.ip_address(ip)
        svc = view.services.get(addr)
        if svc is not None:
            sp = svc.port(port)
            if sp is None and svc.ports:
                return None
            return Target(ip, port, svc, None, sp.app_protocol if sp else "")
        w = view.workloads.get(addr)
        if w is not None:
            return Target(ip, port, None, w, "")
        return None

    async def handle_stream(self, stream: HboneStream, req: ConnectRequested) -> None:
        view = self.view()
        ip, port = str(req.target[0]), req.target[1]
        target = self.classify(view, ip, port)
        if target is None:
            log.info(
                "CONNECT %s:%d refused: not a service or workload bound to this waypoint", ip, port
            )
            stream.respond(503)
            return
        transport = stream.connection.transport
        peer = transport.get_extra_info("peername") if transport else None
        client = forwarded_client(req.headers.get("forwarded", "")) or (
            (str(peer[0]), int(peer[1])) if peer else ("0.0.0.0", 0)
        )
        wl = view.mesh.workload_by_ip(client[0])
        # Labels of the source workload are trusted only when its identity is the peer's.
        if (
            wl is not None
            and stream.peer_identity is not None
            and wl.identity != stream.peer_identity
        ):
            wl = None
        source = Source(stream.peer_identity, client[0], client[1], wl)
        stream.respond(200)
        io = HboneByteStream(stream, f"{client[0]}:{client[1]}")
        try:
            await self.serve(io, target, source)
        finally:
            io.close()

    async def serve(self, io: ByteStream, target: Target, source: Source) -> None:
        app = target.app_protocol.lower()
        first = b""
        if app in ("tcp", "tls", "mongo", "redis", "mysql"):
            return await self.passthrough(io, target, source, first)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(
                self.sniff_timeout if app not in HTTP_PROTOCOLS else self.limits.header_timeout
            ):
                while len(first) < len(PREFACE):
                    data = await io.read()
                    if not data:
                        break
                    first += data
                    if not PREFACE.startswith(first[: len(PREFACE)]) and len(first) >= 4:
                        break
        stream = PrefixedStream(io, first)

        async def handle(head: RequestHead, body: BodyChannel):  # type: ignore[no-untyped-def]
            return await self.handler.handle(head, body, target, source)

        if first.startswith(PREFACE):
            await serve_h2(stream, handle, self.limits)
        elif first[:4] in _METHODS or app in HTTP_PROTOCOLS:
            await serve_h1(stream, handle, self.limits)
        else:
            await self.passthrough(stream, target, source, b"")

    async def passthrough(
        self, io: ByteStream, target: Target, source: Source, first: bytes
    ) -> None:
        """Non-HTTP traffic: one endpoint per connection, bytes both ways."""
        view = self.view()
        handler = self.handler
        if target.service is not None:
            routes = view.routes.routes_for(target.service.hostname)
            clusters = None
            if routes is not None:
                entry = next((t for t in routes.tcp if t.port in (None, target.port)), None)
                if entry is not None:
                    clusters = entry.clusters
            from ztunnel.meshconfig.compile import Cluster as ClusterRef
            from ztunnel.meshconfig.compile import WeightedCluster

            chosen = (
                pick_weighted(clusters, handler.rng)
                if clusters
                else WeightedCluster(
                    ClusterRef(target.service.hostname, "", None, target.service.namespace), 1
                )
            )
            if chosen is None:
                io.abort()
                return
            port = chosen.cluster.port or target.port
            cluster = handler.cluster(view, chosen.cluster, port)
            ep = cluster.choose(asyncio.get_running_loop().time(), source.ip)
        else:
            from waypoint.balancer import Endpoint

            assert target.workload is not None
            ep = Endpoint(target.workload, target.workload.addresses[0], target.port)
        if ep is None:
            log.info("TCP to %s:%d: no healthy endpoint", target.ip, target.port)
            io.abort()
            return
        try:
            up = await handler.upstreams.connector(ep)
        except Exception as e:
            log.info("TCP to %s failed: %s", ep.key, e)
            io.abort()
            return
        log.info("TCP %s -> %s:%d via %s", source.ip, target.ip, target.port, ep.key)

        async def copy(src: ByteStream, dst: ByteStream) -> None:
            try:
                while data := await src.read():
                    await dst.write(data)
                dst.end()
            except (ConnectionError, OSError):
                dst.abort()
                src.abort()

        await asyncio.gather(copy(io, up), copy(up, io))
        close = getattr(up, "close", None)
        if close is not None:
            close()
