"""The asyncio side of HBONE: one `HboneConnection` per TLS connection, `HboneStream`s on it.

Backpressure runs end to end: a stream's reader returns window to the peer only after the
caller says the bytes were consumed (`HboneStream.ack`), and a writer waits for both HTTP/2
window and TLS transport buffer space, so a slow reader slows the sender and memory per
connection stays within the 16 MiB connection window.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, cast

from ztunnel.errors import ConnectRejected, HboneError, IdentityError
from ztunnel.hbone import protocol as p
from ztunnel.hbone.headers import ConnectRequest
from ztunnel.hbone.limits import H2Guard
from ztunnel.hbone.tls import peer_der
from ztunnel.identity import SpiffeId

log = logging.getLogger(__name__)

WRITE_HIGH_WATER = 1024 * 1024
KEEPALIVE_TICK = 2.0
# A failed connection: how long the peer gets to read our GOAWAY before the socket is aborted.
CLOSE_GRACE = 2.0
# A graceful close waits for what is queued to be written, polling; a peer that reads none of
# it for DRAIN_STALL is aborted (as the event loops' own SSL shutdown timeout would).
FLUSH_POLL = 0.05
DRAIN_STALL = 30.0

StreamHandler = Callable[["HboneStream", p.ConnectRequested], Awaitable[None]]


class StreamClosed(HboneError):
    """The stream was reset by the peer or the connection went away."""


class HboneStream:
    """One CONNECT tunnel: ordered bytes both ways, with half-close."""

    __slots__ = (
        "_answered",
        "_conn",
        "_eof",
        "_error",
        "_recv",
        "_recv_waiter",
        "_response",
        "_sent_end",
        "_sink",
        "_task",
        "_window_waiter",
        "bytes_received",
        "bytes_sent",
        "request",
        "stream_id",
    )

    def __init__(self, conn: HboneConnection, stream_id: int) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self._recv: collections.deque[tuple[bytes, int]] = collections.deque()
        self._recv_waiter: asyncio.Future[None] | None = None
        self._window_waiter: asyncio.Future[None] | None = None
        self._response: asyncio.Future[int] | None = None
        self._eof = False
        self._sent_end = False
        self._error: BaseException | None = None
        self._sink: Callable[[bytes], bool] | None = None
        # Server side: the handler's task, and whether it has answered the CONNECT yet.
        self._task: asyncio.Task[None] | None = None
        self._answered = False
        self.request: p.ConnectRequested | None = None
        self.bytes_sent = 0
        self.bytes_received = 0

    @property
    def connection(self) -> HboneConnection:
        return self._conn

    @property
    def peer_identity(self) -> SpiffeId | None:
        return self._conn.peer_identity

    # ---- reading ----

    async def read(self) -> bytes:
        """The next chunk, or b"" at END_STREAM. Call `ack(len(chunk))` once it is written on."""
        while not self._recv:
            # A peer that finished its direction has said all it had to: report the end even
            # if the connection went away afterwards.
            if self._eof:
                self._conn._maybe_forget(self)
                return b""
            if self._error is not None:
                raise StreamClosed(str(self._error))
            self._recv_waiter = self._conn.loop.create_future()
            try:
                await self._recv_waiter
            finally:
                self._recv_waiter = None
        data, flow = self._recv.popleft()
        if flow > len(data):  # padding counts against the window but is not delivered
            self._conn.consumed(self.stream_id, flow - len(data))
        return data

    def ack(self, n: int) -> None:
        self._conn.consumed(self.stream_id, n)

    # ---- writing ----

    async def write(self, data: bytes | memoryview) -> None:
        """Send all of `data`, waiting for flow-control window and transport space."""
        view = memoryview(data)
        while view:
            if self._error is not None:
                raise StreamClosed(str(self._error))
            if self._sent_end:
                raise StreamClosed("write after end of stream")
            n = self._conn.send_data(self.stream_id, view)
            if n:
                self.bytes_sent += n
                view = view[n:]
                await self._conn.drain()
                continue
            self._window_waiter = self._conn.loop.create_future()
            try:
                await self._window_waiter
            finally:
                self._window_waiter = None

    def end(self) -> None:
        """Half-close our direction (END_STREAM)."""
        if not self._sent_end and self._error is None:
            self._sent_end = True
            self._conn.end_stream(self.stream_id)

    def reset(self, code: int = p.ErrorCode.CANCEL) -> None:
        self._drop_unread()
        if self._error is None:
            self._conn.reset_stream(self.stream_id, code)
            self._fail(StreamClosed(f"stream {self.stream_id} reset locally"))

    def release(self) -> None:
        """The caller is done: reset the stream if it is still open, else forget it."""
        self._drop_unread()
        if self._error is None and not (self._eof and self._sent_end):
            self.reset()
        else:
            self._conn._maybe_forget(self)

    # ---- server side ----

    def respond(self, status: int) -> None:
        self._answered = True
        self._conn.respond(self.stream_id, status, end_stream=status != 200)
        if status != 200:
            self._sent_end = True

    # ---- client side ----

    async def response(self, timeout: float) -> int:
        # A timer rather than wait_for(shield(...)): one handle instead of two extra futures
        # and their callbacks on every new connection. Cancelling the caller cancels only
        # the response future, which nothing else awaits.
        fut = self._response
        assert fut is not None
        timer = self._conn.loop.call_later(timeout, self._response_overdue)
        try:
            return await fut
        finally:
            timer.cancel()

    def _response_overdue(self) -> None:
        fut = self._response
        if fut is not None and not fut.done():
            fut.set_exception(HboneError("timed out waiting for the CONNECT response", 504))
            self.reset()

    # ---- fed by the connection ----

    def set_sink(self, sink: Callable[[bytes], bool] | None) -> None:
        """Fast path: hand received data straight to `sink` (which returns False when it
        cannot take it without buffering) instead of waking a reader task; whatever the
        sink refuses queues for `read()` as usual, in order."""
        self._sink = sink

    def try_write(self, data: bytes) -> bool:
        """Send all of `data` now if flow control and the transport allow it, else nothing."""
        conn = self._conn
        if (
            self._error is not None
            or self._sent_end
            or self._window_waiter is not None
            or conn._paused
            or conn._proto.send_capacity(self.stream_id) < len(data)
        ):
            return False
        n = conn.send_data(self.stream_id, memoryview(data))
        self.bytes_sent += n
        return True

    def _on_data(self, data: bytes, flow: int) -> None:
        if not data:
            # An empty DATA frame (RFC 9113 section 6.1) is not the end of the stream, which
            # is what b"" means to a reader; only its padding, if any, is window to return.
            if flow:
                self._conn.consumed(self.stream_id, flow)
            return
        self.bytes_received += len(data)
        if self._sink is not None and not self._recv and self._sink(data):
            self._conn.consumed(self.stream_id, flow)
            return
        self._recv.append((data, flow))
        self._wake_reader()

    def _on_end(self) -> None:
        self._eof = True
        self._wake_reader()

    def _on_window(self) -> None:
        w = self._window_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _on_response(self, status: int) -> None:
        if self._response is not None and not self._response.done():
            self._response.set_result(status)

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        if not self._eof:
            # An unfinished stream's data will never be read.
            self._drop_unread()
        if self._response is not None and not self._response.done():
            self._response.set_exception(exc)
            self._response.exception()
        self._wake_reader()
        self._on_window()

    def _abandon(self) -> bool:
        """The peer gave up on the stream: stop a handler that has not answered yet (its
        upstream connect is cancelled, or it never starts). True if one was stopped."""
        t = self._task
        if t is None or self._answered or t.done():
            return False
        t.cancel()
        return True

    def _drop_unread(self) -> None:
        """Give the window of queued, never-to-be-read data back to the connection, or its
        shared window shrinks for good and every stream on it stalls."""
        if self._recv:
            unread = sum(flow for _, flow in self._recv)
            self._recv.clear()
            self._conn.consumed(self.stream_id, unread)

    def _wake_reader(self) -> None:
        w = self._recv_waiter
        if w is not None and not w.done():
            w.set_result(None)

    @property
    def finished(self) -> bool:
        return self._error is not None or (self._eof and self._sent_end and not self._recv)


class HboneConnection(asyncio.Protocol):
    """An HTTP/2 connection over TLS carrying HBONE streams (either side)."""

    def __init__(
        self,
        client: bool,
        handler: StreamHandler | None = None,
        name: str = "",
        peer_check: Callable[[bytes], SpiffeId] | None = None,
        guard: H2Guard | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.client = client
        self.name = name
        self._guard = guard or H2Guard()
        self._proto = p.HboneProtocol(client, self.loop.time(), self._guard.limits)
        self._handler = handler
        self._peer_check = peer_check
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, HboneStream] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._paused = False
        self._receiving = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._keepalive: asyncio.TimerHandle | None = None
        self._close_timer: asyncio.TimerHandle | None = None
        self._lost = False
        self.closed = self.loop.create_future()
        self.peer_identity: SpiffeId | None = None
        self.streams_opened = 0
        self.last_active = self.loop.time()
        self.failure: str | None = None

    # ---- asyncio.Protocol ----

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's SSL transport is not an asyncio.Transport subclass, but behaves as one.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        if self._peer_check is not None:
            # The TLS handshake is complete here, before any HTTP/2 byte is processed: the
            # peer's identity is known (or the connection refused) before any stream exists.
            try:
                self.peer_identity = self._peer_check(peer_der(self.ssl_object))
            except IdentityError as e:
                self.failure = str(e)
                self._teardown(StreamClosed(f"peer rejected: {e}"))
                self.transport.abort()
                return
        self._flush()
        self._keepalive = self.loop.call_later(KEEPALIVE_TICK, self._tick)

    def data_received(self, data: bytes) -> None:
        if self.closed.done():
            return
        events = self._proto.receive(data, self.loop.time())
        # The WINDOW_UPDATEs for data handed straight on (the relay's fast path) go out in
        # one write at the end: one TLS record per read instead of one per DATA frame.
        self._receiving = True
        try:
            for ev in events:
                self._dispatch(ev)
        finally:
            self._receiving = False
        self._flush()

    def eof_received(self) -> bool | None:
        self._teardown(StreamClosed("peer closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        self._lost = True
        self._teardown(StreamClosed(f"connection lost: {exc}" if exc else "connection closed"))

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        waiters, self._drain_waiters = self._drain_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    # ---- events ----

    def _dispatch(self, ev: p.Event) -> None:
        if isinstance(ev, p.DataReceived):
            s = self.streams.get(ev.stream_id)
            if s is None:
                self._proto.consumed(ev.stream_id, ev.flow_controlled_length)
            else:
                s._on_data(ev.data, ev.flow_controlled_length)
        elif isinstance(ev, p.WindowOpened):
            if ev.stream_id == 0:
                for s in self.streams.values():
                    s._on_window()
            elif (s := self.streams.get(ev.stream_id)) is not None:
                s._on_window()
        elif isinstance(ev, p.StreamEnded):
            if (s := self.streams.get(ev.stream_id)) is not None:
                s._on_end()
                self._maybe_forget(s)
        elif isinstance(ev, p.ResponseReceived):
            if (s := self.streams.get(ev.stream_id)) is not None:
                s._on_response(ev.status)
        elif isinstance(ev, p.StreamReset):
            if (s := self.streams.pop(ev.stream_id, None)) is not None:
                s._fail(StreamClosed(f"stream reset by peer (error code {ev.error_code})"))
                if s._abandon():
                    self._guard.counters.streams_cancelled += 1
        elif isinstance(ev, p.ConnectRequested):
            self._on_connect(ev)
        elif isinstance(ev, p.ConnectRefused):
            log.info(
                "%s: refused stream %d with %d: %s", self.name, ev.stream_id, ev.status, ev.reason
            )
        elif isinstance(ev, p.GoawayReceived):
            for sid, s in list(self.streams.items()):
                if self.client and sid > ev.last_stream_id:
                    self.streams.pop(sid)
                    s._fail(StreamClosed("refused by GOAWAY"))
            if ev.error_code:
                self.failure = f"GOAWAY error code {ev.error_code}"
            self._close_if_idle()
        elif isinstance(ev, p.ConnectionFailed):
            self.failure = ev.reason
            if ev.abuse:
                who = f"{self.name} ({self.peer_identity or 'unknown identity'})"
                self._guard.counters.cutoff(ev.abuse, who, ev.reason)
            else:
                log.warning(
                    "%s: protocol error from peer, sending GOAWAY: %s", self.name, ev.reason
                )
            self._flush()
            self._teardown(StreamClosed(f"protocol error: {ev.reason}"))

    def _on_connect(self, ev: p.ConnectRequested) -> None:
        s = HboneStream(self, ev.stream_id)
        s.request = ev
        self.streams[ev.stream_id] = s
        self.streams_opened += 1
        self.last_active = self.loop.time()
        if self._handler is None:
            s.respond(503)
            return
        s._task = self.spawn(self._handler(s, ev), f"hbone-stream-{ev.stream_id}")

    def spawn(self, coro: Awaitable[None], name: str) -> asyncio.Task[None]:
        task: asyncio.Task[None] = self.loop.create_task(self._run_handler(coro), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _run_handler(self, coro: Awaitable[None]) -> None:
        try:
            await coro
        except Exception:
            log.exception("%s: stream handler failed", self.name)

    # ---- commands used by streams ----

    def send_data(self, stream_id: int, data: memoryview) -> int:
        n = self._proto.send_data(stream_id, data)
        if n:
            self._flush()
        return n

    def end_stream(self, stream_id: int) -> None:
        self._proto.end_stream(stream_id)
        self._flush()
        if (s := self.streams.get(stream_id)) is not None:
            self._maybe_forget(s)

    def reset_stream(self, stream_id: int, code: int) -> None:
        self._proto.reset_stream(stream_id, code)
        self.streams.pop(stream_id, None)
        self._flush()
        self._close_if_idle()

    def respond(self, stream_id: int, status: int, end_stream: bool) -> None:
        self._proto.respond(stream_id, status, end_stream)
        self._flush()
        if end_stream:
            self.streams.pop(stream_id, None)
            self._close_if_idle()

    def consumed(self, stream_id: int, n: int) -> None:
        self._proto.consumed(stream_id, n)
        if not self._receiving:  # else data_received flushes once all events are handled
            self._flush()

    async def drain(self) -> None:
        if self._paused and self.transport is not None and not self.transport.is_closing():
            w = self.loop.create_future()
            self._drain_waiters.append(w)
            await w

    def _flush(self) -> None:
        data = self._proto.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _maybe_forget(self, s: HboneStream) -> None:
        if s.finished:
            self.streams.pop(s.stream_id, None)
            self.last_active = self.loop.time()
            self._close_if_idle()

    def _close_if_idle(self) -> None:
        if self.client and self.exhausted and not self.streams:
            # Every stream this connection may carry has been used: retire it now.
            self._proto.goaway()
        draining = self._proto.goaway_sent or self._proto.goaway_received
        if draining and not self.streams and self.transport is not None:
            self._flush()
            self._close_when_flushed()

    def _close_when_flushed(self) -> None:
        """Graceful close: once everything queued above the socket layer has gone down
        (closing asyncio's SSL transport while it holds data drops that data), then close;
        the event loop's SSL shutdown timeout (30 s) bounds the rest. A peer that reads
        nothing at all for DRAIN_STALL is aborted."""
        transport = self.transport
        if transport is None or self._lost or self._close_timer is not None:
            return
        self._wait_flushed(transport.get_write_buffer_size(), self.loop.time())

    def _wait_flushed(self, last: int, progress_at: float) -> None:
        self._close_timer = None
        transport = self.transport
        if transport is None or self._lost:
            return
        buffered = transport.get_write_buffer_size()
        if not buffered:
            if not transport.is_closing():
                transport.close()
            return
        now = self.loop.time()
        if buffered < last:
            progress_at = now
        elif now - progress_at >= DRAIN_STALL:
            transport.abort()
            return
        self._close_timer = self.loop.call_later(
            FLUSH_POLL, self._wait_flushed, buffered, progress_at
        )

    def _close_transport(self) -> None:
        """The connection failed or was refused: close now, abort if the peer has not taken
        our last frames (GOAWAY) within CLOSE_GRACE; a broken or abusive peer is owed no
        more, and must not hold the socket and its buffers."""
        transport = self.transport
        if transport is None or self._lost:
            return
        if self._close_timer is not None:
            self._close_timer.cancel()
        if not transport.is_closing():
            transport.close()
        self._close_timer = self.loop.call_later(CLOSE_GRACE, self._close_overdue)

    def _close_overdue(self) -> None:
        self._close_timer = None
        if self.transport is not None and not self._lost:
            self.transport.abort()

    # ---- client side ----

    @property
    def available(self) -> bool:
        """Can carry one more stream (not draining, under the per-connection stream budget)."""
        return (
            not self.closed.done()
            and not self._proto.goaway_received
            and not self._proto.goaway_sent
            and self.streams_opened < p.CLIENT_MAX_STREAMS
            and len(self.streams) < self._proto.peer_max_streams
        )

    @property
    def exhausted(self) -> bool:
        return self.streams_opened >= p.CLIENT_MAX_STREAMS

    def open_stream(self, request: ConnectRequest) -> HboneStream:
        if not self.available:
            raise HboneError("connection cannot take more streams", 503)
        sid = self._proto.open_stream(request)
        s = HboneStream(self, sid)
        s._response = self.loop.create_future()
        self.streams[sid] = s
        self.streams_opened += 1
        self.last_active = self.loop.time()
        self._flush()
        return s

    async def connect(self, request: ConnectRequest, timeout: float) -> HboneStream:
        """Open a CONNECT stream and wait for 200; any other status raises ConnectRejected."""
        s = self.open_stream(request)
        status = await s.response(timeout)
        if status != 200:
            self.streams.pop(s.stream_id, None)
            raise ConnectRejected(f"CONNECT {request.authority} answered {status}", status)
        return s

    # ---- lifecycle ----

    def _tick(self) -> None:
        if self.closed.done():
            return
        if not self._proto.tick(self.loop.time()):
            self.failure = "keepalive PING not answered"
            log.warning("%s: peer stopped answering PINGs, closing", self.name)
            self._teardown(StreamClosed("keepalive timeout"))
            if self.transport is not None:
                self.transport.abort()
            return
        self._flush()
        self._keepalive = self.loop.call_later(KEEPALIVE_TICK, self._tick)

    def goaway(self) -> None:
        """Start a graceful drain: GOAWAY now, close when the last stream finishes."""
        self._proto.goaway()
        self._flush()
        self._close_if_idle()

    def refuse(self, code: int) -> None:
        """Turn a just-established connection away: GOAWAY with `code`, then close."""
        self.failure = f"refused with GOAWAY error code {code}"
        self._proto.goaway(code)
        self._flush()
        self._teardown(StreamClosed(self.failure))

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        self._teardown(StreamClosed("connection aborted"))

    def _teardown(self, exc: BaseException) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
        counters = self._guard.counters
        for s in list(self.streams.values()):
            s._fail(exc)
            if s._abandon():
                counters.streams_cancelled += 1
        self.streams.clear()
        if self._proto.requests_withdrawn:
            counters.streams_cancelled += self._proto.requests_withdrawn
            self._proto.requests_withdrawn = 0
        for w in self._drain_waiters:
            if not w.done():
                w.set_result(None)
        self._drain_waiters.clear()
        if not self.closed.done():
            self.closed.set_result(None)
        self._close_transport()

    async def wait_closed(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(self.closed), timeout)
        except TimeoutError:
            self.abort()

    @property
    def ssl_object(self) -> ssl.SSLObject | None:
        if self.transport is None:
            return None
        obj: Any = self.transport.get_extra_info("ssl_object")
        return obj if isinstance(obj, ssl.SSLObject) else None
