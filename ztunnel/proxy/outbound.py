"""Outbound: a connection from a local workload to its original destination, carried over
HBONE (directly or via a waypoint) or passed through as plain TCP."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ztunnel.errors import ConnectRejected, HboneError, ProxyError
from ztunnel.hbone.connection import HboneStream
from ztunnel.hbone.headers import (
    ConnectRequest,
    baggage_for,
    format_authority,
    forwarded_for,
    new_traceparent,
)
from ztunnel.hbone.pool import PoolKey, TlsFailure
from ztunnel.model import IPAddress
from ztunnel.proxy.context import ProxyContext
from ztunnel.proxy.records import ConnectionRecord
from ztunnel.proxy.relay import TcpEnd, relay_stream, relay_tcp
from ztunnel.proxy.routing import DirectRoute, HboneRoute, Refusal, route
from ztunnel.proxy.sockets import connect_from

log = logging.getLogger(__name__)


@dataclass
class Upstream:
    """An established way to the destination: an HBONE stream or a plain TCP connection."""

    record: ConnectionRecord
    stream: HboneStream | None = None
    tcp: TcpEnd | None = None


class OutboundProxy:
    def __init__(self, ctx: ProxyContext) -> None:
        self.ctx = ctx

    async def open(self, src: tuple[IPAddress, int], dst: tuple[IPAddress, int]) -> Upstream:
        """Resolve and connect; ProxyError (with the telemetry flag and the record as far as
        it got) when that fails."""
        rec = ConnectionRecord("outbound", (str(src[0]), src[1]), (str(dst[0]), dst[1]))
        try:
            return await self._open(rec, src, dst)
        except ProxyError as e:
            e.record = rec
            raise

    async def _open(
        self, rec: ConnectionRecord, src: tuple[IPAddress, int], dst: tuple[IPAddress, int]
    ) -> Upstream:
        ctx = self.ctx
        state = ctx.store.current
        source = ctx.local_workload(src[0])
        rec.src_workload = source
        rec.src_identity = source.identity if source else None
        if source is None:
            raise ProxyError(f"source {src[0]} is not a workload on this node", "NR")
        if dst[1] in ctx.own_ports and ctx.local_workload(dst[0]) is not None:
            raise ProxyError(f"refusing a loop into the agent's own port {dst[1]}", "NR")
        r = route(state, source, dst[0], dst[1], ctx.rng, ctx.hbone_port)
        if isinstance(r, Refusal):
            raise ProxyError(r.reason, r.response_flag)
        rec.dst_workload = r.workload
        rec.dst_service = r.service
        if isinstance(r, DirectRoute):
            rec.path = "passthrough"
            # Keep the client's address where the kernel lets us (as a captured pod would).
            source_ip = src[0] if ctx.bind_source_ip else None
            sock, _ = await connect_from(r.target, source_ip, ctx.connect_timeout, ctx.transparent)
            return Upstream(rec, tcp=await TcpEnd.from_socket(sock))
        return await self._tunnel(rec, r, src)

    async def _tunnel(
        self, rec: ConnectionRecord, r: HboneRoute, src: tuple[IPAddress, int]
    ) -> Upstream:
        ctx = self.ctx
        source = rec.src_workload
        assert source is not None
        rec.path = "waypoint" if r.via_waypoint else "hbone"
        rec.mtls = True
        rec.hbone_target = format_authority(*r.next_hop)
        source_ip: IPAddress | None = src[0] if ctx.bind_source_ip else None
        mark = 0
        if (
            ctx.local_dial_mark
            and ctx.node_ip is not None
            and (ctx.local_workload(r.next_hop[0]) is not None)
        ):
            # Same node with kernel capture: our own listener, reached through local delivery.
            source_ip, mark = ctx.node_ip, ctx.local_dial_mark
        key = PoolKey(source.identity, r.identities, r.next_hop, source_ip, mark)
        request = ConnectRequest(
            authority=format_authority(*r.target),
            baggage=baggage_for(source),
            forwarded=forwarded_for(src[0], src[1], r.service.hostname if r.service else ""),
            traceparent=new_traceparent(),
        )
        try:
            stream = await ctx.pool.open_stream(key, request)
        except TlsFailure as e:
            raise ProxyError(str(e), "TLS_FAILURE") from None
        except ConnectRejected as e:
            flag = "DENY" if e.status == 401 else "CONNECT"
            raise ProxyError(str(e), flag) from None
        except HboneError as e:
            raise ProxyError(str(e), "CONNECT") from None
        rec.dst_identity = stream.peer_identity
        return Upstream(rec, stream=stream)

    async def relay(self, app: TcpEnd, up: Upstream) -> None:
        tracker = self.ctx.tracker
        try:
            if up.stream is not None:
                await relay_stream(app, up.stream, up.record, tracker)
            else:
                assert up.tcp is not None
                await relay_tcp(app, up.tcp, up.record, tracker)
        finally:
            tracker.close(up.record)

    async def handle(
        self, app: TcpEnd, src: tuple[IPAddress, int], dst: tuple[IPAddress, int]
    ) -> None:
        """A captured connection (15001): connect, then relay; on failure close the app."""
        try:
            up = await self.open(src, dst)
        except ProxyError as e:
            self.failed(src, dst, e)
            app.abort()
            return
        self.ctx.tracker.open(up.record)
        await self.relay(app, up)

    def failed(self, src: tuple[IPAddress, int], dst: tuple[IPAddress, int], e: ProxyError) -> None:
        rec = (
            e.record
            if isinstance(e.record, ConnectionRecord)
            else ConnectionRecord("outbound", (str(src[0]), src[1]), (str(dst[0]), dst[1]))
        )
        rec.error = str(e)
        rec.response_flag = e.response_flag
        self.ctx.tracker.open(rec)
        self.ctx.tracker.close(rec)
        log.info("outbound %s:%d -> %s:%d failed: %s", src[0], src[1], dst[0], dst[1], e)
