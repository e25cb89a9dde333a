"""A worker process (`python -m ztunnel.workers.child FD`, started by the agent only): an
`Agent` with the data path alone, on the listener sockets it inherited, fed mesh snapshots
and certificates over the control channel FD, pushing its metrics (and, while someone looks
at /config_dump, its live connections) back every second. It drains when told, on SIGTERM,
and when the agent's process is gone (channel closed, or the parent-death signal)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import itertools
import logging
import signal
import socket
import sys
import time
from typing import TYPE_CHECKING

from ztunnel import logs
from ztunnel.ca import IssuedCertificate
from ztunnel.config import Settings
from ztunnel.errors import CertificateError
from ztunnel.identity import SpiffeId
from ztunnel.state import MeshState
from ztunnel.workers.channel import Channel, FrameDecoder, Message

if TYPE_CHECKING:
    from collections.abc import Callable

    from ztunnel.app import Agent

log = logging.getLogger("ztunnel.workers")

STATS_INTERVAL = 1.0
CERT_TIMEOUT = 30.0
LIVE_WINDOW = 30.0
PR_SET_PDEATHSIG = 1


class SupervisorCertSource:
    """The worker's certificate source: asks the agent's certificate manager (one per node)
    and hears about trust-root changes from it (`TrustBundleSource`)."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[IssuedCertificate]] = {}
        self._root_watchers: list[Callable[[tuple[bytes, ...]], None]] = []

    async def fetch(self, identity: SpiffeId) -> IssuedCertificate:
        request = next(self._ids)
        fut: asyncio.Future[IssuedCertificate] = asyncio.get_running_loop().create_future()
        self._waiting[request] = fut
        self.channel.send(("cert", request, identity.uri))
        try:
            return await asyncio.wait_for(fut, CERT_TIMEOUT)
        except TimeoutError:
            raise CertificateError(
                f"certificate for {identity}: no answer from the agent in {CERT_TIMEOUT:.0f}s"
            ) from None
        finally:
            self._waiting.pop(request, None)

    def answer(self, request: int, cert: IssuedCertificate | None, error: str | None) -> None:
        fut = self._waiting.get(request)
        if fut is None or fut.done():
            return
        if cert is not None:
            fut.set_result(cert)
        else:
            fut.set_exception(CertificateError(error or "certificate refused"))

    def watch_roots(self, callback: Callable[[tuple[bytes, ...]], None]) -> None:
        self._root_watchers.append(callback)

    def roots(self, roots: tuple[bytes, ...]) -> None:
        for cb in list(self._root_watchers):
            cb(roots)


def _build_state(msg: Message) -> MeshState:
    _kind, workloads, services, policies = msg
    return MeshState.build(workloads, services, policies)


class WorkerProcess:
    def __init__(self, channel: Channel, hello: Message) -> None:
        _kind, self.index, settings, fds, node_ip, mark = hello
        self.settings: Settings = settings
        self.channel = channel
        self.node_ip: str = node_ip
        self.mark: int = int(mark)
        self.socks = {kind: socket.socket(fileno=fd) for kind, fd in dict(fds).items()}
        self.source = SupervisorCertSource(channel)
        self.live_until = 0.0
        self.agent: Agent

    def _listen(self, kind: str, ip: str, port: int, transparent: bool) -> socket.socket:
        try:
            return self.socks.pop(kind)
        except KeyError:
            raise OSError(0, f"worker has no {kind} listener for {ip}:{port}") from None

    async def run(self) -> int:
        from ztunnel.app import Agent, AgentParts

        first = await self.channel.receive()
        if first is None or first[0] != "state":
            log.error("worker %d: no mesh state from the agent; exiting", self.index)
            return 1
        parts = AgentParts(certificate_source=self.source, listen=self._listen)
        self.agent = agent = Agent(self.settings, parts)
        agent.store.replace(_build_state(first))
        await agent.start()
        if self.node_ip:
            import ipaddress

            agent.ctx.node_ip = ipaddress.ip_address(self.node_ip)
        agent.ctx.local_dial_mark = self.mark
        self.channel.send(("ready",))
        tasks = [
            asyncio.ensure_future(self._read()),
            asyncio.ensure_future(self._push_stats()),
        ]
        try:
            await agent.run_until_signalled()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._send_stats()  # the last counters, for the agent's totals
            self.channel.close()
        return 0

    async def _read(self) -> None:
        while (msg := await self.channel.receive()) is not None:
            kind = msg[0]
            if kind == "state":
                self.agent.store.replace(_build_state(msg))
            elif kind == "cert":
                self.source.answer(int(msg[1]), msg[2], msg[3])
            elif kind == "roots":
                self.source.roots(tuple(msg[1]))
            elif kind == "drain":
                self.agent.request_drain()
            elif kind == "log-level":
                logs.set_level(str(msg[1]))
            elif kind == "live":
                self.live_until = time.monotonic() + LIVE_WINDOW
            else:
                log.warning("worker %d: unknown message %r from the agent", self.index, kind)
        log.warning("worker %d: the agent's process is gone; draining", self.index)
        self.agent.request_drain()

    def _send_stats(self) -> None:
        from ztunnel.admin import connection_json

        agent = self.agent
        conns: dict[str, object] = {
            "counts": agent.tracker.counts(),
            "total_opened": agent.tracker.total_opened,
        }
        if time.monotonic() < self.live_until:
            now = time.monotonic()
            conns["live"] = [
                connection_json(r, now)
                for r in sorted(agent.tracker.live.values(), key=lambda r: r.id)
            ]
        self.channel.send(("stats", list(agent.registry.collect()), conns))

    async def _push_stats(self) -> None:
        while True:
            await asyncio.sleep(STATS_INTERVAL)
            self._send_stats()


def _die_with_parent() -> None:
    """SIGTERM when the agent's process dies (even by SIGKILL): drain instead of lingering."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _read_hello(sock: socket.socket, decoder: FrameDecoder) -> tuple[Message, list[Message]]:
    """The first message (blocking: the event loop kind is in it), and any that came along."""
    sock.settimeout(30.0)
    while True:
        data = sock.recv(1 << 16)
        if not data:
            raise SystemExit("ztunnel worker: the agent closed the control channel")
        msgs = decoder.feed(data)
        if msgs:
            if msgs[0][0] != "hello" or len(msgs[0]) != 6:
                raise SystemExit("ztunnel worker: expected the agent's hello first")
            return msgs[0], msgs[1:]


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not argv[0].isdigit():
        print(
            "usage: python -m ztunnel.workers.child FD (started by `ztunnel run`)", file=sys.stderr
        )
        return 2
    _die_with_parent()
    sock = socket.socket(fileno=int(argv[0]))
    decoder = FrameDecoder()
    hello, early = _read_hello(sock, decoder)
    settings: Settings = hello[2]
    logs.setup(settings.log_format, settings.log_level)
    sock.settimeout(None)

    async def serve() -> int:
        channel = await Channel.open(sock, decoder, early)
        return await WorkerProcess(channel, hello).run()

    from ztunnel.cli import run_loop

    return run_loop(serve, settings.event_loop)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
