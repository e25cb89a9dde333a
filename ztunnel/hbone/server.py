"""Server side of HBONE: accept TCP, pick the certificate of the workload the connection is
addressed to, complete TLS, check the client's trust domain, then serve CONNECT streams.

Admission control (`ztunnel.admission`) decides at each step: the global connection cap and
the pending-handshake caps (global, per source address) at accept, the handshake deadline,
the per-identity cap once the peer is verified, and the global cap again for each stream's
upstream connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import ssl
import struct
from collections.abc import Callable

from ztunnel.admission import Admission, AdmissionLimits, auto_max_connections
from ztunnel.certs import CertificateManager
from ztunnel.errors import ZtunnelError
from ztunnel.hbone.connection import HboneConnection, HboneStream, StreamHandler
from ztunnel.hbone.limits import H2Guard
from ztunnel.hbone.protocol import ConnectRequested, ErrorCode
from ztunnel.hbone.tls import ContextCache, check_client_identity
from ztunnel.identity import SpiffeId
from ztunnel.model import IPAddress

log = logging.getLogger(__name__)

_LINGER_RST = struct.pack("ii", 1, 0)
ACCEPT_BATCH = 256

IdentityLookup = Callable[[IPAddress], SpiffeId | None]
TlsFailureHook = Callable[[tuple[str, int], str], None]


class HboneServer:
    """Serves HBONE on listening sockets; `identity_for(local ip)` chooses the certificate."""

    def __init__(
        self,
        certs: CertificateManager,
        contexts: ContextCache,
        trust_domain: str,
        identity_for: IdentityLookup,
        handler: StreamHandler,
        on_tls_failure: TlsFailureHook | None = None,
        admission: Admission | None = None,
        guard: H2Guard | None = None,
    ) -> None:
        self.certs = certs
        self.contexts = contexts
        self.trust_domain = trust_domain
        self.identity_for = identity_for
        self.handler = handler
        self.on_tls_failure = on_tls_failure
        self.admission = admission or Admission(
            AdmissionLimits(max_connections=auto_max_connections(-1))
        )
        self.guard = guard or H2Guard()
        self.connections: set[HboneConnection] = set()
        self._accept_tasks: set[asyncio.Task[None]] = set()
        self._handshakes: set[asyncio.Task[None]] = set()
        self._sockets: list[socket.socket] = []
        self._accepting: dict[int, asyncio.Task[None]] = {}  # id(socket) -> its accept task
        self.draining = False

    def serve(self, sock: socket.socket) -> None:
        """Start accepting on an already bound and listening socket."""
        sock.setblocking(False)
        self._sockets.append(sock)
        host, port = sock.getsockname()[:2]
        name = f"hbone-accept {host}:{port}"
        task = asyncio.get_running_loop().create_task(self._accept_loop(sock), name=name)
        self._accept_tasks.add(task)
        self._accepting[id(sock)] = task

    def stop_serving(self, sock: socket.socket) -> None:
        """Stop accepting on one socket and close it (its workload left the node); the
        address can be listened on again at once."""
        task = self._accepting.pop(id(sock), None)
        if task is not None:
            task.cancel()
            self._accept_tasks.discard(task)
        if sock in self._sockets:
            self._sockets.remove(sock)
        sock.close()

    async def _accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn_sock, peer = await loop.sock_accept(sock)
            except (OSError, asyncio.CancelledError) as e:
                if isinstance(e, asyncio.CancelledError) or self.draining:
                    return
                log.warning("accept failed: %s", e)
                await asyncio.sleep(0.05)
                continue
            self._accepted(conn_sock, peer)
            # Take what else is queued without a trip through the event loop per connection:
            # a flood is shed (or admitted) at the speed it arrives.
            for _ in range(ACCEPT_BATCH):
                try:
                    conn_sock, peer = sock.accept()
                except OSError:
                    break
                conn_sock.setblocking(False)
                self._accepted(conn_sock, peer)

    def _accepted(self, conn_sock: socket.socket, peer: tuple[str, int]) -> None:
        if not self._admit(conn_sock, peer[0]):
            return
        t = asyncio.get_running_loop().create_task(
            self._handshake(conn_sock, peer), name=f"hbone-tls {peer[0]}"
        )
        self._handshakes.add(t)
        t.add_done_callback(self._handshakes.discard)

    def _admit(self, sock: socket.socket, source: str) -> bool:
        """Take a connection unit and a handshake slot, or reset the connection at once."""
        adm = self.admission
        if adm.admit("HBONE connection", source):
            if adm.begin_handshake(source):
                return True
            adm.release()
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        sock.close()
        return False

    async def _handshake(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        """Owns the admission taken in `_admit`: the handshake slot until the handshake ends,
        the connection unit until the connection closes."""
        conn: HboneConnection | None = None
        try:
            async with asyncio.timeout(self.admission.limits.handshake_timeout):
                conn = await self._establish(sock, peer)
        except TimeoutError:
            self.admission.handshake_timed_out(f"{peer[0]}:{peer[1]}")
            if self.on_tls_failure:
                self.on_tls_failure(peer, "handshake deadline exceeded")
            sock.close()
        finally:
            self.admission.end_handshake(peer[0])
            if conn is None:
                self.admission.release()
        if conn is not None:
            self._serve(conn, peer)

    async def _establish(
        self, sock: socket.socket, peer: tuple[str, int]
    ) -> HboneConnection | None:
        loop = asyncio.get_running_loop()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        local_ip = ipaddress.ip_address(sock.getsockname()[0])
        identity = self.identity_for(local_ip)
        if identity is None:
            log.info("HBONE connection from %s to %s: no local workload there", peer[0], local_ip)
            sock.close()
            return None
        try:
            cert = await self.certs.get(identity)
        except ZtunnelError as e:
            log.warning("no certificate for %s, refusing HBONE from %s: %s", identity, peer[0], e)
            sock.close()
            return None
        ctx = self.contexts.server(cert)
        made: list[HboneConnection] = []

        def factory() -> HboneConnection:
            c = HboneConnection(
                client=False,
                handler=self._handle_stream,
                name=f"hbone-server {peer[0]}:{peer[1]}",
                peer_check=lambda der: check_client_identity(der, self.trust_domain),
                guard=self.guard,
            )
            made.append(c)
            return c

        try:
            # The protocol comes from the factory: uvloop returns its SSL wrapper instead.
            # The deadline is the caller's; this one only backs it up.
            await loop.connect_accepted_socket(
                factory,
                sock,
                ssl=ctx,
                ssl_handshake_timeout=self.admission.limits.handshake_timeout + 1.0,
            )
        except asyncio.CancelledError:
            for c in made:
                c.abort()
            raise
        except (ssl.SSLError, OSError, ConnectionError) as e:
            log.info("TLS handshake from %s:%d failed: %s", peer[0], peer[1], e)
            if self.on_tls_failure:
                self.on_tls_failure(peer, str(e))
            sock.close()
            return None
        conn = made[0]
        if conn.peer_identity is None:
            log.info("HBONE client %s:%d rejected: %s", peer[0], peer[1], conn.failure)
            if self.on_tls_failure:
                self.on_tls_failure(peer, conn.failure or "no peer identity")
            conn.abort()
            return None
        return conn

    def _serve(self, conn: HboneConnection, peer: tuple[str, int]) -> None:
        """A verified connection: count it against its identity's cap, then serve it."""
        adm = self.admission
        identity = str(conn.peer_identity)
        if not adm.admit_identity(identity, f"{peer[0]}:{peer[1]}"):
            conn.refuse(ErrorCode.ENHANCE_YOUR_CALM)
            conn.closed.add_done_callback(lambda _f: adm.release())
            return
        if self.draining:
            conn.goaway()
        self.connections.add(conn)

        def gone(_f: object) -> None:
            self.connections.discard(conn)
            adm.release_identity(identity)
            adm.release()

        conn.closed.add_done_callback(gone)

    async def _handle_stream(self, stream: HboneStream, req: ConnectRequested) -> None:
        """Each stream's upstream connection counts against the global cap (503 when full)."""
        peer = stream.peer_identity
        if not self.admission.admit("HBONE stream", str(peer)):
            stream.respond(503)
            return
        try:
            await self.handler(stream, req)
        finally:
            self.admission.release()

    def stop_accepting(self) -> None:
        self.draining = True
        for t in self._accept_tasks:
            t.cancel()
        for s in self._sockets:
            s.close()
        self._sockets.clear()

    async def drain(self, grace: float) -> None:
        """Stop accepting, GOAWAY every connection, wait up to `grace`, then abort the rest."""
        self.stop_accepting()
        for t in list(self._handshakes):
            t.cancel()
        conns = list(self.connections)
        for c in conns:
            c.goaway()
        await asyncio.gather(*(c.wait_closed(grace) for c in conns), return_exceptions=True)
