"""HTTP/2 (h2c, prior knowledge) over h2, both roles, on any ByteStream; gRPC rides on it
unchanged (trailers included).

One reader task per connection turns h2 events into per-stream state; request and response
bodies are `BodyChannel`s whose consumed bytes return flow-control window, so a slow reader
slows its peer through HTTP/2 flow control and never blocks the other streams. Senders wait
for window. A protocol error from the peer ends the connection with GOAWAY; a bad stream
gets RST_STREAM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterable, Callable, Iterable
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import h2.stream

from waypoint.http.errors import UpstreamError
from waypoint.http.h1 import Handler, Response, ServerLimits
from waypoint.http.messages import (
    BodyChannel,
    BodyClosed,
    HeaderList,
    RequestHead,
    ResponseHead,
    forwardable,
)
from waypoint.http.streams import ByteStream

log = logging.getLogger(__name__)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
STREAM_WINDOW = 1 << 20
CONNECTION_WINDOW = 16 << 20
MAX_CONCURRENT = 256


@dataclass
class _Stream:
    id: int
    body: BodyChannel
    response: asyncio.Future[ResponseHead] | None = None
    window: asyncio.Event = field(default_factory=asyncio.Event)
    closed: bool = False


def _text(headers: Iterable[tuple[bytes | str, bytes | str]]) -> HeaderList:
    """h2 hands out str with a header encoding set; its types say bytes."""
    return [
        (
            k.decode("latin-1") if isinstance(k, bytes) else k,
            v.decode("latin-1") if isinstance(v, bytes) else v,
        )
        for k, v in headers
    ]


def _pseudo_split(
    raw: Iterable[tuple[bytes | str, bytes | str]],
) -> tuple[dict[str, str], HeaderList]:
    headers = _text(raw)
    pseudo = {k: v for k, v in headers if k.startswith(":")}
    return pseudo, [(k, v) for k, v in headers if not k.startswith(":")]


class H2Session:
    """An HTTP/2 connection. Server: serves requests with `handler`. Client: `request()`."""

    def __init__(
        self,
        stream: ByteStream,
        client: bool,
        handler: Handler | None = None,
        limits: ServerLimits | None = None,
    ) -> None:
        limits = limits or ServerLimits()
        self.io = stream
        self.client = client
        self.handler = handler
        self.limits = limits
        config = h2.config.H2Configuration(
            client_side=client, header_encoding="latin-1", validate_inbound_headers=True
        )
        self.conn = h2.connection.H2Connection(config)
        self.conn.local_settings = h2.settings.Settings(
            client=client,
            initial_values={
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_bytes,
            },
        )
        self.streams: dict[int, _Stream] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self._write_lock = asyncio.Lock()
        self.closed = asyncio.Event()
        self.goaway = False
        self.requests = 0
        self.reader: asyncio.Task[None] | None = None
        self.idle_since = 0.0

    # ---- lifecycle ----

    async def start(self, preface_read: bool = False) -> None:
        """Send our preface and SETTINGS, then run the reader in the background."""
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        await self._flush()
        self.reader = asyncio.ensure_future(self._read_loop())
        self.reader.set_name(f"h2-{'client' if self.client else 'server'} {self.io.peer()}")

    async def serve(self) -> None:
        """Server: run until the connection ends."""
        await self.start()
        assert self.reader is not None
        with contextlib.suppress(asyncio.CancelledError):
            await self.reader
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    @property
    def available(self) -> bool:
        return (
            not self.closed.is_set()
            and not self.goaway
            and len(self.streams)
            < min(MAX_CONCURRENT, self.conn.remote_settings.max_concurrent_streams)
        )

    @property
    def active(self) -> int:
        return len(self.streams)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.close_connection()
            data = self.conn.data_to_send()
            if data:
                self._own(asyncio.ensure_future(self.io.write(data)))
        self.io.abort()
        self._teardown(ConnectionResetError("connection closed"))

    # ---- I/O ----

    async def _flush(self) -> None:
        async with self._write_lock:
            data = self.conn.data_to_send()
            if data:
                await self.io.write(data)

    def _flush_soon(self) -> None:
        self._own(asyncio.ensure_future(self._flush()))

    def _own(self, task: asyncio.Task[None]) -> None:
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _read_loop(self) -> None:
        try:
            while True:
                timeout = self.limits.idle_timeout if not self.streams else None
                async with asyncio.timeout(timeout):
                    data = await self.io.read()
                if not data:
                    break
                try:
                    events = self.conn.receive_data(data)
                except (h2.exceptions.ProtocolError, h2.exceptions.FrameTooLargeError) as e:
                    log.info("HTTP/2 protocol error from %s: %s", self.io.peer(), e)
                    await self._flush()
                    break
                for ev in events:
                    self._dispatch(ev)
                await self._flush()
        except TimeoutError:
            log.debug("idle HTTP/2 connection from %s closed", self.io.peer())
            with contextlib.suppress(Exception):
                self.conn.close_connection()
                await self._flush()
        except (ConnectionError, OSError) as e:
            log.debug("HTTP/2 connection %s ended: %s", self.io.peer(), e)
        finally:
            self._teardown(ConnectionResetError("connection closed"))
            self.io.end()

    def _teardown(self, error: BaseException) -> None:
        self.closed.set()
        for s in list(self.streams.values()):
            self._fail_stream(s, error)
        self.streams.clear()

    def _fail_stream(self, s: _Stream, error: BaseException) -> None:
        s.closed = True
        s.body.fail(error)
        s.window.set()
        if s.response is not None and not s.response.done():
            s.response.set_exception(error)
            s.response.exception()

    def _consumed(self, stream_id: int, n: int) -> None:
        with contextlib.suppress(h2.exceptions.ProtocolError, KeyError, ValueError):
            self.conn.acknowledge_received_data(n, stream_id)
            self._flush_soon()

    def _dispatch(self, ev: h2.events.Event) -> None:
        if isinstance(ev, h2.events.RequestReceived) and not self.client:
            self._on_request(ev)
        elif isinstance(ev, h2.events.ResponseReceived) and self.client:
            s = self.streams.get(ev.stream_id)
            if s is not None and s.response is not None and not s.response.done():
                pseudo, headers = _pseudo_split(ev.headers)
                s.response.set_result(ResponseHead(int(pseudo.get(":status", "502")), headers))
        elif isinstance(ev, h2.events.InformationalResponseReceived):
            pass
        elif isinstance(ev, h2.events.DataReceived):
            s = self.streams.get(ev.stream_id)
            if s is None or s.body.failed is not None:
                self._consumed(ev.stream_id, ev.flow_controlled_length)
                return
            # Padding is window we return at once; the data returns window when read.
            pad = ev.flow_controlled_length - len(ev.data)
            if pad:
                self._consumed(ev.stream_id, pad)
            s.body.put_nowait(ev.data)
        elif isinstance(ev, h2.events.TrailersReceived):
            s = self.streams.get(ev.stream_id)
            if s is not None:
                s.body.end(_pseudo_split(ev.headers)[1])
        elif isinstance(ev, h2.events.StreamEnded):
            s = self.streams.get(ev.stream_id)
            if s is not None:
                s.body.end()
                if s.response is None:
                    pass
                self._maybe_forget(s)
        elif isinstance(ev, h2.events.StreamReset):
            s = self.streams.pop(ev.stream_id, None)
            if s is not None:
                kind = (
                    "refused-stream"
                    if ev.error_code == h2.errors.ErrorCodes.REFUSED_STREAM
                    else "reset"
                )
                self._fail_stream(s, UpstreamError(kind, f"stream reset (code {ev.error_code})"))
        elif isinstance(ev, h2.events.WindowUpdated):
            if ev.stream_id == 0:
                for s in self.streams.values():
                    s.window.set()
            elif (s := self.streams.get(ev.stream_id)) is not None:
                s.window.set()
        elif isinstance(ev, h2.events.RemoteSettingsChanged):
            for s in self.streams.values():
                s.window.set()
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.goaway = True
            last = ev.last_stream_id or 0
            for sid, s in list(self.streams.items()):
                if self.client and sid > last:
                    self.streams.pop(sid)
                    self._fail_stream(s, UpstreamError("refused-stream", "refused by GOAWAY"))

    def _maybe_forget(self, s: _Stream) -> None:
        with contextlib.suppress(KeyError, h2.exceptions.NoSuchStreamError):
            state = self.conn._get_stream_by_id(s.id).state_machine.state
            if state == h2.stream.StreamState.CLOSED:
                self.streams.pop(s.id, None)
                self.idle_since = asyncio.get_running_loop().time()

    # ---- sending ----

    async def _send_body(
        self, s: _Stream, body: AsyncIterable[bytes], trailers: Callable[[], HeaderList]
    ) -> None:
        async for chunk in body:
            view = memoryview(chunk)
            while view:
                if s.closed or self.closed.is_set():
                    raise BodyClosed("stream closed")
                window = min(
                    self.conn.local_flow_control_window(s.id), self.conn.max_outbound_frame_size
                )
                if window <= 0:
                    s.window.clear()
                    await s.window.wait()
                    continue
                n = min(window, len(view))
                self.conn.send_data(s.id, view[:n].tobytes())
                view = view[n:]
                await self._flush()
        extra = forwardable(trailers())
        if extra:
            self.conn.send_headers(s.id, extra, end_stream=True)
        else:
            self.conn.end_stream(s.id)
        await self._flush()

    def reset(self, stream_id: int, code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        s = self.streams.pop(stream_id, None)
        with contextlib.suppress(h2.exceptions.ProtocolError, KeyError):
            self.conn.reset_stream(stream_id, code)
            self._flush_soon()
        if s is not None:
            self._fail_stream(s, UpstreamError("reset", "stream reset locally"))

    # ---- server ----

    def _on_request(self, ev: h2.events.RequestReceived) -> None:
        pseudo, headers = _pseudo_split(ev.headers)
        sid = ev.stream_id
        body = BodyChannel(on_consumed=lambda n: self._consumed(sid, n))
        s = _Stream(sid, body)
        self.streams[sid] = s
        if ev.stream_ended is not None:
            body.end()
        method = pseudo.get(":method", "")
        if method == "CONNECT" or ":path" not in pseudo:
            self.reset(sid, h2.errors.ErrorCodes.PROTOCOL_ERROR)
            return
        authority = pseudo.get(":authority") or next((v for k, v in headers if k == "host"), "")
        head = RequestHead(
            method,
            pseudo[":path"],
            authority,
            pseudo.get(":scheme", "http"),
            [(k, v) for k, v in headers if k != "host"],
            "HTTP/2",
        )
        self.requests += 1
        assert self.handler is not None
        task = asyncio.ensure_future(self._respond(s, head))
        task.set_name(f"h2-stream {sid}")
        self._own(task)

    async def _respond(self, s: _Stream, head: RequestHead) -> None:
        assert self.handler is not None
        try:
            response = await self.handler(head, s.body)
        except Exception:
            log.exception("request handler failed")
            response = Response.simple(500, "internal error\n")
        if s.closed:
            return
        try:
            headers = [(":status", str(response.head.status)), *forwardable(response.head.headers)]
            no_body = head.method == "HEAD" or response.head.status in (204, 304)
            if response.body.ended and not response.body.trailers:
                # An empty answer (a gRPC "trailers-only" status among them) is one HEADERS
                # frame with END_STREAM, as gRPC clients require.
                self.conn.send_headers(s.id, headers, end_stream=True)
                await self._flush()
                return
            self.conn.send_headers(s.id, headers, end_stream=False)
            await self._flush()
            if no_body:
                response.body.fail(BodyClosed("no body"))
                self.conn.end_stream(s.id)
                await self._flush()
            else:
                await self._send_body(s, response.body, lambda: response.body.trailers)
        except (BodyClosed, UpstreamError) as e:
            log.info("response on stream %d broke off: %s", s.id, e)
            self.reset(s.id, h2.errors.ErrorCodes.INTERNAL_ERROR)
        except (
            h2.exceptions.ProtocolError,
            h2.exceptions.StreamClosedError,
            ConnectionError,
            OSError,
        ):
            pass
        finally:
            # The request body the handler did not read is not wanted any more.
            if not s.body.ended:
                s.body.fail(BodyClosed("response sent"))
            self._maybe_forget(s)

    # ---- client ----

    async def request(
        self,
        head: RequestHead,
        body: AsyncIterable[bytes],
        length: int | None,
        trailers: Callable[[], HeaderList],
    ) -> tuple[ResponseHead, BodyChannel, int]:
        """Open a stream, send the request (body streamed), wait for the response head."""
        if not self.available:
            raise UpstreamError("refused-stream", "HTTP/2 connection cannot take a new stream")
        sid = self.conn.get_next_available_stream_id()
        channel = BodyChannel(on_consumed=lambda n: self._consumed(sid, n))
        s = _Stream(sid, channel, asyncio.get_running_loop().create_future())
        self.streams[sid] = s
        self.requests += 1
        headers = [
            (":method", head.method),
            (":scheme", head.scheme or "http"),
            (":authority", head.authority),
            (":path", head.path),
            *[(k, v) for k, v in forwardable(head.headers) if k not in ("content-length",)],
        ]
        if length is not None and length > 0:
            headers.append(("content-length", str(length)))
        try:
            self.conn.send_headers(sid, headers, end_stream=length == 0)
            await self._flush()
        except (h2.exceptions.ProtocolError, ConnectionError, OSError) as e:
            self.streams.pop(sid, None)
            raise UpstreamError("reset", f"upstream connection failed: {e}") from None
        if length != 0:
            sender = asyncio.ensure_future(self._client_body(s, body, trailers))
            self._own(sender)
        assert s.response is not None
        return await s.response, channel, sid

    async def _client_body(
        self, s: _Stream, body: AsyncIterable[bytes], trailers: Callable[[], HeaderList]
    ) -> None:
        try:
            await self._send_body(s, body, trailers)
        except (
            BodyClosed,
            h2.exceptions.ProtocolError,
            h2.exceptions.StreamClosedError,
            ConnectionError,
            OSError,
        ) as e:
            log.debug("request body on stream %d ended early: %s", s.id, e)
            self.reset(s.id)


async def serve_h2(
    stream: ByteStream, handler: Handler, limits: ServerLimits | None = None
) -> None:
    await H2Session(stream, client=False, handler=handler, limits=limits).serve()
