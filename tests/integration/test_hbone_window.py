"""Flow-control accounting across stream failures: data that was received but will never be
read must give its window back, or the connection's shared 16 MiB window leaks away and every
later stream on the pooled connection stalls (found by the benchmark with iperf3 -P 8)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import pytest

from ztunnel.ca import CertificateAuthority
from ztunnel.certs import CertificateManager, LocalCaSource
from ztunnel.errors import HboneError
from ztunnel.hbone.connection import CLOSE_GRACE, HboneStream
from ztunnel.hbone.headers import ConnectRequest
from ztunnel.hbone.pool import HbonePool, PoolKey
from ztunnel.hbone.protocol import ConnectRequested
from ztunnel.hbone.server import HboneServer
from ztunnel.hbone.tls import ContextCache
from ztunnel.identity import SpiffeId
from ztunnel.testing import async_wait_for, random_loopback_net

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
A = SpiffeId("cluster.local", "a", "a")
B = SpiffeId("cluster.local", "b", "b")


async def test_reset_streams_with_unread_data_do_not_leak_the_connection_window() -> None:
    certs = CertificateManager(LocalCaSource(CertificateAuthority.create()))
    ctxs = ContextCache()
    held: list[HboneStream] = []

    async def handler(stream: HboneStream, req: ConnectRequested) -> None:
        stream.respond(200)
        if req.target[1] == 1:
            # "stuck" streams: never read, then reset with the data still queued
            held.append(stream)
            return
        total = 0
        while data := await stream.read():
            total += len(data)
            stream.ack(len(data))
        await stream.write(str(total).encode())
        stream.end()

    ip = f"{random_loopback_net()}.1"
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((ip, 0))
    ls.listen(16)
    srv = HboneServer(certs, ctxs, "cluster.local", lambda _ip: B, handler)
    srv.serve(ls)
    pool = HbonePool(certs, ctxs, connect_timeout=5)
    key = PoolKey(A, frozenset({B}), (ipaddress.ip_address(ip), ls.getsockname()[1]), None)
    try:
        # Four streams push 4 MiB each (their whole stream window) that nobody reads: the
        # 16 MiB connection window is used up...
        for _ in range(4):
            s = await pool.open_stream(key, ConnectRequest(f"{ip}:1"))
            await asyncio.wait_for(s.write(bytes(4 * MiB)), 10)
        await async_wait_for(
            lambda: len(held) == 4 and all(h.bytes_received == 4 * MiB for h in held), 10
        )
        # ...then the server gives up on them.
        for h in held:
            h.reset()
        # A new stream on the same pooled connection must still move more than 16 MiB.
        s = await pool.open_stream(key, ConnectRequest(f"{ip}:2"))
        await asyncio.wait_for(s.write(bytes(20 * MiB)), 15)
        s.end()
        reply = b""
        while data := await asyncio.wait_for(s.read(), 10):
            reply += data
            s.ack(len(data))
        assert reply == str(20 * MiB).encode()
        assert pool.stats()["created"] == 1  # the same connection carried everything
    finally:
        await pool.close(1)
        await srv.drain(1)
        await certs.close()


async def test_an_unanswered_connect_times_out_with_504_and_resets_only_its_stream() -> None:
    """The CONNECT response deadline: a server that never answers one stream costs the client
    that stream (504, RST_STREAM so the server's handler stops), not the connection."""
    certs = CertificateManager(LocalCaSource(CertificateAuthority.create()))
    ctxs = ContextCache()
    stopped = asyncio.Event()

    async def handler(stream: HboneStream, req: ConnectRequested) -> None:
        if req.target[1] == 2:
            stream.respond(200)
            stream.end()
            return
        try:
            await asyncio.Event().wait()  # never answers
        finally:
            stopped.set()

    ip = f"{random_loopback_net()}.1"
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((ip, 0))
    ls.listen(16)
    srv = HboneServer(certs, ctxs, "cluster.local", lambda _ip: B, handler)
    srv.serve(ls)
    pool = HbonePool(certs, ctxs, connect_timeout=0.5)
    key = PoolKey(A, frozenset({B}), (ipaddress.ip_address(ip), ls.getsockname()[1]), None)
    try:
        with pytest.raises(HboneError) as exc:
            await asyncio.wait_for(pool.open_stream(key, ConnectRequest(f"{ip}:1")), 10)
        assert exc.value.status == 504
        await asyncio.wait_for(stopped.wait(), 10)  # the reset reached the server's handler
        s = await asyncio.wait_for(pool.open_stream(key, ConnectRequest(f"{ip}:2")), 10)
        assert await asyncio.wait_for(s.read(), 10) == b""
        assert pool.stats()["created"] == 1
    finally:
        await pool.close(1)
        await srv.drain(1)
        await certs.close()


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"], indirect=True)
async def test_a_slow_reader_gets_the_whole_tail_after_the_server_closes(
    loop: asyncio.AbstractEventLoop,
) -> None:
    """The server drains (GOAWAY), finishes a stream with 6 MiB still queued for a client that
    reads its socket slowly, and closes: the connection is aborted only if the peer stops
    reading, so this client still gets every byte and the end of the stream."""
    import h2.config
    import h2.connection
    import h2.events
    import h2.settings

    from tests.integration.conftest import tls_context

    ca = CertificateAuthority.create()
    certs = CertificateManager(LocalCaSource(ca))
    ctxs = ContextCache()
    size = 6 * MiB

    async def handler(stream: HboneStream, req: ConnectRequested) -> None:
        stream.respond(200)
        await stream.write(bytes(size))
        stream.end()

    ip = f"{random_loopback_net()}.1"
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((ip, 0))
    ls.listen(16)
    srv = HboneServer(certs, ctxs, "cluster.local", lambda _ip: B, handler)
    srv.serve(ls)
    # A client whose windows take the whole tail at once, reading its socket at ~2 MiB/s
    # (its StreamReader stops reading the socket beyond 128 KiB unread).
    r, w = await asyncio.open_connection(
        ip, ls.getsockname()[1], ssl=tls_context(ca.issue(A)), server_hostname="", limit=65536
    )
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    conn.local_settings = h2.settings.Settings(
        client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 16 * MiB}
    )
    conn.initiate_connection()
    conn.increment_flow_control_window(16 * MiB)
    conn.send_headers(1, [(b":method", b"CONNECT"), (b":authority", f"{ip}:1".encode())])
    conn.end_stream(1)
    w.write(conn.data_to_send())
    got, ended = 0, False
    drain: asyncio.Future[None] | None = None
    try:
        async with asyncio.timeout(30):
            while not ended:
                data = await r.read(65536)
                assert data, f"connection closed after {got} bytes"
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.ResponseReceived) and drain is None:
                        drain = asyncio.ensure_future(srv.drain(30))
                        t0 = loop.time()
                    elif isinstance(ev, h2.events.DataReceived):
                        got += len(ev.data)
                        conn.acknowledge_received_data(ev.flow_controlled_length, 1)
                    elif isinstance(ev, h2.events.StreamEnded):
                        ended = True
                w.write(conn.data_to_send())
                await asyncio.sleep(0.03)
        assert got == size
        # Slower than a failed connection's close grace: that abort would have cut it.
        assert loop.time() - t0 > CLOSE_GRACE + 0.5
        assert drain is not None
        await asyncio.wait_for(drain, 10)
    finally:
        w.close()
        await srv.drain(1)
        await certs.close()
