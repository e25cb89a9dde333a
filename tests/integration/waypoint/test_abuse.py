"""Bad input to the waypoint, through the mesh as a real client would send it: malformed
requests, oversized heads, Content-Length + Transfer-Encoding (smuggling), slow heads. Each
gets a clear 4xx and a closed connection; other clients are served meanwhile."""

from __future__ import annotations

import asyncio

import pytest

from tests.integration.waypoint.conftest import WaypointMesh
from ztunnel.testing import socks5_connect

pytestmark = pytest.mark.integration


async def _raw(m: WaypointMesh, data: bytes, wait: float = 5.0) -> bytes:
    r, w = await socks5_connect(("127.0.0.1", m.socks), m.vip, 80, source_ip=m.ip(1))
    w.write(data)
    try:
        out = b""
        async with asyncio.timeout(wait):
            while chunk := await r.read(65536):
                out += chunk
        return out
    finally:
        w.close()


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (
            b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"400",
        ),
        (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", b"400"),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", b"431"),
        (b"G@T / HTTP/1.1\r\nHost: x\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", b"501"),
    ],
    ids=["cl-and-te", "two-cl", "oversized-head", "bad-method", "unknown-te"],
)
async def test_bad_requests_get_4xx_and_close(
    wmesh: WaypointMesh, request_bytes: bytes, status: bytes
) -> None:
    out = await _raw(wmesh, request_bytes)
    assert out.startswith(b"HTTP/1.1 " + status), out[:200]
    assert b"connection: close" in out.lower()
    # Nothing reached a backend, and the next client is served normally.
    assert not any(b.requests for b in wmesh.backends.values())
    st, _h, _b = await wmesh.curl()
    assert st == 200


async def test_slow_head_gets_408_while_others_are_served(wmesh: WaypointMesh) -> None:
    r, w = await socks5_connect(("127.0.0.1", wmesh.socks), wmesh.vip, 80, source_ip=wmesh.ip(1))
    w.write(b"GET / HTTP/1.1\r\nHo")
    results = await asyncio.gather(*(wmesh.curl() for _ in range(3)))
    assert [s for s, _h, _b in results] == [200, 200, 200]
    async with asyncio.timeout(10):
        out = await r.read()
    w.close()
    assert out.startswith(b"HTTP/1.1 408")


async def test_http2_garbage_after_preface_closes_only_that_connection(wmesh: WaypointMesh) -> None:
    out = await _raw(
        wmesh, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x04\x09\x00\x00\x00\x00\x01junk"
    )
    # The waypoint's SETTINGS, then a GOAWAY; never a response.
    assert b"HTTP/1.1" not in out
    st, _h, _b = await wmesh.curl()
    assert st == 200
