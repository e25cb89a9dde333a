"""HTTP/1.1 over h11, server and client side, on any ByteStream.

The server reads one request at a time (h11 is sequential; pipelined requests wait), hands
its head and a streaming body to the handler, writes the response (chunked when its length
is unknown, with trailers), and keeps the connection for the next request only when both
sides finished cleanly. Bad input gets a 4xx and a closed connection: malformed syntax 400,
headers over the limit 431, both Content-Length and Transfer-Encoding 400 (RFC 9112
section 6.1: the classic smuggling vector), a client too slow to send its head 408."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterable, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import h11

from waypoint.http.errors import ProtocolError, UpstreamError
from waypoint.http.messages import (
    BodyChannel,
    BodyClosed,
    HeaderList,
    RequestHead,
    ResponseHead,
    forwardable,
    header,
)
from waypoint.http.streams import ByteStream

log = logging.getLogger(__name__)

DISCARD_LIMIT = 1 << 20  # unread request body we read and drop to keep a connection


@dataclass(frozen=True)
class ServerLimits:
    max_header_bytes: int = 60 * 1024  # Envoy's default max_request_headers_kb
    max_headers: int = 100
    header_timeout: float = 30.0  # a request head must arrive within this
    idle_timeout: float = 300.0  # between requests on a kept-alive connection
    body_timeout: float = 60.0  # the request body must make progress within this


@dataclass
class Response:
    head: ResponseHead
    body: BodyChannel

    @classmethod
    def simple(cls, status: int, text: str = "", headers: HeaderList | None = None) -> Response:
        data = text.encode()
        hdrs = list(headers or [])
        if text and header(hdrs, "content-type") is None:
            hdrs.append(("content-type", "text/plain"))
        hdrs.append(("content-length", str(len(data))))
        return cls(ResponseHead(status, hdrs), BodyChannel.of(data))


Handler = Callable[[RequestHead, BodyChannel], Awaitable[Response]]


def _enc(headers: HeaderList) -> list[tuple[bytes, bytes]]:
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]


def _dec(headers: Any) -> HeaderList:
    return [(bytes(k).decode("latin-1").lower(), bytes(v).decode("latin-1")) for k, v in headers]


async def _next_event(conn: h11.Connection, stream: ByteStream) -> Any:
    while True:
        ev = conn.next_event()
        if ev is not h11.NEED_DATA:
            return ev
        data = await stream.read()
        conn.receive_data(data)


async def _send(conn: h11.Connection, stream: ByteStream, event: Any) -> None:
    data = conn.send(event)
    if data:
        await stream.write(data)


def _no_body(method: str, status: int) -> bool:
    return method == "HEAD" or status in (204, 304) or 100 <= status < 200


async def serve_h1(
    stream: ByteStream,
    handler: Handler,
    limits: ServerLimits = ServerLimits(),
    scheme: str = "http",
) -> None:
    """Serve requests on `stream` until the client closes, errs, or the connection cannot be
    reused. Never raises for bad input: answers and closes."""
    limits = limits or ServerLimits()
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
    first = True
    try:
        while True:
            try:
                ev = await _read_head(conn, stream, limits, first)
            except ProtocolError as e:
                await _refuse(conn, stream, e.status, str(e))
                return
            first = False
            if isinstance(ev, h11.ConnectionClosed) or ev is None:
                return
            if not isinstance(ev, h11.Request):
                return
            if not await _serve_one(conn, stream, handler, limits, ev, scheme):
                return
            if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                conn.start_next_cycle()
            else:
                return
    except (ConnectionError, OSError, h11.LocalProtocolError) as e:
        log.debug("HTTP/1.1 connection from %s ended: %s", stream.peer(), e)
    finally:
        stream.end()


async def _read_head(
    conn: h11.Connection, stream: ByteStream, limits: ServerLimits, first: bool
) -> Any:
    # Between requests the client may idle; once it starts a request, the head must follow.
    try:
        if not first and conn.their_state is h11.IDLE and not conn.trailing_data[0]:
            async with asyncio.timeout(limits.idle_timeout):
                data = await stream.read()
            conn.receive_data(data)
            ev = conn.next_event()  # the head usually came whole: no second timer
            if ev is not h11.NEED_DATA:
                return ev
        async with asyncio.timeout(limits.header_timeout):
            return await _next_event(conn, stream)
    except TimeoutError:
        if conn.their_state is h11.IDLE and not conn.trailing_data[0]:
            return None  # idle keep-alive connection: close quietly
        raise ProtocolError(408, "request head not received in time") from None
    except h11.RemoteProtocolError as e:
        raise ProtocolError(e.error_status_hint, f"malformed request: {e}") from None


def _request_head(
    ev: h11.Request, headers: HeaderList, limits: ServerLimits, scheme: str
) -> RequestHead:
    if len(headers) > limits.max_headers:
        raise ProtocolError(431, f"more than {limits.max_headers} header fields")
    names = [k for k, _ in headers]
    if "content-length" in names and "transfer-encoding" in names:
        raise ProtocolError(400, "both Content-Length and Transfer-Encoding")
    te = header(headers, "transfer-encoding")
    if te is not None and te.strip().lower() != "chunked":
        raise ProtocolError(501, f"unsupported Transfer-Encoding {te!r}")
    host = header(headers, "host") or ""
    target = ev.target.decode("latin-1")
    if not target.startswith("/"):
        if target == "*" and ev.method == b"OPTIONS":
            pass
        elif "://" in target:  # absolute-form (RFC 9112 section 3.2.2)
            rest = target.split("://", 1)[1]
            host, _, path = rest.partition("/")
            target = "/" + path
        else:
            raise ProtocolError(400, f"bad request target {target!r}")
    return RequestHead(
        ev.method.decode("latin-1").upper(),
        target,
        host,
        scheme,
        [(k, v) for k, v in headers if k != "host"],
        "HTTP/" + ev.http_version.decode(),
    )


async def _serve_one(
    conn: h11.Connection,
    stream: ByteStream,
    handler: Handler,
    limits: ServerLimits,
    ev: h11.Request,
    scheme: str,
) -> bool:
    ev_headers = _dec(ev.headers)
    try:
        head = _request_head(ev, ev_headers, limits, scheme)
    except ProtocolError as e:
        await _refuse(conn, stream, e.status, str(e))
        return False
    body = BodyChannel()
    if header(ev_headers, "content-length") is None and (
        header(ev_headers, "transfer-encoding") is None
    ):
        # RFC 9112 section 6.3: neither field, no body. Known now, so that an upstream
        # request can be sent with Content-Length 0 and its connection reused.
        body.end()
    pump: asyncio.Future[bool]
    end: Any = conn.next_event() if body.ended else h11.NEED_DATA
    if end is not h11.NEED_DATA:
        # No body, and h11 has its end already (a GET): known at once, no pump task.
        pump = asyncio.get_running_loop().create_future()
        pump.set_result(isinstance(end, h11.EndOfMessage))
    else:
        pump = asyncio.ensure_future(_pump_request(conn, stream, body, limits))
        pump.set_name(f"h1-body {stream.peer()}")
    try:
        try:
            response = await handler(head, body)
        except Exception:
            log.exception("request handler failed")
            response = Response.simple(500, "internal error\n")
        ok = await _write_response(conn, stream, head, response)
        if not ok:
            return False
        # Whatever of the request body the handler left is read and dropped (bounded).
        body.fail(BodyClosed("response already sent"))
        return await pump
    finally:
        if not pump.done():
            pump.cancel()
            with contextlib.suppress(BaseException):
                await pump


async def _pump_request(
    conn: h11.Connection, stream: ByteStream, body: BodyChannel, limits: ServerLimits
) -> bool:
    """Feed the request body into `body`; True when it was read to its end (the connection
    can serve another request)."""
    discarded = 0
    try:
        while True:
            async with asyncio.timeout(limits.body_timeout):
                ev = await _next_event(conn, stream)
            if isinstance(ev, h11.Data):
                if body.failed is None:
                    try:
                        await body.put(bytes(ev.data))
                        continue
                    except BodyClosed:
                        pass
                discarded += len(ev.data)
                if discarded > DISCARD_LIMIT:
                    return False
            elif isinstance(ev, h11.EndOfMessage):
                if not body.ended or ev.headers:
                    body.end(_dec(ev.headers))
                return True
            else:
                body.fail(ConnectionResetError("client closed before the end of the body"))
                return False
    except TimeoutError:
        body.fail(TimeoutError("request body stalled"))
        return False
    except h11.RemoteProtocolError as e:
        body.fail(ProtocolError(400, f"malformed request body: {e}"))
        return False
    except (ConnectionError, OSError) as e:
        body.fail(e)
        return False


async def _write_response(
    conn: h11.Connection, stream: ByteStream, req: RequestHead, response: Response
) -> bool:
    head = response.head
    headers = forwardable(head.headers)
    no_body = _no_body(req.method, head.status)
    chunked = header(headers, "content-length") is None and not no_body
    if conn.their_http_version == b"1.0" and chunked:
        headers.append(("connection", "close"))
    body = response.body
    try:
        # What is ready goes out in one write: the head, the body chunks already there and,
        # when the body is complete, its end (one DATA frame and TLS record for a small
        # answer instead of one per piece).
        parts = [conn.send(h11.Response(status_code=head.status, headers=_enc(headers)))]
        if not no_body:
            parts += [conn.send(h11.Data(data=chunk)) for chunk in body.take_ready()]
            if not body.complete:
                await stream.write(b"".join(p for p in parts if p))
                parts = []
                async for chunk in body:
                    await _send(conn, stream, h11.Data(data=chunk))
        trailers = body.trailers if chunked and conn.their_http_version != b"1.0" else []
        parts.append(conn.send(h11.EndOfMessage(headers=_enc(forwardable(trailers)))))
        await stream.write(b"".join(p for p in parts if p))
    except BodyClosed as e:
        log.info("response body to %s broke off: %s", stream.peer(), e)
        stream.abort()
        return False
    except h11.LocalProtocolError as e:
        log.info("cannot send the response to %s: %s", stream.peer(), e)
        stream.abort()
        return False
    return True


async def _refuse(conn: h11.Connection, stream: ByteStream, status: int, reason: str) -> None:
    log.info("refusing HTTP/1.1 request from %s: %d %s", stream.peer(), status, reason)
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        stream.abort()
        return
    body = f"{reason}\n".encode()
    with contextlib.suppress(Exception):
        await stream.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%s"
            % (status, _REASONS.get(status, b"Error"), len(body), body)
        )


_REASONS = {
    400: b"Bad Request",
    408: b"Request Timeout",
    413: b"Payload Too Large",
    431: b"Request Header Fields Too Large",
    501: b"Not Implemented",
}


# ---- client ----------------------------------------------------------------------------------


class H1ClientConnection:
    """One upstream HTTP/1.1 connection; `request` sends one request at a time."""

    def __init__(self, stream: ByteStream, max_header_bytes: int = 60 * 1024) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_header_bytes)
        self.requests = 0
        self.busy = False
        self.broken = False
        self._sender: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self.idle_since = 0.0

    @property
    def reusable(self) -> bool:
        return (
            not self.broken
            and not self.busy
            and self.conn.our_state is h11.IDLE
            and self.conn.their_state is h11.IDLE
        )

    async def request(
        self,
        head: RequestHead,
        body: AsyncIterable[bytes],
        length: int | None,
        trailers: Callable[[], HeaderList],
    ) -> tuple[ResponseHead, BodyChannel]:
        """Send the request (its body streamed from `body`) and wait for the response head;
        UpstreamError("reset") when the connection breaks before it."""
        self.busy = True
        self.requests += 1
        self._sender = None
        headers = [("host", head.authority), *forwardable(head.headers)]
        headers = [(k, v) for k, v in headers if k != "content-length"]
        chunked = length is None
        if chunked:
            headers.append(("transfer-encoding", "chunked"))
        elif length or head.method in ("POST", "PUT", "PATCH"):
            headers.append(("content-length", str(length)))
        try:
            data = self.conn.send(
                h11.Request(method=head.method, target=head.path, headers=_enc(headers))
            )
            if length == 0:
                # No body: the head and its end go out in one write, and no sender task.
                data = (data or b"") + (self.conn.send(h11.EndOfMessage()) or b"")
            if data:
                await self.stream.write(data)
        except (ConnectionError, OSError, h11.LocalProtocolError) as e:
            self.broken = True
            raise UpstreamError("reset", f"upstream connection failed: {e}") from None
        if length != 0:
            self._sender = asyncio.ensure_future(self._send_body(body, chunked, trailers))
        try:
            while True:
                ev = await _next_event(self.conn, self.stream)
                if isinstance(ev, h11.InformationalResponse):
                    continue
                break
        except (ConnectionError, OSError, h11.RemoteProtocolError) as e:
            self.broken = True
            self._cancel_sender()
            raise UpstreamError("reset", f"upstream reset before the response: {e}") from None
        if not isinstance(ev, h11.Response):
            self.broken = True
            self._cancel_sender()
            raise UpstreamError("reset", "upstream closed the connection before responding")
        response = ResponseHead(ev.status_code, _dec(ev.headers))
        channel = BodyChannel()
        # A small response arrives with its head: h11 holds all of it already, and the
        # body is complete without a reader task.
        if not self._take_buffered(channel):
            self._reader = asyncio.ensure_future(self._read_body(channel))
        return response, channel

    def _cancel_sender(self) -> None:
        if self._sender is not None:
            self._sender.cancel()

    def _take_buffered(self, channel: BodyChannel) -> bool:
        """Move the body events h11 already holds into `channel`; True when the response
        is finished (complete or failed), False when more must be read."""
        try:
            while True:
                ev = self.conn.next_event()
                if ev is h11.NEED_DATA:
                    return False
                if isinstance(ev, h11.Data):
                    channel.put_nowait(bytes(ev.data))
                elif isinstance(ev, h11.EndOfMessage):
                    self._complete(channel, _dec(ev.headers))
                    return True
                else:
                    raise ConnectionResetError("upstream closed during the response body")
        except (ConnectionError, h11.RemoteProtocolError) as e:
            self._broke(channel, e)
            return True

    def _complete(self, channel: BodyChannel, trailers: HeaderList) -> None:
        """The response is read to its end: settle the connection's reuse first, then end
        the body (whose done callbacks may put this connection back in the pool)."""
        if self._sender is not None and not self._sender.done():
            # The response is complete before the request body was sent: never reuse.
            self.broken = True
            self._sender.cancel()
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        else:
            self.broken = True
        self.busy = False
        self.idle_since = asyncio.get_running_loop().time()
        channel.end(trailers)

    def _broke(self, channel: BodyChannel, error: BaseException) -> None:
        self.broken = True
        self.busy = False
        self.stream.abort()
        channel.fail(error)

    async def _send_body(
        self, body: AsyncIterable[bytes], chunked: bool, trailers: Callable[[], HeaderList]
    ) -> None:
        try:
            async for chunk in body:
                await _send(self.conn, self.stream, h11.Data(data=chunk))
            extra = _enc(forwardable(trailers())) if chunked else []
            await _send(self.conn, self.stream, h11.EndOfMessage(headers=extra))
        except (BodyClosed, ConnectionError, OSError, h11.LocalProtocolError) as e:
            log.debug("request body to upstream %s ended early: %s", self.stream.peer(), e)
            self.broken = True
            self.stream.abort()

    async def _read_body(self, channel: BodyChannel) -> None:
        try:
            while True:
                ev = await _next_event(self.conn, self.stream)
                if isinstance(ev, h11.Data):
                    await channel.put(bytes(ev.data))
                elif isinstance(ev, h11.EndOfMessage):
                    self._complete(channel, _dec(ev.headers))
                    return
                else:
                    raise ConnectionResetError("upstream closed during the response body")
        except (ConnectionError, OSError, h11.RemoteProtocolError, BodyClosed) as e:
            self._broke(channel, e)
        finally:
            if self.busy:  # cancelled
                self.busy = False
                self.idle_since = asyncio.get_running_loop().time()

    def close(self) -> None:
        self.broken = True
        for t in (self._sender, self._reader):
            if t is not None and not t.done():
                t.cancel()
        self.stream.abort()
