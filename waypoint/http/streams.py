"""The byte streams HTTP runs over: an HBONE CONNECT stream (the tunnel from a node agent,
or ours to a destination), or a plain asyncio stream (tests, benchmarks). All offer the
same four operations."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol

from ztunnel.hbone.connection import HboneStream, StreamClosed


class ByteStream(Protocol):
    async def read(self) -> bytes:
        """The next chunk, b"" at end of stream; ConnectionError when it broke."""
        ...

    async def write(self, data: bytes) -> None: ...

    def end(self) -> None:
        """Half-close our direction."""

    def abort(self) -> None:
        """Drop the stream now (reset)."""

    def peer(self) -> str: ...


class HboneByteStream:
    """An HBONE stream as a ByteStream: received bytes are acknowledged once handed out
    (the HTTP layer above bounds what it keeps)."""

    def __init__(self, stream: HboneStream, peer: str = "") -> None:
        self.stream = stream
        self._peer = peer

    async def read(self) -> bytes:
        try:
            data = await self.stream.read()
        except StreamClosed as e:
            raise ConnectionResetError(str(e)) from None
        if data:
            self.stream.ack(len(data))
        return data

    async def write(self, data: bytes) -> None:
        try:
            await self.stream.write(data)
        except StreamClosed as e:
            raise ConnectionResetError(str(e)) from None

    def end(self) -> None:
        self.stream.end()

    def abort(self) -> None:
        self.stream.release()

    def close(self) -> None:
        """Finish normally: end our side, and forget the stream once the peer has too."""
        self.stream.end()
        self.stream.release()

    def peer(self) -> str:
        return self._peer


class AsyncioByteStream:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        p = writer.get_extra_info("peername")
        self._peer = f"{p[0]}:{p[1]}" if p else ""

    async def read(self) -> bytes:
        return await self.reader.read(65536)

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def end(self) -> None:
        with contextlib.suppress(OSError, RuntimeError):
            if self.writer.can_write_eof():
                self.writer.write_eof()

    def abort(self) -> None:
        transport = self.writer.transport
        if transport is not None:
            transport.abort()

    def close(self) -> None:
        self.writer.close()

    def peer(self) -> str:
        return self._peer


class PrefixedStream:
    """A stream whose first bytes were already read (protocol sniffing) and are replayed."""

    def __init__(self, inner: ByteStream, prefix: bytes) -> None:
        self.inner = inner
        self._prefix = prefix

    async def read(self) -> bytes:
        if self._prefix:
            data, self._prefix = self._prefix, b""
            return data
        return await self.inner.read()

    async def write(self, data: bytes) -> None:
        await self.inner.write(data)

    def end(self) -> None:
        self.inner.end()

    def abort(self) -> None:
        self.inner.abort()

    def peer(self) -> str:
        return self.inner.peer()
