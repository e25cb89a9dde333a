"""Loopback fixtures: two in-process node agents on one event loop, echo servers, and raw
HBONE clients built from hand-made certificates.

Layout (127.X.Y = a random net per test): node-a hosts client-a (.1, frontend/web) and echo-a
(.2, shop/echo); node-b hosts echo-b (.11, shop/echo) and legacy-b (.12, plain TCP). Service
echo.shop (VIP .100, port 80 -> 8080) is backed by echo-a and echo-b. Echo servers listen on
.2, .11 and .12 port 8080. Both agents share one CA directory and one HBONE port; SOCKS5 and
the capture ports are unique; admin, metrics and readiness are off.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import ssl
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest
import yaml

from ztunnel import demo
from ztunnel.app import Agent
from ztunnel.ca import CertificateAuthority, IssuedCertificate
from ztunnel.config import Settings
from ztunnel.hbone.connection import HboneStream
from ztunnel.hbone.headers import ConnectRequest
from ztunnel.hbone.pool import HbonePool, PoolKey
from ztunnel.hbone.tls import ContextCache
from ztunnel.identity import SpiffeId
from ztunnel.testing import (
    EchoServer,
    async_wait_for,
    random_loopback_net,
    socks5_connect,
)

WEB = SpiffeId("cluster.local", "frontend", "web")
ECHO = SpiffeId("cluster.local", "shop", "echo")
ECHO_HOST = "echo.shop.svc.cluster.local"
MiB = 1024 * 1024


def mesh_config(net: str) -> dict[str, Any]:
    """Two nodes: client-a and echo-a on node-a, echo-b and legacy-b (TCP) on node-b, and the
    echo service over both echoes (the demo's mesh, without its policy)."""
    return demo.mesh_config(net, with_policy=False)


def distinct_ports(n: int) -> list[int]:
    """`n` free ports, all different: each is held open until all are chosen (free_port()
    called twice may return the same port)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


class FixedCerts:
    """Stands in for a CertificateManager: always this certificate, no renewal."""

    def __init__(self, cert: IssuedCertificate) -> None:
        self.cert = cert

    async def get(self, identity: SpiffeId) -> IssuedCertificate:
        return self.cert


def tls_context(cert: IssuedCertificate, server: bool = False) -> ssl.SSLContext:
    """An ssl context of our own (not the agent's code): the chain, the roots, ALPN h2."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=cert.root_pem.decode())
    with tempfile.NamedTemporaryFile(suffix=".pem") as f:
        f.write(cert.key_pem + cert.cert_chain_pem)
        f.flush()
        ctx.load_cert_chain(f.name)
    ctx.set_alpn_protocols(["h2"])
    return ctx


@dataclass
class H2Answer:
    status: int | None
    reset: int | None = None
    closed: bool = False


async def h2_request(
    addr: tuple[str, int],
    cert: IssuedCertificate,
    headers: list[tuple[str, str]],
    within: float = 10.0,
) -> H2Answer:
    """One HTTP/2 request with python-hyper h2 directly over our own TLS: the status the
    peer answered, or the RST_STREAM code, or that the connection closed."""
    r, w = await asyncio.wait_for(
        asyncio.open_connection(addr[0], addr[1], ssl=tls_context(cert), server_hostname=""), within
    )
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    conn.initiate_connection()
    conn.send_headers(1, headers, end_stream=False)
    w.write(conn.data_to_send())
    answer = H2Answer(None)
    try:
        async with asyncio.timeout(within):
            while answer.status is None and answer.reset is None:
                data = await r.read(65536)
                if not data:
                    answer.closed = True
                    break
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.ResponseReceived):
                        answer.status = int(dict(ev.headers)[b":status"])
                    elif isinstance(ev, h2.events.StreamReset):
                        answer.reset = int(ev.error_code)
                    elif isinstance(ev, h2.events.ConnectionTerminated):
                        answer.closed = True
                w.write(conn.data_to_send())
    finally:
        w.close()
        with contextlib.suppress(Exception):
            await w.wait_closed()
    return answer


@dataclass
class Mesh:
    tmp: Path
    net: str = field(default_factory=random_loopback_net)
    # hbone (shared), then outbound, inbound and SOCKS5 for node-a and for node-b
    ports: list[int] = field(default_factory=lambda: distinct_ports(7))
    a: Agent = field(init=False)
    b: Agent = field(init=False)
    ca: CertificateAuthority = field(init=False)
    echo: dict[str, EchoServer] = field(default_factory=dict)
    pools: list[HbonePool] = field(default_factory=list)
    servers: list[asyncio.AbstractServer] = field(default_factory=list)

    def ip(self, host: int) -> str:
        return f"{self.net}.{host}"

    @property
    def client_ip(self) -> str:
        return self.ip(1)

    @property
    def echo_b(self) -> str:
        return self.ip(11)

    @property
    def hbone_port(self) -> int:
        return self.ports[0]

    @property
    def mesh_file(self) -> Path:
        return self.tmp / "mesh.yaml"

    def settings(self, node: str) -> Settings:
        outbound, inbound, socks = self.ports[1:4] if node == "node-a" else self.ports[4:7]
        return Settings(
            node_name=node,
            local_xds_path=str(self.mesh_file),
            ca_dir=str(self.tmp / "ca"),
            hbone_port=self.hbone_port,
            outbound_port=outbound,
            inbound_plaintext_port=inbound,
            socks5_port=socks,
            admin_port=0,
            stats_port=0,
            readiness_port=0,
            connect_timeout=5.0,
            drain_timeout=5.0,
            reload_interval=0.05,
        )

    async def start(self) -> None:
        self.ca = CertificateAuthority.create("cluster.local")
        self.ca.save(self.tmp / "ca")
        self.mesh_file.write_text(yaml.safe_dump(mesh_config(self.net)))
        for name, host in (("echo-a", 2), ("echo-b", 11), ("legacy-b", 12)):
            self.echo[name] = await EchoServer(self.ip(host), 8080).start()
        self.a = Agent(self.settings("node-a"))
        self.b = Agent(self.settings("node-b"))
        for agent in (self.a, self.b):
            await agent.start()
        for agent in (self.a, self.b):
            await async_wait_for(lambda ag=agent: ag.wanted_listeners() <= set(ag.listeners), 10)  # type: ignore[misc]

    async def close(self) -> None:
        for pool in self.pools:
            with contextlib.suppress(Exception):
                await pool.close(1.0)
        for srv in self.servers:
            srv.close()
        for agent in (getattr(self, "a", None), getattr(self, "b", None)):
            if agent is not None:
                with contextlib.suppress(Exception):
                    await agent.drain(1.0)
        for e in self.echo.values():
            await e.close()

    # ---- traffic ----

    async def socks(
        self, dest: str, port: int, src: str | None = None, via: Agent | None = None
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        agent = via or self.a
        return await socks5_connect(
            ("127.0.0.1", agent.settings.socks5_port), dest, port, source_ip=src or self.client_ip
        )

    async def serve(self, host: str, handler: Any, port: int = 0, rcvbuf: int | None = None) -> int:
        """An application server of the test's own on a workload IP; returns its port."""
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.bind((host, port))
        sock.listen(512)
        srv = await asyncio.start_server(handler, sock=sock, limit=1 << 20)
        self.servers.append(srv)
        return int(sock.getsockname()[1])

    # ---- raw HBONE clients with hand-made certificates ----

    def issue(self, identity: SpiffeId, **kw: Any) -> IssuedCertificate:
        return self.ca.issue(identity, **kw)

    def pool(self, cert: IssuedCertificate) -> HbonePool:
        pool = HbonePool(FixedCerts(cert), ContextCache(), connect_timeout=5.0)  # type: ignore[arg-type]
        self.pools.append(pool)
        return pool

    async def hbone(
        self,
        cert: IssuedCertificate,
        authority: str,
        expect: frozenset[SpiffeId] = frozenset({ECHO}),
        next_hop: str | None = None,
        port: int | None = None,
    ) -> HboneStream:
        """CONNECT `authority` through echo-b's HBONE listener (or `next_hop`:`port`)."""
        import ipaddress

        hop = (ipaddress.ip_address(next_hop or self.echo_b), port or self.hbone_port)
        key = PoolKey(cert.identity, expect, hop, None)
        return await self.pool(cert).open_stream(key, ConnectRequest(authority))


@pytest.fixture
def loop(request: pytest.FixtureRequest) -> Iterator[asyncio.AbstractEventLoop]:
    """uvloop, as `ztunnel run` uses; `@pytest.mark.parametrize("loop", [...], indirect=True)`
    selects "asyncio" too."""
    kind = getattr(request, "param", "uvloop")
    if kind == "uvloop":
        import uvloop

        lp: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    else:
        lp = asyncio.new_event_loop()
    try:
        yield lp
    finally:
        pending = [t for t in asyncio.all_tasks(lp) if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            with contextlib.suppress(Exception):
                lp.run_until_complete(
                    asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), 10)
                )
        lp.close()


@pytest.fixture
def mesh(loop: asyncio.AbstractEventLoop, tmp_path: Path) -> Iterator[Mesh]:
    m = Mesh(tmp_path)
    try:
        loop.run_until_complete(asyncio.wait_for(m.start(), 30))
        yield m
    finally:
        loop.run_until_complete(asyncio.wait_for(m.close(), 30))


# ---- byte streams that are hashed, never held whole ---------------------------------------


class Pattern:
    """A pseudo-random byte stream from a seed, produced chunk by chunk with its SHA-256."""

    def __init__(self, seed: int, size: int, chunk: int = 256 * 1024) -> None:
        self.size = size
        self.chunk = chunk
        self._block = hashlib.shake_256(seed.to_bytes(8, "big")).digest(4 * MiB)

    def chunks(self) -> Iterator[bytes]:
        sent = 0
        block = self._block
        i = 0
        while sent < self.size:
            n = min(self.chunk, self.size - sent)
            start = (i * 7919 * 4096) % (len(block) - n)
            yield block[start : start + n]
            sent += n
            i += 1

    def digest(self) -> str:
        h = hashlib.sha256()
        for c in self.chunks():
            h.update(c)
        return h.hexdigest()


@pytest.fixture
def h2_client() -> Any:
    """`await h2_client((ip, port), cert, headers)` -> H2Answer (status / reset / closed)."""
    return h2_request


@pytest.fixture
def pattern() -> type[Pattern]:
    return Pattern


@pytest.fixture
def random_payload() -> Any:
    return lambda n: os.urandom(n)
