"""The HBONE protocol state machine, without I/O: bytes in, events out, bytes to send.

A thin layer over python-hyper `h2` that fixes Istio's settings (WIRE.md), validates CONNECT
requests, turns h2 errors into GOAWAY, and tracks keepalive PINGs with time passed in. Every
frame received goes through h2 (and the abuse limits); outgoing DATA on open streams is framed
here (`send_data`), since h2's way of doing it was most of the sending agent's HTTP/2 CPU.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import struct
from dataclasses import dataclass
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import h2.stream
import hyperframe.frame

from ztunnel.errors import HboneError
from ztunnel.hbone import limits as lim
from ztunnel.hbone.headers import ConnectRequest, parse_authority
from ztunnel.model import IPAddress

STREAM_WINDOW = 4 * 1024 * 1024
CONNECTION_WINDOW = 16 * 1024 * 1024
MAX_FRAME_SIZE = 1024 * 1024
CLIENT_MAX_STREAMS = 100
SERVER_MAX_STREAMS = 200
PING_INTERVAL = 10.0
PING_TIMEOUT = 20.0
_DEFAULT_WINDOW = 65535
_FRAME_HEADER = struct.Struct(">HBBBL")  # RFC 9113 section 4.1 (length split 16 + 8 bits)
_SENDABLE_STREAM = frozenset({h2.stream.StreamState.OPEN, h2.stream.StreamState.HALF_CLOSED_REMOTE})
_OPEN_CONNECTION = frozenset(
    {h2.connection.ConnectionState.CLIENT_OPEN, h2.connection.ConnectionState.SERVER_OPEN}
)
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class ErrorCode(enum.IntEnum):
    """RFC 9113 section 7."""

    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    CONNECT_ERROR = 0xA
    ENHANCE_YOUR_CALM = 0xB


# ---- events -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConnectRequested:
    """Server: a valid CONNECT arrived."""

    stream_id: int
    target: tuple[IPAddress, int]
    headers: dict[str, str]


@dataclass(frozen=True, slots=True)
class ConnectRefused:
    """Server: a malformed request; the response (`status`) has already been queued."""

    stream_id: int
    status: int
    reason: str


@dataclass(frozen=True, slots=True)
class ResponseReceived:
    """Client: the peer's answer to a CONNECT."""

    stream_id: int
    status: int


@dataclass(frozen=True, slots=True)
class DataReceived:
    stream_id: int
    data: bytes
    flow_controlled_length: int


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer half-closed the stream (END_STREAM)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    stream_id: int
    error_code: int


@dataclass(frozen=True, slots=True)
class WindowOpened:
    """Send capacity grew (stream_id 0 = the whole connection)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class GoawayReceived:
    last_stream_id: int
    error_code: int


@dataclass(frozen=True, slots=True)
class ConnectionFailed:
    """The peer broke the protocol, or went over an abuse limit (`abuse` names which, and
    `error_code` is ENHANCE_YOUR_CALM); a GOAWAY with `error_code` has been queued."""

    error_code: int
    reason: str
    abuse: str = ""


Event = (
    ConnectRequested
    | ConnectRefused
    | ResponseReceived
    | DataReceived
    | StreamEnded
    | StreamReset
    | WindowOpened
    | GoawayReceived
    | ConnectionFailed
)


def _short_hex(data: bytes | None) -> str:
    """hyperframe's `_raw_data_repr`, without hex-encoding the whole frame first."""
    if not data:
        return "None"
    r = bytes(data[:11]).hex()
    return "<hex:" + (r[:20] + "..." if len(r) > 20 else r) + ">"


# h2 formats repr(frame) for a trace log on every received frame, even with logging off, and
# hyperframe hex-encodes a whole DATA frame (up to 1 MiB) to show 10 bytes of it: measured at
# 32-49% of a receiving agent's CPU in bulk transfers. Same output, constant cost.
hyperframe.frame._raw_data_repr = _short_hex


class _GracefulH2Connection(h2.connection.H2Connection):
    """h2 treats any GOAWAY, sent or received, as the end of the whole connection: it closes
    its state machine and drops queued output. RFC 9113 section 6.8 lets streams up to the
    GOAWAY's last stream id finish, which a graceful drain needs; so a NO_ERROR GOAWAY from
    the peer only raises the event here, and ours is written as a bare frame (`goaway`).

    It also counts what the peer sends against `budget` (`ztunnel.hbone.limits`): the frame
    handlers below that h2 dispatches to are the only per-frame hooks, none on DATA with a
    payload."""

    budget: lim.FrameBudget

    def _receive_rst_stream_frame(self, frame: Any) -> tuple[list[Any], list[h2.events.Event]]:
        self.budget.reset()
        return super()._receive_rst_stream_frame(frame)

    def _receive_settings_frame(self, frame: Any) -> tuple[list[Any], list[h2.events.Event]]:
        if "ACK" not in frame.flags:
            self.budget.control(lim.SETTINGS)
            if frame.body_len > 6 * lim.MAX_SETTINGS_ENTRIES:
                raise lim.H2AbuseError(
                    lim.SETTINGS, f"SETTINGS frame of {frame.body_len} bytes (too many entries)"
                )
        return super()._receive_settings_frame(frame)

    def _receive_ping_frame(self, frame: Any) -> tuple[list[Any], list[h2.events.Event]]:
        self.budget.control(lim.PING)
        return super()._receive_ping_frame(frame)

    def _receive_priority_frame(self, frame: Any) -> tuple[list[Any], list[h2.events.Event]]:
        # h2 also routes HEADERS with the PRIORITY flag here: only count PRIORITY frames.
        if isinstance(frame, hyperframe.frame.PriorityFrame):
            self.budget.control(lim.PRIORITY)
        return super()._receive_priority_frame(frame)

    def _receive_window_update_frame(self, frame: Any) -> tuple[list[Any], list[h2.events.Event]]:
        sid = frame.stream_id
        if sid:
            stream = self.streams.get(sid)
            if stream is None or stream.closed:
                self.budget.control(lim.CLOSED_STREAM_FRAMES)
        return super()._receive_window_update_frame(frame)

    def _handle_data_on_closed_stream(
        self, events: list[Any], exc: Any, frame: Any
    ) -> tuple[list[Any], list[h2.events.Event]]:
        # Answered with RST_STREAM by h2 when the stream was reset: an amplifier if uncounted.
        self.budget.control(lim.CLOSED_STREAM_FRAMES)
        return super()._handle_data_on_closed_stream(events, exc, frame)

    def _receive_unknown_frame(self, frame: Any) -> tuple[list[Any], list[h2.events.Event]]:
        self.budget.control(lim.UNKNOWN_FRAMES)
        return super()._receive_unknown_frame(frame)

    def _receive_alt_svc_frame(self, frame: Any) -> tuple[list[Any], list[h2.events.Event]]:
        self.budget.control(lim.UNKNOWN_FRAMES)
        return super()._receive_alt_svc_frame(frame)

    def _receive_goaway_frame(self, frame: Any) -> tuple[list[Any], list[h2.events.Event]]:
        if frame.error_code:
            return super()._receive_goaway_frame(frame)
        ev = h2.events.ConnectionTerminated()
        ev.error_code = h2.errors.ErrorCodes.NO_ERROR
        ev.last_stream_id = frame.last_stream_id
        ev.additional_data = frame.additional_data or None
        return [], [ev]

    def _receive_headers_frame(self, frame: Any) -> tuple[list[Any], list[h2.events.Event]]:
        # h2 turns two stream-level errors into connection errors; RFC 9113 wants them
        # confined to the stream, so one bad request does not kill every tunnel on the
        # connection.
        self.budget.header_block(len(frame.data))
        new = frame.stream_id not in self.streams and not self.config.client_side
        if new and frame.stream_id % 2 == 0:
            # Section 5.1.1: clients open odd streams; anything else is a connection error.
            raise h2.exceptions.ProtocolError(f"client opened even stream {frame.stream_id}")
        if new and self.open_inbound_streams + 1 > self.local_settings.max_concurrent_streams:
            # Section 5.1.2: refuse the stream. Decode the block anyway to keep the HPACK
            # state in step with the peer (section 4.3).
            try:
                self.decoder.decode(frame.data, raw=True)
            except Exception as e:
                raise _CompressionError(f"Error decoding header block: {e}") from None
            self.highest_inbound_stream_id = max(self.highest_inbound_stream_id, frame.stream_id)
            self._write_rst(frame.stream_id, ErrorCode.REFUSED_STREAM)
            # A peer that keeps opening streams past the limit is resetting them in effect.
            self.budget.reset()
            return [], []
        try:
            return super()._receive_headers_frame(frame)
        except h2.exceptions.StreamClosedError:
            # HEADERS for a stream that is gone: h2 answers each with RST_STREAM.
            self.budget.control(lim.CLOSED_STREAM_FRAMES)
            raise
        except (
            h2.exceptions.TooManyStreamsError,
            h2.exceptions.StreamIDTooLowError,
            # An oversized header list (HPACK bomb) leaves the decoder's table half-updated:
            # the connection cannot go on (RFC 9113 section 4.3), ENHANCE_YOUR_CALM.
            h2.exceptions.DenialOfServiceError,
        ):
            raise
        except h2.exceptions.ProtocolError as e:
            if "decoding header block" in str(e):
                raise _CompressionError(str(e)) from None
            if not new:
                raise
            # Section 8.1.1: a malformed request is a stream error of type PROTOCOL_ERROR.
            try:
                self.reset_stream(frame.stream_id, ErrorCode.PROTOCOL_ERROR)
            except h2.exceptions.ProtocolError:
                self._write_rst(frame.stream_id, ErrorCode.PROTOCOL_ERROR)
            return [], []

    def _write_rst(self, stream_id: int, code: int) -> None:
        rst = hyperframe.frame.RstStreamFrame(stream_id)
        rst.error_code = int(code)
        self._data_to_send += rst.serialize()


class _CompressionError(h2.exceptions.ProtocolError):
    """An undecodable header block: connection error COMPRESSION_ERROR (RFC 9113 4.3)."""

    error_code = h2.errors.ErrorCodes.COMPRESSION_ERROR


class HboneProtocol:
    """One HTTP/2 connection carrying HBONE CONNECT streams; `client` selects the side."""

    def __init__(self, client: bool, now: float = 0.0, limits: lim.H2Limits | None = None) -> None:
        self.client = client
        limits = limits or lim.H2Limits()
        # Outbound headers are only ever ours (ConnectRequest, a :status), built from
        # addresses and mesh facts: h2's per-request validation and normalization of them was
        # ~5% of the CPU of a new connection, profiled. The peer's headers are validated.
        cfg = h2.config.H2Configuration(
            client_side=client,
            header_encoding=None,
            validate_inbound_headers=True,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self._h2 = _GracefulH2Connection(cfg)
        # HPACK string literals without Huffman coding (RFC 7541 section 5.2 leaves it to the
        # encoder): our request headers are mostly new per stream (traceparent, the client
        # port in forwarded), and hpack's pure-Python Huffman coder was ~20% of the protocol
        # CPU per stream, measured; the header block grows by some 60 bytes. Decoding of the
        # peer's headers (Huffman or not) is unchanged.
        encoder = self._h2.encoder
        encoder.encode = functools.partial(encoder.encode, huffman=False)  # type: ignore[method-assign]
        self._budget = self._h2.budget = lim.FrameBudget(limits, now)
        # Our MAX_HEADER_LIST_SIZE binds the HPACK decoder at once, not when the peer ACKs it.
        self._h2.decoder.max_header_list_size = limits.max_header_list_size
        # Server: ConnectRequested events of the current read, by stream id, so that a reset
        # in the same read withdraws the request before anyone acts on it.
        self._batch_requests: dict[int, int] = {}
        self._withdrawn = False
        self.requests_withdrawn = 0
        self.closed = False
        # The peer's first bytes until its first frame header is complete: RFC 9113 section
        # 3.4 requires the connection preface to start with a SETTINGS frame.
        self._opening: bytearray | None = bytearray()
        self.goaway_received = False
        self.goaway_sent = False
        self._last_seen = now
        self._ping_outstanding: float | None = None
        self._ping_seq = 0
        max_streams = CLIENT_MAX_STREAMS if client else SERVER_MAX_STREAMS
        self._h2.local_settings = h2.settings.Settings(
            client=client,
            initial_values={
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_streams,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_list_size,
            },
        )
        # h2 applies our MAX_FRAME_SIZE only once the peer ACKs it, yet a peer may send large
        # frames in the same read as that ACK; accepting them early is harmless.
        self._h2.max_inbound_frame_size = MAX_FRAME_SIZE
        self._h2.initiate_connection()
        self._h2.increment_flow_control_window(CONNECTION_WINDOW - _DEFAULT_WINDOW)

    # ---- output ----

    def data_to_send(self) -> bytes | bytearray:
        """Everything queued for the peer. The buffer itself is handed over (h2 would copy
        it into a new bytes object); it is never written to again."""
        out = self._h2._data_to_send
        if not out:
            return b""
        self._h2._data_to_send = bytearray()
        return out

    # ---- input ----

    def receive(self, data: bytes, now: float) -> list[Event]:
        """Feed bytes from the peer; returns what happened."""
        if self.closed:
            return []
        self._last_seen = now
        if self._opening is not None:
            failure = self._check_opening(data)
            if failure:
                return [self._fail(ErrorCode.PROTOCOL_ERROR, failure)]
        self._budget.roll(now)
        out: list[Any] = []
        try:
            for ev in self._h2.receive_data(data):
                self._translate(ev, out)
            # h2 holds a HEADERS frame and up to 64 CONTINUATIONs (of up to MAX_FRAME_SIZE
            # each) before anything decodes them: bound a block still open after this read
            # (a complete one is checked in _receive_headers_frame). Checked per read, not
            # per frame: the data path pays one attribute test.
            if pending := self._h2.incoming_buffer._headers_buffer:
                self._budget.header_block(sum(len(f.data) for f in pending))
        except lim.H2AbuseError as e:
            return [self._fail(ErrorCode.ENHANCE_YOUR_CALM, str(e), e.kind)]
        except h2.exceptions.DenialOfServiceError as e:
            return [self._fail(ErrorCode.ENHANCE_YOUR_CALM, str(e), lim.HEADER_LIST)]
        except h2.exceptions.ProtocolError as e:
            code = getattr(e, "error_code", None) or ErrorCode.PROTOCOL_ERROR
            return [self._fail(int(code), f"{type(e).__name__}: {e}")]
        if self._batch_requests:
            self._batch_requests.clear()
        if self._withdrawn:
            self._withdrawn = False
            out = [e for e in out if e is not None]
        return out

    def _check_opening(self, data: bytes) -> str:
        assert self._opening is not None
        self._opening += data
        skip = 0 if self.client else len(_PREFACE)
        if not self.client and self._opening[: len(_PREFACE)] != _PREFACE[: len(self._opening)]:
            self._opening = None
            return "invalid connection preface"
        if len(self._opening) < skip + 9:
            return ""
        frame_type, flags = self._opening[skip + 3], self._opening[skip + 4]
        self._opening = None
        if frame_type != 0x4 or flags & 0x1:
            return "the connection preface must begin with a SETTINGS frame"
        return ""

    def _translate(self, ev: h2.events.Event, out: list[Any]) -> None:
        if isinstance(ev, h2.events.DataReceived):
            n = ev.flow_controlled_length
            out.append(DataReceived(ev.stream_id, ev.data, n))
            if ev.stream_ended is not None:
                out.append(StreamEnded(ev.stream_id))
            elif not n:
                self._budget.control(lim.EMPTY_DATA)
        elif isinstance(ev, h2.events.RequestReceived):
            self._on_request(ev, out)
        elif isinstance(ev, h2.events.ResponseReceived):
            status = 0
            for k, v in ev.headers:
                if k == b":status":
                    status = int(v) if v.isdigit() else 0
            out.append(ResponseReceived(ev.stream_id, status))
            if ev.stream_ended is not None:
                out.append(StreamEnded(ev.stream_id))
        elif isinstance(ev, h2.events.StreamEnded):
            out.append(StreamEnded(ev.stream_id))
        elif isinstance(ev, h2.events.StreamReset):
            i = self._batch_requests.pop(ev.stream_id, None)
            if i is not None:
                # Requested and reset in one read (rapid reset, CVE-2023-44487): the request
                # never surfaces, so no upstream work starts for it.
                out[i] = None
                self._withdrawn = True
                self.requests_withdrawn += 1
                return
            out.append(StreamReset(ev.stream_id, int(ev.error_code or 0)))
        elif isinstance(ev, h2.events.WindowUpdated):
            out.append(WindowOpened(ev.stream_id or 0))
        elif isinstance(ev, h2.events.RemoteSettingsChanged):
            # A bigger initial window from the peer opens every stream.
            out.append(WindowOpened(0))
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.goaway_received = True
            out.append(GoawayReceived(int(ev.last_stream_id or 0), int(ev.error_code or 0)))
        elif isinstance(ev, h2.events.PingAckReceived):
            self._ping_outstanding = None
        elif isinstance(ev, h2.events.TrailersReceived) and ev.stream_ended is not None:
            out.append(StreamEnded(ev.stream_id))

    def _on_request(self, ev: h2.events.RequestReceived, out: list[Any]) -> None:
        headers: dict[str, str] = {}
        for k, v in ev.headers:
            headers[k.decode("latin-1")] = v.decode("latin-1")
        sid = ev.stream_id
        if headers.get(":method") != "CONNECT":
            return out.append(
                self._refuse(sid, 400, f"method {headers.get(':method')!r} is not CONNECT")
            )
        try:
            target = parse_authority(headers.get(":authority", ""))
        except HboneError as e:
            return out.append(self._refuse(sid, 400, str(e)))
        if self.goaway_sent:
            # Draining: streams above our GOAWAY's last id are refused (RFC 9113 6.8).
            self._h2.reset_stream(sid, ErrorCode.REFUSED_STREAM)
            return out.append(StreamReset(sid, ErrorCode.REFUSED_STREAM))
        self._batch_requests[sid] = len(out)
        out.append(ConnectRequested(sid, target, headers))
        if ev.stream_ended is not None:
            out.append(StreamEnded(sid))

    def _refuse(self, stream_id: int, status: int, reason: str) -> ConnectRefused:
        self.respond(stream_id, status, end_stream=True)
        return ConnectRefused(stream_id, status, reason)

    def _fail(self, code: int, reason: str, abuse: str = "") -> ConnectionFailed:
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self._h2.close_connection(error_code=code)
        self.closed = True
        self.goaway_sent = True
        return ConnectionFailed(code, reason, abuse)

    # ---- commands ----

    def open_stream(self, request: ConnectRequest) -> int:
        sid: int = self._h2.get_next_available_stream_id()
        self._h2.send_headers(sid, request.header_list())
        return sid

    def respond(self, stream_id: int, status: int, end_stream: bool = False) -> None:
        with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self._h2.send_headers(
                stream_id, [(b":status", str(status).encode())], end_stream=end_stream
            )

    def send_capacity(self, stream_id: int) -> int:
        """How many bytes may be sent on the stream right now (0 if closed)."""
        try:
            return int(self._h2.local_flow_control_window(stream_id))
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, KeyError):
            return 0

    def send_data(self, stream_id: int, data: bytes | memoryview) -> int:
        """Queue as much of `data` as flow control allows; returns the count queued.

        On an open stream of an open connection, DATA frames are written here rather than by
        h2: for those states h2's SEND_DATA transitions change nothing (h2/stream.py and
        h2/connection.py transition tables), so what h2 would do is decrement both send
        windows and serialize the frame (RFC 9113 section 6.1) -- which it does through a
        DataFrame object, a copy of the payload, a copy for the header and a join. Measured
        with bench/hbone_bench.py: the bulk of the sender's own HTTP/2 CPU. Any other state
        takes h2's path (and its errors)."""
        h2c = self._h2
        stream = h2c.streams.get(stream_id)
        if (
            stream is None
            or stream.state_machine.state not in _SENDABLE_STREAM
            or h2c.state_machine.state not in _OPEN_CONNECTION
        ):
            return self._send_data_h2(stream_id, data)
        n = min(len(data), h2c.outbound_flow_control_window, stream.outbound_flow_control_window)
        if n <= 0:
            return 0
        max_frame = int(h2c.max_outbound_frame_size)
        out = h2c._data_to_send
        sent = 0
        while sent < n:
            size = min(max_frame, n - sent)
            # 9-byte frame header: length (24 bits), type DATA (0), flags 0, stream id.
            out += _FRAME_HEADER.pack(size >> 8, size & 0xFF, 0, 0, stream_id)
            out += data[sent : sent + size]
            sent += size
        stream.outbound_flow_control_window -= n
        h2c.outbound_flow_control_window -= n
        return n

    def _send_data_h2(self, stream_id: int, data: bytes | memoryview) -> int:
        window = self.send_capacity(stream_id)
        if window <= 0:
            return 0
        max_frame = int(self._h2.max_outbound_frame_size)
        n = min(len(data), window)
        sent = 0
        try:
            while sent < n:
                chunk = data[sent : sent + min(max_frame, n - sent)]
                self._h2.send_data(stream_id, chunk)
                sent += len(chunk)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass
        return sent

    def end_stream(self, stream_id: int) -> None:
        with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self._h2.end_stream(stream_id)

    def reset_stream(self, stream_id: int, code: int = ErrorCode.CANCEL) -> None:
        with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self._h2.reset_stream(stream_id, code)

    def consumed(self, stream_id: int, n: int) -> None:
        """The application took `n` bytes: give the peer that much window back."""
        if n <= 0:
            return
        try:
            self._h2.acknowledge_received_data(n, stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, KeyError):
            # The stream is gone; still return the connection-level window.
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self._h2.increment_flow_control_window(n)

    def goaway(self, code: int = ErrorCode.NO_ERROR) -> None:
        """Graceful drain: no new streams; existing ones finish (RFC 9113 section 6.8)."""
        if not self.goaway_sent and not self.closed:
            self.goaway_sent = True
            if code != ErrorCode.NO_ERROR:
                self._h2.close_connection(
                    error_code=code, last_stream_id=self._highest_peer_stream()
                )
                return
            frame = hyperframe.frame.GoAwayFrame(stream_id=0)
            frame.last_stream_id = self._highest_peer_stream()
            frame.error_code = int(code)
            self._h2._data_to_send += frame.serialize()

    def _highest_peer_stream(self) -> int:
        return int(self._h2.highest_inbound_stream_id)

    @property
    def open_streams(self) -> int:
        if self.client:
            return int(self._h2.open_outbound_streams)
        return int(self._h2.open_inbound_streams)

    @property
    def peer_max_streams(self) -> int:
        return int(self._h2.remote_settings.max_concurrent_streams)

    # ---- time ----

    def tick(self, now: float) -> bool:
        """Keepalive: send a PING after PING_INTERVAL of silence; False when the peer is dead
        (no answer for PING_TIMEOUT), in which case the caller closes the connection."""
        if self.closed:
            return False
        if self._ping_outstanding is not None:
            return now - self._ping_outstanding < PING_TIMEOUT
        if now - self._last_seen >= PING_INTERVAL:
            self._ping_seq += 1
            self._h2.ping(self._ping_seq.to_bytes(8, "big"))
            self._ping_outstanding = now
        return True
