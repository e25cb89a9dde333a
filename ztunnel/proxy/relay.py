"""Copy bytes between an application socket and its upstream, both directions, with
half-close: when one side ends its writes, the other side's write half is shut and the
opposite direction keeps flowing until it ends too."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
from collections.abc import Callable
from typing import Any, cast

from ztunnel.hbone.connection import HboneStream, StreamClosed
from ztunnel.proxy.records import ConnectionRecord, ConnectionTracker

log = logging.getLogger(__name__)

CHUNK = 256 * 1024


LOW_WATER = 64 * 1024


class TcpEnd(asyncio.Protocol):
    """An application-facing TCP connection.

    Received chunks are queued as the transport delivered them (asyncio's StreamReader copies
    every byte into a buffer and out again: the largest Python-level cost of a bulk relay
    when profiled); reading pauses above `CHUNK` queued bytes, so a slow tunnel slows the
    application; `drain` waits for transport space.
    """

    def __init__(self, on_ready: Callable[[TcpEnd], None] | None = None) -> None:
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._eof = False
        self._lost: BaseException | None = None
        self._closed = False
        self._reading_paused = False
        self._writing_paused = False
        self._read_waiter: asyncio.Future[None] | None = None
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._closed_waiter: asyncio.Future[None] | None = None
        self._on_ready = on_ready
        self._sink: Callable[[bytes], bool] | None = None
        self.transport: asyncio.Transport | None = None

    @classmethod
    async def from_socket(cls, sock: socket.socket) -> TcpEnd:
        """Wrap an already connected socket."""
        loop = asyncio.get_running_loop()
        end = cls()
        await loop.connect_accepted_socket(lambda: end, sock)
        return end

    # ---- asyncio.Protocol ----

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self._closed_waiter = asyncio.get_running_loop().create_future()
        if self._on_ready is not None:
            self._on_ready(self)

    def set_sink(self, sink: Callable[[bytes], bool] | None) -> None:
        """Fast path: offer received data to `sink` first (it returns False when it cannot
        take it now); refused data queues for `read()`, in order."""
        self._sink = sink

    def try_write(self, data: bytes) -> bool:
        """Write now unless the transport is applying backpressure or gone."""
        if self._writing_paused or self._closed or self.transport is None:
            return False
        self.transport.write(data)
        return True

    def data_received(self, data: bytes) -> None:
        if self._sink is not None and not self._chunks and self._sink(data):
            return
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > CHUNK and not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake_reader()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake_reader()
        return True  # keep the write half open: half-close

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._lost = exc
        self._eof = True
        self._wake_reader()
        self._wake_drainers()
        if self._closed_waiter is not None and not self._closed_waiter.done():
            self._closed_waiter.set_result(None)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._wake_drainers()

    # ---- reading ----

    async def read(self) -> bytes:
        """The next chunk as it arrived, or b"" at end of stream."""
        while not self._chunks:
            if self._eof:
                if self._lost is not None:
                    raise ConnectionResetError(str(self._lost))
                return b""
            self._read_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._read_waiter
            finally:
                self._read_waiter = None
        data = self._chunks.popleft()
        self._consumed(len(data))
        return data

    async def readexactly(self, n: int) -> bytes:
        """Exactly `n` bytes (protocol negotiation); IncompleteReadError at end of stream."""
        parts: list[bytes] = []
        got = 0
        while got < n:
            if not self._chunks:
                if self._eof:
                    raise asyncio.IncompleteReadError(b"".join(parts), n)
                self._read_waiter = asyncio.get_running_loop().create_future()
                try:
                    await self._read_waiter
                finally:
                    self._read_waiter = None
                continue
            chunk = self._chunks.popleft()
            take = chunk[: n - got]
            if len(take) < len(chunk):
                self._chunks.appendleft(chunk[len(take) :])
            self._consumed(len(take))
            parts.append(take)
            got += len(take)
        return b"".join(parts)

    def _consumed(self, n: int) -> None:
        self._buffered -= n
        if self._reading_paused and self._buffered <= LOW_WATER and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()

    def _wake_reader(self) -> None:
        w = self._read_waiter
        if w is not None and not w.done():
            w.set_result(None)

    # ---- writing ----

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self._closed:
            self.transport.write(data)

    async def drain(self) -> None:
        if self._closed:
            raise ConnectionResetError("connection closed")
        if self._writing_paused:
            w = asyncio.get_running_loop().create_future()
            self._drain_waiters.append(w)
            await w
            if self._closed:
                raise ConnectionResetError("connection closed")

    def _wake_drainers(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def can_write_eof(self) -> bool:
        return self.transport is not None and not self._closed and self.transport.can_write_eof()

    def write_eof(self) -> None:
        if self.can_write_eof():
            assert self.transport is not None
            self.transport.write_eof()

    def extra(self, name: str) -> Any:
        return self.transport.get_extra_info(name) if self.transport is not None else None

    # ---- closing ----

    def abort(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            # RST, so the application sees a hard failure rather than a clean end.
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                    )
            transport.abort()

    async def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        if self._closed_waiter is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._closed_waiter), 5)


Count = Callable[[int], None]


def _counters(
    tracker: ConnectionTracker, rec: ConnectionRecord, app_is_client: bool = True
) -> tuple[Count, Count]:
    """(count bytes from the app side, count bytes towards the app side). "Sent" is always
    towards the destination: from the app on the outbound side, into the app inbound."""

    def towards_dst(n: int) -> None:
        tracker.transferred(rec, n, 0)

    def towards_src(n: int) -> None:
        tracker.transferred(rec, 0, n)

    return (towards_dst, towards_src) if app_is_client else (towards_src, towards_dst)


def _sink(try_write: Callable[[bytes], bool], count: Count) -> Callable[[bytes], bool]:
    """The fast path of one direction: write now if the other side takes it, and count."""

    def take(data: bytes) -> bool:
        if not try_write(data):
            return False
        count(len(data))
        return True

    return take


async def _app_to_stream(app: TcpEnd, stream: HboneStream, count: Count) -> None:
    while True:
        data = await app.read()
        if not data:
            stream.end()
            return
        await stream.write(data)
        count(len(data))


async def _stream_to_app(stream: HboneStream, app: TcpEnd, count: Count) -> None:
    while True:
        data = await stream.read()
        if not data:
            app.write_eof()
            return
        app.write(data)
        await app.drain()
        stream.ack(len(data))
        count(len(data))


async def _pipe(src: TcpEnd, dst: TcpEnd, count: Count) -> None:
    while True:
        data = await src.read()
        if not data:
            dst.write_eof()
            return
        dst.write(data)
        await dst.drain()
        count(len(data))


async def relay_stream(
    app: TcpEnd,
    stream: HboneStream,
    rec: ConnectionRecord,
    tracker: ConnectionTracker,
    app_is_client: bool = True,
) -> None:
    """Relay until both directions have ended, or either side fails (then both are torn down).

    `app_is_client` says which way counts as "sent": from the app into the tunnel on the
    outbound side, from the tunnel into the app on the inbound side.
    """
    from_app, to_app = _counters(tracker, rec, app_is_client)
    # Fast paths: while neither side pushes back, bytes go straight from one protocol
    # callback to the other, with no task wake-up per chunk (latency and CPU); the tasks
    # below carry whatever had to wait, and the ends of stream.
    app.set_sink(_sink(stream.try_write, from_app))
    stream.set_sink(_sink(app.try_write, to_app))
    up = asyncio.ensure_future(_app_to_stream(app, stream, from_app))
    down = asyncio.ensure_future(_stream_to_app(stream, app, to_app))
    rec.set_closer(lambda reason: _cancel(up, down))
    try:
        await _join(up, down, rec)
    finally:
        app.set_sink(None)
        stream.set_sink(None)
    if rec.error:
        stream.reset()
        app.abort()
    else:
        stream.release()
        await app.close()


async def relay_tcp(
    client: TcpEnd, server: TcpEnd, rec: ConnectionRecord, tracker: ConnectionTracker
) -> None:
    """Relay between two plain TCP sockets (passthrough and inbound plaintext)."""
    forward, backward = _counters(tracker, rec)
    client.set_sink(_sink(server.try_write, forward))
    server.set_sink(_sink(client.try_write, backward))
    up = asyncio.ensure_future(_pipe(client, server, forward))
    down = asyncio.ensure_future(_pipe(server, client, backward))
    rec.set_closer(lambda reason: _cancel(up, down))
    try:
        await _join(up, down, rec)
    finally:
        client.set_sink(None)
        server.set_sink(None)
    if rec.error:
        client.abort()
        server.abort()
    else:
        await asyncio.gather(client.close(), server.close())


def _cancel(*tasks: asyncio.Future[None]) -> None:
    for t in tasks:
        t.cancel()


async def _join(
    up: asyncio.Future[None], down: asyncio.Future[None], rec: ConnectionRecord
) -> None:
    pending: set[asyncio.Future[None]] = {up, down}
    try:
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t.cancelled():
                    rec.error = rec.error or "closed"
                elif (exc := t.exception()) is not None:
                    rec.error = rec.error or _describe(exc)
            if rec.error:
                for t in pending:
                    t.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
                return
    except asyncio.CancelledError:
        up.cancel()
        down.cancel()
        await asyncio.gather(up, down, return_exceptions=True)
        rec.error = rec.error or "cancelled"
        raise


def _describe(exc: BaseException) -> str:
    if isinstance(exc, StreamClosed):
        return f"tunnel closed: {exc}"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return f"{type(exc).__name__}: {exc}"
