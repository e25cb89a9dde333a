"""Copy bytes between an application socket and its upstream, both directions, with
half-close: when one side ends its writes, the other side's write half is shut and the
opposite direction keeps flowing until it ends too."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import TYPE_CHECKING

from ztunnel.hbone.connection import HboneStream, StreamClosed
from ztunnel.proxy.records import ConnectionRecord, ConnectionTracker

if TYPE_CHECKING:
    from typing import Protocol

    class ByteCounter(Protocol):
        def transferred(self, record: ConnectionRecord, sent: int, recv: int) -> None: ...


log = logging.getLogger(__name__)

CHUNK = 256 * 1024


class TcpEnd:
    """An application-facing TCP socket wrapped in asyncio streams."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def from_socket(cls, sock: socket.socket) -> TcpEnd:
        reader, writer = await asyncio.open_connection(sock=sock, limit=CHUNK)
        return cls(reader, writer)

    def abort(self) -> None:
        transport = self.writer.transport
        if not transport.is_closing():
            # RST, so the application sees a hard failure rather than a clean end.
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                    )
            transport.abort()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await asyncio.wait_for(self.writer.wait_closed(), 5)


async def _app_to_stream(
    app: TcpEnd, stream: HboneStream, rec: ConnectionRecord, tracker: ByteCounter
) -> None:
    while True:
        data = await app.reader.read(CHUNK)
        if not data:
            stream.end()
            return
        await stream.write(data)
        tracker.transferred(rec, len(data), 0)


async def _stream_to_app(
    stream: HboneStream, app: TcpEnd, rec: ConnectionRecord, tracker: ByteCounter
) -> None:
    while True:
        data = await stream.read()
        if not data:
            if app.writer.can_write_eof():
                app.writer.write_eof()
            return
        app.writer.write(data)
        await app.writer.drain()
        stream.ack(len(data))
        tracker.transferred(rec, 0, len(data))


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
    rec_tracker: ByteCounter = tracker if app_is_client else _Swapped(tracker)
    up = asyncio.ensure_future(_app_to_stream(app, stream, rec, rec_tracker))
    down = asyncio.ensure_future(_stream_to_app(stream, app, rec, rec_tracker))
    rec.set_closer(lambda reason: _cancel(up, down))
    await _join(up, down, rec)
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

    async def pipe(src: TcpEnd, dst: TcpEnd, forward: bool) -> None:
        while True:
            data = await src.reader.read(CHUNK)
            if not data:
                if dst.writer.can_write_eof():
                    dst.writer.write_eof()
                return
            dst.writer.write(data)
            await dst.writer.drain()
            if forward:
                tracker.transferred(rec, len(data), 0)
            else:
                tracker.transferred(rec, 0, len(data))

    up = asyncio.ensure_future(pipe(client, server, True))
    down = asyncio.ensure_future(pipe(server, client, False))
    rec.set_closer(lambda reason: _cancel(up, down))
    await _join(up, down, rec)
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


class _Swapped:
    """Counts bytes with the directions swapped (inbound: tunnel->app is 'sent')."""

    def __init__(self, inner: ConnectionTracker) -> None:
        self.inner = inner

    def transferred(self, rec: ConnectionRecord, sent: int, recv: int) -> None:
        self.inner.transferred(rec, recv, sent)
