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
from ztunnel.hbone.connection import HboneStream
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
