"""The control channel between the agent's process and a worker: a Unix socketpair carrying
length-prefixed messages, each a (kind, payload...) tuple pickled. Both ends are the same
program started by the agent itself (the pair never leaves the two processes), which is what
makes pickle acceptable here; sizes are bounded all the same.

`FrameDecoder` is the sans-I/O part (bytes in, messages out); `Channel` puts it on asyncio.
"""

from __future__ import annotations

import asyncio
import pickle
import socket
import struct
from typing import Any

HEADER = struct.Struct("!I")
MAX_FRAME = 64 * 1024 * 1024  # a mesh snapshot of ~100k workloads fits; anything larger is a bug

Message = tuple[Any, ...]


class ChannelError(Exception):
    """The peer broke the framing (or sent something that is not a message)."""


def encode(message: Message) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    if len(body) > MAX_FRAME:
        raise ChannelError(f"message {message[0]!r} too large: {len(body)} bytes")
    return HEADER.pack(len(body)) + body


class FrameDecoder:
    """Feed bytes, get whole messages."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._max = max_frame

    def feed(self, data: bytes) -> list[Message]:
        self._buf += data
        out: list[Message] = []
        while len(self._buf) >= HEADER.size:
            (size,) = HEADER.unpack_from(self._buf)
            if size > self._max:
                raise ChannelError(f"frame of {size} bytes exceeds {self._max}")
            if len(self._buf) < HEADER.size + size:
                break
            body = bytes(self._buf[HEADER.size : HEADER.size + size])
            del self._buf[: HEADER.size + size]
            try:
                msg = pickle.loads(body)
            except Exception as e:
                raise ChannelError(f"undecodable message: {type(e).__name__}: {e}") from None
            if not isinstance(msg, tuple) or not msg or not isinstance(msg[0], str):
                raise ChannelError(f"not a message: {type(msg).__name__}")
            out.append(msg)
        return out


class Channel:
    """One end of the control channel on the running event loop."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        decoder: FrameDecoder | None = None,
        ready: list[Message] | None = None,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._decoder = decoder or FrameDecoder()
        self._ready: list[Message] = list(ready or [])

    @classmethod
    async def open(
        cls,
        sock: socket.socket,
        decoder: FrameDecoder | None = None,
        ready: list[Message] | None = None,
    ) -> Channel:
        """`decoder`/`ready`: what a blocking read before the loop started already took."""
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=1 << 20)
        return cls(reader, writer, decoder, ready)

    def send(self, message: Message) -> None:
        """Queue a message (never blocks; a gone peer is noticed by `receive`)."""
        if not self._writer.is_closing():
            self._writer.write(encode(message))

    def send_encoded(self, frame: bytes) -> None:
        """Queue an already encoded message (one pickle for many workers)."""
        if not self._writer.is_closing():
            self._writer.write(frame)

    async def receive(self) -> Message | None:
        """The next message, or None when the peer closed the channel."""
        while not self._ready:
            data = await self._reader.read(1 << 20)
            if not data:
                return None
            self._ready.extend(self._decoder.feed(data))
        return self._ready.pop(0)

    def close(self) -> None:
        self._writer.close()
