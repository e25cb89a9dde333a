"""Server side of HBONE: accept TCP, pick the certificate of the workload the connection is
addressed to, complete TLS, check the client's trust domain, then serve CONNECT streams."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
from collections.abc import Callable

from ztunnel.certs import CertificateManager
from ztunnel.errors import ZtunnelError
from ztunnel.hbone.connection import HboneConnection, StreamHandler
from ztunnel.hbone.tls import ContextCache, check_client_identity
from ztunnel.identity import SpiffeId
from ztunnel.model import IPAddress

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0

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
    ) -> None:
        self.certs = certs
        self.contexts = contexts
        self.trust_domain = trust_domain
        self.identity_for = identity_for
        self.handler = handler
        self.on_tls_failure = on_tls_failure
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
            t = loop.create_task(self._handshake(conn_sock, peer), name=f"hbone-tls {peer[0]}")
            self._handshakes.add(t)
            t.add_done_callback(self._handshakes.discard)

    async def _handshake(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        local_ip = ipaddress.ip_address(sock.getsockname()[0])
        identity = self.identity_for(local_ip)
        if identity is None:
            log.info("HBONE connection from %s to %s: no local workload there", peer[0], local_ip)
            sock.close()
            return
        try:
            cert = await self.certs.get(identity)
        except ZtunnelError as e:
            log.warning("no certificate for %s, refusing HBONE from %s: %s", identity, peer[0], e)
            sock.close()
            return
        ctx = self.contexts.server(cert)
        made: list[HboneConnection] = []

        def factory() -> HboneConnection:
            c = HboneConnection(
                client=False,
                handler=self.handler,
                name=f"hbone-server {peer[0]}",
                peer_check=lambda der: check_client_identity(der, self.trust_domain),
            )
            made.append(c)
            return c

        try:
            # The protocol comes from the factory: uvloop returns its SSL wrapper instead.
            await loop.connect_accepted_socket(
                factory,
                sock,
                ssl=ctx,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
            )
        except (ssl.SSLError, OSError, TimeoutError, ConnectionError) as e:
            log.info("TLS handshake from %s:%d failed: %s", peer[0], peer[1], e)
            if self.on_tls_failure:
                self.on_tls_failure(peer, str(e))
            sock.close()
            return
        conn = made[0]
        if conn.peer_identity is None:
            log.info("HBONE client %s:%d rejected: %s", peer[0], peer[1], conn.failure)
            if self.on_tls_failure:
                self.on_tls_failure(peer, conn.failure or "no peer identity")
            conn.abort()
            return
        if self.draining:
            conn.goaway()
        self.connections.add(conn)
        conn.closed.add_done_callback(lambda _f: self.connections.discard(conn))

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
