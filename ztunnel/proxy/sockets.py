"""Socket helpers of the proxy: listeners (plain or transparent) and upstream connections made
from the original client's address when the kernel allows it."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket

from ztunnel.errors import ProxyError
from ztunnel.model import IPAddress

log = logging.getLogger(__name__)

IP_TRANSPARENT = 19  # <linux/in.h>
IPV6_TRANSPARENT = 75
SOL_IPV6 = 41  # SOL_IPV6 is missing from typeshed on some versions
IP_FREEBIND = 15


def listen(
    ip: str, port: int, transparent: bool = False, backlog: int = 4096, reuseport: bool = False
) -> socket.socket:
    """A bound, listening, non-blocking TCP socket; OSError names the address on failure.
    `reuseport`: a member of a SO_REUSEPORT group (ztunnel.workers)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if transparent:
            if family == socket.AF_INET6:
                sock.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)
            else:
                sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        sock.bind((ip, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"cannot listen on {ip}:{port}: {e.strerror}") from None
    return sock


async def connect_from(
    target: tuple[IPAddress, int],
    source_ip: IPAddress | None,
    timeout: float,
    transparent: bool,
) -> tuple[socket.socket, bool]:
    """Connect to `target`, from `source_ip` if possible. Returns (socket, spoofed): spoofed is
    False when the kernel refused the source address and the agent's own address was used."""
    loop = asyncio.get_running_loop()
    ip, port = target
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    spoofed = False
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if source_ip is not None and source_ip.version == ip.version:
            try:
                if transparent:
                    level, opt = (
                        (SOL_IPV6, IPV6_TRANSPARENT)
                        if family == socket.AF_INET6
                        else (socket.SOL_IP, IP_TRANSPARENT)
                    )
                    sock.setsockopt(level, opt, 1)
                sock.bind((str(source_ip), 0))
                spoofed = True
            except OSError as e:
                if e.errno not in (errno.EADDRNOTAVAIL, errno.EPERM, errno.EADDRINUSE):
                    raise
                sock.close()
                sock = socket.socket(family, socket.SOCK_STREAM)
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.wait_for(loop.sock_connect(sock, (str(ip), port)), timeout)
    except TimeoutError:
        sock.close()
        raise ProxyError(f"connect to {ip}:{port} timed out") from None
    except OSError as e:
        sock.close()
        raise ProxyError(f"connect to {ip}:{port} failed: {e.strerror or e}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            sock.close()
        raise
    return sock, spoofed


def original_destination(sock: socket.socket) -> tuple[str, int]:
    """With TPROXY or bpf_sk_assign the accepted socket's local address IS the original
    destination."""
    name = sock.getsockname()
    return str(name[0]), int(name[1])
