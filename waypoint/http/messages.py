"""Protocol-neutral HTTP messages: request and response heads with lower-case header names,
and bodies as bounded channels (backpressure: a writer waits while the reader lags), plus
`ReplayableBody`, which records a request body up to a limit so that retries and mirrors can
send it again while the first attempt streams it."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field

HeaderList = list[tuple[str, str]]

# RFC 9110 section 7.6.1 connection-specific fields, never forwarded (plus HTTP/2's rules).
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
        "te",
        "trailer",
        "proxy-authenticate",
        "proxy-authorization",
    }
)


def header(headers: Iterable[tuple[str, str]], name: str) -> str | None:
    """The first value of `name` (lower case), or None."""
    for k, v in headers:
        if k == name:
            return v
    return None


def header_all(headers: Iterable[tuple[str, str]], name: str) -> list[str]:
    return [v for k, v in headers if k == name]


def set_header(headers: HeaderList, name: str, value: str) -> None:
    headers[:] = [(k, v) for k, v in headers if k != name]
    headers.append((name, value))


def remove_header(headers: HeaderList, name: str) -> None:
    headers[:] = [(k, v) for k, v in headers if k != name]


def forwardable(headers: Iterable[tuple[str, str]]) -> HeaderList:
    """Without hop-by-hop fields (and those the Connection header names)."""
    items = list(headers)
    named = {
        t.strip().lower() for k, v in items if k == "connection" for t in v.split(",") if t.strip()
    }
    drop = HOP_BY_HOP | named
    return [(k, v) for k, v in items if k not in drop or (k == "te" and v.strip() == "trailers")]


@dataclass
class RequestHead:
    method: str
    path: str  # origin-form: /path?query
    authority: str
    scheme: str = "http"
    headers: HeaderList = field(default_factory=list)
    protocol: str = "HTTP/1.1"  # HTTP/1.1 | HTTP/2

    @property
    def path_only(self) -> str:
        return self.path.split("?", 1)[0]

    @property
    def query(self) -> str:
        return self.path.split("?", 1)[1] if "?" in self.path else ""

    def get(self, name: str) -> str | None:
        if name == ":authority" or name == "host":
            return self.authority
        if name == ":path":
            return self.path
        if name == ":method":
            return self.method
        return header(self.headers, name)


@dataclass
class ResponseHead:
    status: int
    headers: HeaderList = field(default_factory=list)

    def get(self, name: str) -> str | None:
        return header(self.headers, name)


class BodyClosed(Exception):
    """The body's producer or consumer went away before the end."""


class BodyChannel:
    """A body in flight: chunks in order, then optional trailers. Bounded: `put` waits while
    more than `limit` bytes are queued, so a slow reader slows the writer."""

    def __init__(
        self, limit: int = 256 * 1024, on_consumed: Callable[[int], None] | None = None
    ) -> None:
        self._on_consumed = on_consumed
        self._chunks: collections.deque[bytes] = collections.deque()
        self._queued = 0
        self._limit = limit
        self._ended = False
        self._error: BaseException | None = None
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self.done = asyncio.Event()  # set once the producer ended or anything failed
        self._done_callbacks: list[Callable[[], None]] = []
        self.trailers: HeaderList = []
        self.received = 0

    def add_done_callback(self, fn: Callable[[], None]) -> None:
        """Call `fn` once `done` is set (at once if it already is): what a task waiting on
        `done` would do, without a task per request."""
        if self.done.is_set():
            fn()
        else:
            self._done_callbacks.append(fn)

    def _set_done(self) -> None:
        if not self.done.is_set():
            self.done.set()
            callbacks, self._done_callbacks = self._done_callbacks, []
            for fn in callbacks:
                fn()

    @classmethod
    def of(cls, data: bytes, trailers: HeaderList | None = None) -> BodyChannel:
        body = cls()
        if data:
            body._chunks.append(data)
            body._queued = len(data)
        body.trailers = trailers or []
        body._ended = True
        body._readable.set()
        body._set_done()
        return body

    async def put(self, data: bytes) -> None:
        if not data:
            return
        while self._queued > self._limit and self._error is None:
            self._writable.clear()
            await self._writable.wait()
        if self._error is not None:
            raise BodyClosed(str(self._error))
        self._chunks.append(data)
        self._queued += len(data)
        self.received += len(data)
        self._readable.set()

    def put_nowait(self, data: bytes) -> None:
        """For producers bounded by other means (HTTP/2 flow control: window is returned
        through `on_consumed` only when the reader takes the chunk)."""
        if data and self._error is None:
            self._chunks.append(data)
            self._queued += len(data)
            self.received += len(data)
            self._readable.set()

    def end(self, trailers: HeaderList | None = None) -> None:
        if trailers:
            self.trailers = list(trailers)
        self._ended = True
        self._readable.set()
        self._set_done()

    def fail(self, error: BaseException) -> None:
        """The producer failed, or the consumer gave up: wake both sides."""
        if self._error is None:
            self._error = error
        self._readable.set()
        self._writable.set()
        self._set_done()

    @property
    def ended(self) -> bool:
        return self._ended and not self._chunks

    @property
    def failed(self) -> BaseException | None:
        return self._error

    @property
    def complete(self) -> bool:
        """The producer has ended it without error (chunks may still wait to be read)."""
        return self._ended and self._error is None

    @property
    def queued(self) -> int:
        """Bytes put and not yet read."""
        return self._queued

    async def read(self) -> bytes:
        """The next chunk; b"" at the end; BodyClosed if the producer failed."""
        while not self._chunks:
            if self._ended:
                return b""
            if self._error is not None:
                raise BodyClosed(str(self._error))
            self._readable.clear()
            await self._readable.wait()
        data = self._chunks.popleft()
        self._queued -= len(data)
        if self._queued <= self._limit:
            self._writable.set()
        if self._on_consumed is not None:
            self._on_consumed(len(data))
        return data

    def take_ready(self) -> list[bytes]:
        """The chunks queued now, without waiting (a writer can send them together with
        what precedes them); `ended` then tells whether the body is complete."""
        if not self._chunks:
            return []
        chunks = list(self._chunks)
        self._chunks.clear()
        n = self._queued
        self._queued = 0
        self._writable.set()
        if self._on_consumed is not None:
            self._on_consumed(n)
        return chunks

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while data := await self.read():
            yield data

    async def read_all(self, limit: int) -> bytes:
        parts: list[bytes] = []
        size = 0
        async for chunk in self:
            size += len(chunk)
            if size > limit:
                raise BodyClosed(f"body larger than {limit} bytes")
            parts.append(chunk)
        return b"".join(parts)


class ReplayableBody:
    """A request body that may be sent more than once: every reader gets the chunks recorded
    so far, then continues from the live source (recording as it goes) while the total stays
    under `limit`. Past the limit the body can no longer be replayed (`replayable` False) and
    only the reader that crossed it may go on."""

    def __init__(self, source: BodyChannel, limit: int) -> None:
        self.source = source
        self.limit = limit
        self._recorded: list[bytes] = []
        self._size = 0
        self.overflowed = False
        self._lock = asyncio.Lock()
        self._generation = 0

    @property
    def replayable(self) -> bool:
        return not self.overflowed

    @property
    def complete(self) -> bool:
        return self.source.ended and not self.overflowed

    @property
    def trailers(self) -> HeaderList:
        return self.source.trailers

    def data(self) -> bytes:
        return b"".join(self._recorded)

    async def reader(self) -> AsyncIterator[bytes]:
        """A new reading of the body from its start (invalidates earlier readers)."""
        if self.overflowed:
            raise BodyClosed("request body too large to be sent again")
        self._generation += 1
        gen = self._generation
        for chunk in list(self._recorded):
            yield chunk
        while True:
            if gen != self._generation:
                return
            async with self._lock:
                data = await self.source.read()
            if not data:
                return
            if not self.overflowed:
                self._size += len(data)
                if self._size > self.limit:
                    self.overflowed = True
                    self._recorded.clear()
                else:
                    self._recorded.append(data)
            yield data

    async def drain(self, timeout: float) -> bool:
        """Read the rest of the body into the record (for mirrors); False if it did not fit
        or did not end in time."""
        if self.overflowed:
            return False
        try:
            async with asyncio.timeout(timeout):
                async for _ in self.reader():
                    pass
        except (TimeoutError, BodyClosed):
            return False
        return self.complete
