"""SOCKS5 outbound entry (RFC 1928, no authentication, CONNECT only) on 127.0.0.1:15080, for
applications that name their destination explicitly instead of being captured.

The message parsing is pure (`parse_greeting`, `parse_request`); `Socks5Server` does the I/O.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass

from ztunnel.errors import ProxyError, ZtunnelError
from ztunnel.model import IPAddress
from ztunnel.proxy.outbound import OutboundProxy
from ztunnel.proxy.relay import TcpEnd

log = logging.getLogger(__name__)

VERSION = 5
NO_AUTH = 0
NO_ACCEPTABLE = 0xFF
CMD_CONNECT = 1
ATYP_V4, ATYP_DOMAIN, ATYP_V6 = 1, 3, 4
# Replies (RFC 1928 section 6)
SUCCEEDED, GENERAL_FAILURE, NOT_ALLOWED, NET_UNREACHABLE, HOST_UNREACHABLE = 0, 1, 2, 3, 4
REFUSED, TTL_EXPIRED, CMD_NOT_SUPPORTED, ATYP_NOT_SUPPORTED = 5, 6, 7, 8
HANDSHAKE_TIMEOUT = 10.0


class SocksError(ZtunnelError):
    def __init__(self, message: str, reply: int) -> None:
        self.reply = reply
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class SocksRequest:
    host: str  # an IP literal or a hostname
    port: int


def parse_greeting(data: bytes) -> bool:
    """VER NMETHODS METHODS...: True if "no authentication" is offered."""
    if len(data) < 2 or data[0] != VERSION or len(data) != 2 + data[1]:
        raise SocksError("malformed SOCKS5 greeting", GENERAL_FAILURE)
    return NO_AUTH in data[2:]


def parse_request(head: bytes, rest: bytes) -> SocksRequest:
    """`head` = VER CMD RSV ATYP, `rest` = address and port."""
    ver, cmd, _, atyp = head
    if ver != VERSION:
        raise SocksError("bad SOCKS version", GENERAL_FAILURE)
    if cmd != CMD_CONNECT:
        raise SocksError(f"command {cmd} not supported", CMD_NOT_SUPPORTED)
    if atyp == ATYP_V4 and len(rest) == 6:
        host = str(ipaddress.IPv4Address(rest[:4]))
    elif atyp == ATYP_V6 and len(rest) == 18:
        host = str(ipaddress.IPv6Address(rest[:16]))
    elif atyp == ATYP_DOMAIN and len(rest) >= 3 and len(rest) == 1 + rest[0] + 2:
        try:
            host = rest[1 : 1 + rest[0]].decode("idna")
        except UnicodeError:
            raise SocksError("host name is not valid IDNA", GENERAL_FAILURE) from None
    else:
        raise SocksError("address type not supported", ATYP_NOT_SUPPORTED)
    (port,) = struct.unpack("!H", rest[-2:])
    return SocksRequest(host, port)


def reply(code: int, bound: tuple[IPAddress, int] | None = None) -> bytes:
    ip, port = bound or (ipaddress.IPv4Address(0), 0)
    atyp = ATYP_V6 if ip.version == 6 else ATYP_V4
    return bytes([VERSION, code, 0, atyp]) + ip.packed + struct.pack("!H", port)


Resolver = Callable[[str], IPAddress | None]


class Socks5Server:
    """Handles one SOCKS5 client connection at a time per call to `handle`."""

    def __init__(self, outbound: OutboundProxy, resolve: Resolver) -> None:
        self.outbound = outbound
        self.resolve = resolve

    async def _negotiate(self, app: TcpEnd) -> SocksRequest:
        r = app
        head = await r.readexactly(2)
        methods = await r.readexactly(head[1])
        if not parse_greeting(head + methods):
            app.write(bytes([VERSION, NO_ACCEPTABLE]))
            raise SocksError("client offers no acceptable authentication method", NOT_ALLOWED)
        app.write(bytes([VERSION, NO_AUTH]))
        req_head = await r.readexactly(4)
        atyp = req_head[3]
        if atyp == ATYP_V4:
            rest = await r.readexactly(6)
        elif atyp == ATYP_V6:
            rest = await r.readexactly(18)
        elif atyp == ATYP_DOMAIN:
            n = await r.readexactly(1)
            rest = n + await r.readexactly(n[0] + 2)
        else:
            raise SocksError("address type not supported", ATYP_NOT_SUPPORTED)
        return parse_request(req_head, rest)

    async def handle(self, app: TcpEnd, src: tuple[IPAddress, int]) -> None:
        try:
            req = await asyncio.wait_for(self._negotiate(app), HANDSHAKE_TIMEOUT)
            try:
                dst_ip = ipaddress.ip_address(req.host)
            except ValueError:
                resolved = self.resolve(req.host)
                if resolved is None:
                    raise SocksError(f"unknown host {req.host!r}", HOST_UNREACHABLE) from None
                dst_ip = resolved
        except SocksError as e:
            log.info("SOCKS5 from %s:%d: %s", src[0], src[1], e)
            if e.reply != NOT_ALLOWED:
                app.write(reply(e.reply))
            await app.close()
            return
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError, OSError):
            await app.close()
            return
        dst = (dst_ip, req.port)
        try:
            up = await self.outbound.open(src, dst)
        except ProxyError as e:
            self.outbound.failed(src, dst, e)
            code = (
                NOT_ALLOWED
                if e.response_flag == "DENY"
                else (HOST_UNREACHABLE if e.response_flag == "NR" else REFUSED)
            )
            app.write(reply(code))
            await app.close()
            return
        app.write(reply(SUCCEEDED))
        self.outbound.ctx.tracker.open(up.record)
        await self.outbound.relay(app, up)
