"""Client side of HBONE: dialing peers and pooling connections (shared/WIRE.md).

Pool key = (source identity, expected destination identities, next hop, source IP). A
connection serves at most 100 streams over its life, then a new one is opened for the key;
creation is single-flight per key; connections idle for 5 minutes are released.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import ssl
from dataclasses import dataclass

from ztunnel.certs import CertificateManager
from ztunnel.errors import HboneError, ZtunnelError
from ztunnel.hbone.connection import HboneConnection, HboneStream
from ztunnel.hbone.headers import ConnectRequest
from ztunnel.hbone.limits import H2Guard
from ztunnel.hbone.tls import ContextCache, check_server_identity
from ztunnel.identity import SpiffeId
from ztunnel.model import IPAddress

log = logging.getLogger(__name__)

IDLE_TIMEOUT = 300.0
IP_TRANSPARENT = 19


class TlsFailure(HboneError):
    """The TLS handshake or the peer identity check failed (telemetry flag TLS_FAILURE)."""


@dataclass(frozen=True, slots=True)
class PoolKey:
    source_identity: SpiffeId
    expected_identities: frozenset[SpiffeId]
    next_hop: tuple[IPAddress, int]
    source_ip: IPAddress | None
    # SO_MARK for the connection: set when the agent dials its own node's listener in
    # capture mode (the mark routes it to local delivery, like a captured packet).
    mark: int = 0


class HbonePool:
    """Opens, shares and releases client HBONE connections."""

    def __init__(
        self,
        certs: CertificateManager,
        contexts: ContextCache,
        connect_timeout: float = 10.0,
        idle_timeout: float = IDLE_TIMEOUT,
        transparent_source: bool = False,
        guard: H2Guard | None = None,
    ) -> None:
        self.certs = certs
        # The HTTP/2 abuse limits apply to the servers we dial as well.
        self.guard = guard or H2Guard()
        self.contexts = contexts
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.transparent_source = transparent_source
        self._conns: dict[PoolKey, list[HboneConnection]] = {}
        self._creating: dict[PoolKey, asyncio.Future[HboneConnection]] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._closed = False
        self.connections_created = 0

    async def open_stream(self, key: PoolKey, request: ConnectRequest) -> HboneStream:
        """A CONNECT stream that the peer answered with 200 (else ConnectRejected)."""
        conn = await self._connection(key)
        return await conn.connect(request, self.connect_timeout)

    async def _connection(self, key: PoolKey) -> HboneConnection:
        while True:
            if self._closed:
                raise HboneError("pool is closed", 503)
            conns = self._conns.get(key, [])
            for c in conns:
                if c.available:
                    return c
            pending = self._creating.get(key)
            if pending is not None:
                # Single flight: share the connection being created for this key.
                await asyncio.shield(pending)
                continue
            fut: asyncio.Future[HboneConnection] = asyncio.get_running_loop().create_future()
            self._creating[key] = fut
            try:
                conn = await self._dial(key)
            except BaseException as e:
                if not fut.done():
                    fut.set_exception(e if isinstance(e, Exception) else HboneError(str(e), 503))
                    fut.exception()
                raise
            finally:
                self._creating.pop(key, None)
            self._conns.setdefault(key, []).append(conn)
            conn.closed.add_done_callback(functools.partial(self._forget_cb, key, conn))
            fut.set_result(conn)
            self._ensure_sweeper()
            return conn

    def _forget_cb(self, key: PoolKey, conn: HboneConnection, _f: object) -> None:
        self._forget(key, conn)

    def _forget(self, key: PoolKey, conn: HboneConnection) -> None:
        conns = self._conns.get(key)
        if conns and conn in conns:
            conns.remove(conn)
            if not conns:
                del self._conns[key]

    async def _dial(self, key: PoolKey) -> HboneConnection:
        loop = asyncio.get_running_loop()
        cert = await self.certs.get(key.source_identity)
        ctx = self.contexts.client(cert)
        ip, port = key.next_hop
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        name = f"hbone-client {key.source_identity.principal} -> {ip}:{port}"
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if key.mark:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, key.mark)
            if key.source_ip is not None:
                if self.transparent_source:
                    sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
                sock.bind((str(key.source_ip), 0))
            await asyncio.wait_for(loop.sock_connect(sock, (str(ip), port)), self.connect_timeout)
        except TimeoutError:
            sock.close()
            raise HboneError(f"connect to {ip}:{port} timed out", 503) from None
        except OSError as e:
            sock.close()
            raise HboneError(f"connect to {ip}:{port} failed: {e.strerror or e}", 503) from None
        try:
            # server_hostname is an IP literal: OpenSSL sends no SNI for it (WIRE.md: no SNI),
            # and check_hostname is off: the SPIFFE check below is what authenticates.
            made: list[HboneConnection] = []

            def factory() -> HboneConnection:
                c = HboneConnection(
                    client=True,
                    name=name,
                    peer_check=lambda der: check_server_identity(der, key.expected_identities),
                    guard=self.guard,
                )
                made.append(c)
                return c

            # The protocol comes from the factory (uvloop may return its SSL wrapper).
            await loop.create_connection(
                factory,
                sock=sock,
                ssl=ctx,
                server_hostname=str(ip),
                ssl_handshake_timeout=self.connect_timeout,
            )
        except (ssl.SSLError, ConnectionError, TimeoutError, OSError) as e:
            sock.close()
            raise TlsFailure(f"TLS handshake with {ip}:{port} failed: {e}", 503) from None
        conn = made[0]
        if conn.peer_identity is None:
            conn.abort()
            raise TlsFailure(f"{ip}:{port}: {conn.failure or 'no peer identity'}", 503)
        self.connections_created += 1
        return conn

    def _ensure_sweeper(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(
                self._sweep(), name="hbone-pool-sweeper"
            )

    async def _sweep(self) -> None:
        while self._conns and not self._closed:
            await asyncio.sleep(min(30.0, self.idle_timeout / 2))
            now = asyncio.get_running_loop().time()
            for conns in list(self._conns.values()):
                for c in list(conns):
                    if not c.streams and (c.exhausted or now - c.last_active > self.idle_timeout):
                        c.goaway()

    def stats(self) -> dict[str, int]:
        conns = [c for cs in self._conns.values() for c in cs]
        return {
            "connections": len(conns),
            "streams": sum(len(c.streams) for c in conns),
            "created": self.connections_created,
        }

    async def close(self, grace: float = 5.0) -> None:
        """GOAWAY every connection, wait up to `grace` for streams to finish, then abort."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        conns = [c for cs in self._conns.values() for c in cs]
        for c in conns:
            c.goaway()
        await asyncio.gather(*(c.wait_closed(grace) for c in conns), return_exceptions=True)


__all__ = ["HbonePool", "PoolKey", "TlsFailure", "ZtunnelError"]
