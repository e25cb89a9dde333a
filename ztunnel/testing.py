"""Small building blocks shared by the demo, the lab and the tests: echo servers, a SOCKS5
client, free ports, and waiting with a deadline (never sleeping to synchronise)."""

from __future__ import annotations

import asyncio
import ipaddress
import random
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field


def random_loopback_net() -> str:
    """A random 127.X.Y prefix so parallel runs do not collide."""
    return f"127.{random.randint(16, 250)}.{random.randint(1, 250)}"


def free_port(ip: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return int(s.getsockname()[1])


def free_ports(n: int, ip: str = "127.0.0.1") -> list[int]:
    """`n` distinct free ports: all are held open until all are chosen (two calls of
    `free_port` may return the same port)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((ip, 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout:.1f}s")
        time.sleep(interval)


async def async_wait_for(
    predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout:.1f}s")
        await asyncio.sleep(interval)


def port_open(ip: str, port: int) -> bool:
    try:
        with socket.create_connection((ip, port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass
class EchoServer:
    """Echoes everything back, optionally prefixed with `hello` once; records peers."""

    ip: str
    port: int
    hello: bytes = b""
    accepted: int = 0
    peers: list[tuple[str, int]] = field(default_factory=list)
    server: asyncio.AbstractServer | None = None

    async def start(self) -> EchoServer:
        self.server = await asyncio.start_server(
            self._handle, self.ip, self.port, reuse_address=True, limit=1 << 20
        )
        return self

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.accepted += 1
        peer = w.get_extra_info("peername")
        self.peers.append((peer[0], peer[1]))
        try:
            if self.hello:
                w.write(self.hello)
            while data := await r.read(1 << 20):
                w.write(data)
                await w.drain()
            if w.can_write_eof():
                w.write_eof()
            await w.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            w.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


class SocksRefused(Exception):
    def __init__(self, code: int) -> None:
        self.code = code
        super().__init__(f"SOCKS5 reply {code}")


async def socks5_connect(
    proxy: tuple[str, int],
    host: str,
    port: int,
    source_ip: str | None = None,
    timeout: float = 10.0,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a connection through a SOCKS5 proxy from `source_ip`; SocksRefused on failure."""
    local = (source_ip, 0) if source_ip else None
    r, w = await asyncio.wait_for(
        asyncio.open_connection(proxy[0], proxy[1], local_addr=local, limit=1 << 20), timeout
    )
    w.write(b"\x05\x01\x00")
    try:
        ip = ipaddress.ip_address(host)
        addr = (b"\x01" if ip.version == 4 else b"\x04") + ip.packed
    except ValueError:
        addr = b"\x03" + bytes([len(host)]) + host.encode()
    w.write(b"\x05\x01\x00" + addr + struct.pack("!H", port))
    hello = await asyncio.wait_for(r.readexactly(2), timeout)
    if hello != b"\x05\x00":
        w.close()
        raise SocksRefused(255)
    head = await asyncio.wait_for(r.readexactly(4), timeout)
    if head[1] != 0:
        w.close()
        raise SocksRefused(head[1])
    await r.readexactly(4 + 2 if head[3] == 1 else 16 + 2)
    return r, w
