"""Inbound: HBONE CONNECT streams (15008) and captured plaintext (15006) to local workloads.

Checks, in order (WIRE.md): the target is a local workload (else 503), the authority names the
workload the connection was addressed to (else 400), the port is not one of the agent's own
(else 503), authorization (else 401 / close), then the upstream connection to the application
from the ORIGINAL client IP (else 503).
"""

from __future__ import annotations

import ipaddress
import logging

from ztunnel.errors import ProxyError, ZtunnelError
from ztunnel.hbone.connection import HboneStream
from ztunnel.hbone.headers import parse_authority
from ztunnel.hbone.protocol import ConnectRequested
from ztunnel.model import IPAddress, Service, Workload
from ztunnel.proxy.context import AuthzRequest, ProxyContext
from ztunnel.proxy.records import ConnectionRecord
from ztunnel.proxy.relay import TcpEnd, relay_stream, relay_tcp
from ztunnel.proxy.sockets import connect_from
from ztunnel.state import MeshState

log = logging.getLogger(__name__)


def guess_service(state: MeshState, wl: Workload, port: int, forwarded: str) -> Service | None:
    """The service an inbound connection was addressed to, for telemetry: the `host=` of the
    Forwarded header when the source sent one, else the workload's only service whose target
    port is this port (as Istio's ztunnel guesses it)."""
    for part in forwarded.split(";"):
        k, _, v = part.strip().partition("=")
        if k.lower() == "host":
            host = v.strip('"')
            for key in wl.services:
                svc = state.by_key.get(key)
                if svc is not None and svc.hostname == host:
                    return svc
    matches = [
        svc
        for key, ports in wl.services.items()
        if port in ports.values() and (svc := state.by_key.get(key)) is not None
    ]
    return matches[0] if len(matches) == 1 else None


def forwarded_client(value: str) -> tuple[str, int] | None:
    """The `for=` node of an RFC 7239 Forwarded header as (ip, port), if it is an address."""
    for part in value.split(";"):
        k, _, v = part.strip().partition("=")
        if k.lower() != "for":
            continue
        v = v.strip('"')
        try:
            ip, port = parse_authority(v)
        except ZtunnelError:
            return None
        return str(ip), port
    return None


class InboundProxy:
    def __init__(self, ctx: ProxyContext) -> None:
        self.ctx = ctx
        self._warned_no_spoof = False

    def _connection_addresses(
        self, stream: HboneStream
    ) -> tuple[tuple[str, int], IPAddress | None]:
        transport = stream.connection.transport
        peer = transport.get_extra_info("peername") if transport else None
        local = transport.get_extra_info("sockname") if transport else None
        peer_t = (str(peer[0]), int(peer[1])) if peer else ("0.0.0.0", 0)
        local_ip = ipaddress.ip_address(local[0]) if local else None
        return peer_t, local_ip

    async def handle_stream(self, stream: HboneStream, req: ConnectRequested) -> None:
        ctx = self.ctx
        peer, local_ip = self._connection_addresses(stream)
        if ctx.node_ip is not None and peer[0] == str(ctx.node_ip):
            # Our own same-node dial (capture mode): the client is in `forwarded`.
            peer = forwarded_client(req.headers.get("forwarded", "")) or peer
        target_ip, target_port = req.target
        rec = ConnectionRecord(
            "inbound",
            peer,
            (str(target_ip), target_port),
            src_identity=stream.peer_identity,
            mtls=True,
            path="hbone",
        )
        rec.src_workload = ctx.store.current.workload_by_ip(peer[0])
        wl = ctx.local_workload(target_ip)
        rec.dst_workload = wl
        status = 0
        reason = ""
        if wl is None:
            status, reason, flag = 503, f"{target_ip} is not a workload on this node", "NR"
        elif (
            local_ip is not None
            and local_ip != target_ip
            and ((addressed := ctx.local_workload(local_ip)) is not None and addressed is not wl)
        ):
            status, reason, flag = 400, f"authority {target_ip} is not this workload", "NR"
        elif target_port in ctx.own_ports:
            status, reason, flag = 503, f"port {target_port} is the agent's own", "NR"
        else:
            rec.dst_identity = wl.identity
            rec.dst_service = guess_service(
                ctx.store.current, wl, target_port, req.headers.get("forwarded", "")
            )
            verdict = ctx.authorize(
                AuthzRequest(
                    stream.peer_identity, ipaddress.ip_address(peer[0]), target_ip, target_port, wl
                )
            )
            if not verdict.allowed:
                status, reason, flag = 401, f"denied by authorization: {verdict.reason}", "DENY"
        if status:
            stream.respond(status)
            self._fail(rec, reason, flag)
            return
        assert wl is not None
        try:
            sock, spoofed = await connect_from(
                req.target, ipaddress.ip_address(peer[0]), ctx.connect_timeout, ctx.transparent
            )
        except ProxyError as e:
            stream.respond(503)
            self._fail(rec, str(e), "CONNECT")
            return
        self._note_spoof(spoofed, peer[0])
        stream.respond(200)
        app = await TcpEnd.from_socket(sock)
        ctx.tracker.open(rec)
        try:
            await relay_stream(app, stream, rec, ctx.tracker, app_is_client=False)
        finally:
            ctx.tracker.close(rec)

    async def handle_plaintext(
        self, client: TcpEnd, src: tuple[IPAddress, int], dst: tuple[IPAddress, int]
    ) -> None:
        """Captured non-mesh traffic to a local workload (15006): no identity."""
        ctx = self.ctx
        rec = ConnectionRecord(
            "inbound", (str(src[0]), src[1]), (str(dst[0]), dst[1]), path="plaintext"
        )
        rec.src_workload = ctx.store.current.workload_by_ip(src[0])
        wl: Workload | None = ctx.local_workload(dst[0])
        rec.dst_workload = wl
        if wl is None:
            client.abort()
            return self._fail(rec, f"{dst[0]} is not a workload on this node", "NR")
        if dst[1] in ctx.own_ports:
            client.abort()
            return self._fail(rec, f"refusing a loop into the agent's own port {dst[1]}", "NR")
        rec.dst_identity = wl.identity
        rec.dst_service = guess_service(ctx.store.current, wl, dst[1], "")
        verdict = ctx.authorize(AuthzRequest(None, src[0], dst[0], dst[1], wl))
        if not verdict.allowed:
            client.abort()
            return self._fail(rec, f"denied by authorization: {verdict.reason}", "DENY")
        try:
            sock, spoofed = await connect_from(dst, src[0], ctx.connect_timeout, ctx.transparent)
        except ProxyError as e:
            client.abort()
            return self._fail(rec, str(e), "CONNECT")
        self._note_spoof(spoofed, str(src[0]))
        server = await TcpEnd.from_socket(sock)
        ctx.tracker.open(rec)
        try:
            await relay_tcp(client, server, rec, ctx.tracker)
        finally:
            ctx.tracker.close(rec)

    def tls_failed(self, peer: tuple[str, int], reason: str) -> None:
        """An inbound HBONE handshake or peer check failed: count and log it."""
        rec = ConnectionRecord(
            "inbound", (str(peer[0]), int(peer[1])), ("0.0.0.0", 0), path="hbone"
        )
        self._fail(rec, f"TLS: {reason}", "TLS_FAILURE")

    def _fail(self, rec: ConnectionRecord, reason: str, flag: str) -> None:
        rec.error = reason
        rec.response_flag = flag
        self.ctx.tracker.open(rec)
        self.ctx.tracker.close(rec)
        log.info("inbound %s:%d -> %s:%d refused: %s", *rec.src, *rec.dst, reason)

    def _note_spoof(self, spoofed: bool, client_ip: str) -> None:
        if not spoofed and not self._warned_no_spoof:
            self._warned_no_spoof = True
            log.warning(
                "cannot connect to applications from the original client address (%s): "
                "no IP_TRANSPARENT/route for it; using the agent's own address instead",
                client_ip,
            )
