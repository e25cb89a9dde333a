"""HTTP/2 abuse limits of `HboneProtocol`, without sockets: what a peer may send per window
before GOAWAY ENHANCE_YOUR_CALM, that normal traffic never comes near them, and structured
fuzzing of frame sequences in both directions. Frames are built by hand (tests/h2wire.py)."""

from __future__ import annotations

import struct
import time

import hpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.h2wire import frame
from tests.unit.hbone.test_hbone_protocol import (
    CONNECT_1,
    END_HEADERS,
    END_STREAM,
    OK_START,
    PREFACE,
    Pair,
    goaways,
    headers_frame,
    of_type,
    settings_frame,
)
from ztunnel.hbone import limits as lim
from ztunnel.hbone import protocol as p
from ztunnel.hbone.headers import ConnectRequest

pytestmark = pytest.mark.unit

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PING, WINDOW_UPDATE = 0, 1, 2, 3, 4, 6, 8
CONTINUATION, ALTSVC = 0x9, 0xA
ACK = 0x1
CANCEL, CALM = 0x8, 0xB
LIMITS = lim.H2Limits(window=10.0, max_resets=20, max_control_frames=30)


def server(limits: lim.H2Limits = LIMITS) -> p.HboneProtocol:
    s = p.HboneProtocol(False, 0.0, limits)
    s.data_to_send()
    return s


def connect(sid: int, authority: str = "10.0.0.1:8080") -> bytes:
    return headers_frame(sid, [(":method", "CONNECT"), (":authority", authority)])


def rst(sid: int) -> bytes:
    return frame(RST_STREAM, 0, sid, struct.pack("!I", CANCEL))


def calm(s: p.HboneProtocol, events: list[p.Event], kind: str) -> None:
    failed = of_type(events, p.ConnectionFailed)
    assert len(failed) == 1, events
    assert failed[0].error_code == CALM and failed[0].abuse == kind, failed
    assert {code for _, code in goaways(s.data_to_send())} == {CALM}
    assert s.closed


# ---- rapid reset -------------------------------------------------------------------------------


def test_a_request_reset_in_the_same_read_never_surfaces() -> None:
    s = server()
    events = s.receive(OK_START + connect(1) + rst(1) + connect(3), 0.0)
    requested = [e.stream_id for e in of_type(events, p.ConnectRequested)]
    assert requested == [3]
    assert not of_type(events, p.StreamReset)  # nothing to tell: nobody knew stream 1
    assert s.requests_withdrawn == 1


def test_a_reset_in_a_later_read_is_reported() -> None:
    s = server()
    assert of_type(s.receive(OK_START + connect(1), 0.0), p.ConnectRequested)
    assert s.receive(rst(1), 0.0) == [p.StreamReset(1, CANCEL)]


def test_resets_over_the_limit_get_goaway_enhance_your_calm() -> None:
    s = server()
    s.receive(OK_START, 0.0)
    for i in range(LIMITS.max_resets):
        sid = 2 * i + 1
        assert not of_type(s.receive(connect(sid) + rst(sid), 1.0), p.ConnectionFailed)
    sid = 2 * LIMITS.max_resets + 1
    calm(s, s.receive(connect(sid) + rst(sid), 1.0), lim.RESETS)


def test_one_read_of_thousands_of_pairs_stops_at_the_limit_quickly() -> None:
    s = server(lim.H2Limits())
    block = hpack.Encoder().encode([(":method", "CONNECT"), (":authority", "10.0.0.1:80")])
    pairs = b"".join(
        frame(HEADERS, END_HEADERS, 2 * i + 1, block) + rst(2 * i + 1) for i in range(20_000)
    )
    t0 = time.process_time()
    events = s.receive(OK_START + pairs, 0.0)
    assert time.process_time() - t0 < 1.0  # ~0.2 ms per pair up to the 201st, then nothing
    calm(s, events, lim.RESETS)
    assert not of_type(events, p.ConnectRequested)


def test_the_reset_budget_is_per_window() -> None:
    s = server()
    s.receive(OK_START, 0.0)
    sid = 1
    for start in (0.0, 10.5, 21.0):  # three windows, each just under the limit
        for _ in range(LIMITS.max_resets):
            assert not of_type(s.receive(connect(sid) + rst(sid), start + 0.1), p.ConnectionFailed)
            sid += 2
    assert not s.closed


def test_refused_streams_count_as_resets() -> None:
    """A peer that keeps opening streams past MAX_CONCURRENT_STREAMS (200) and never waits."""
    s = server()
    s.receive(OK_START + b"".join(connect(2 * i + 1) for i in range(p.SERVER_MAX_STREAMS)), 0.0)
    out = b"".join(connect(2 * (p.SERVER_MAX_STREAMS + i) + 1) for i in range(LIMITS.max_resets))
    assert not of_type(s.receive(out, 0.0), p.ConnectionFailed)
    calm(s, s.receive(connect(2 * (p.SERVER_MAX_STREAMS + LIMITS.max_resets) + 1), 0.0), lim.RESETS)


def test_a_pooled_clients_normal_life_stays_within_every_limit() -> None:
    """100 streams over a connection's life (the pool's budget), each reset by the client
    after some data, keepalive PINGs, window updates: nothing is cut off with defaults."""
    pair = Pair(p.HboneProtocol(True, 0.0), p.HboneProtocol(False, 0.0))
    pair.pump()
    now = 0.0
    for i in range(p.CLIENT_MAX_STREAMS):
        sid = pair.c.open_stream(ConnectRequest("10.0.0.1:8080"))
        pair.pump(now)
        pair.s.respond(sid, 200)
        pair.c.send_data(sid, b"x" * 1000)
        pair.pump(now)
        pair.s.consumed(sid, 1000)
        (pair.c if i % 2 else pair.s).reset_stream(sid)
        pair.pump(now)
        now += 0.01
        pair.c.tick(now + 10.0 * (i % 3 == 0))
        pair.s.tick(now + 10.0 * (i % 3 == 0))
    cev, sev = pair.pump(now)
    assert not of_type(cev + sev, p.ConnectionFailed)
    assert not pair.c.closed and not pair.s.closed


# ---- control-frame floods -------------------------------------------------------------------


FLOODS = [
    (lim.SETTINGS, settings_frame()),
    (lim.PING, frame(PING, 0, 0, bytes(8))),
    (lim.PING, frame(PING, ACK, 0, bytes(8))),  # unsolicited ACKs cost CPU too
    (lim.PRIORITY, frame(PRIORITY, 0, 1, struct.pack("!IB", 0, 15))),
    (lim.CLOSED_STREAM_FRAMES, frame(WINDOW_UPDATE, 0, 1, struct.pack("!I", 1))),
    (lim.UNKNOWN_FRAMES, frame(0x42, 0, 0, b"anything")),
    (lim.UNKNOWN_FRAMES, frame(ALTSVC, 0, 0, b"\x00\x00")),
]


@pytest.mark.parametrize(
    ("kind", "one"), FLOODS, ids=[f"{k}-{i}" for i, (k, _) in enumerate(FLOODS)]
)
def test_control_frame_floods_get_goaway_enhance_your_calm(kind: str, one: bytes) -> None:
    s = server()
    # Stream 1 exists and is finished, so that frames for it are frames for a closed stream.
    s.receive(OK_START + connect(1) + rst(1), 0.0)
    s.data_to_send()
    already = 1 if kind == lim.SETTINGS else 0  # the SETTINGS of the connection preface
    events = s.receive(one * (LIMITS.max_control_frames - already), 1.0)
    assert not of_type(events, p.ConnectionFailed), events
    calm(s, s.receive(one, 1.0), kind)


def test_empty_data_frames_are_a_flood_but_end_stream_is_not() -> None:
    s = server()
    s.receive(OK_START + connect(1), 0.0)
    s.respond(1, 200)
    s.data_to_send()
    empty = frame(DATA, 0, 1)
    assert not of_type(s.receive(empty * LIMITS.max_control_frames, 0.0), p.ConnectionFailed)
    calm(s, s.receive(empty, 0.0), lim.EMPTY_DATA)
    fine = server()
    events = fine.receive(OK_START + connect(1) + frame(DATA, END_STREAM, 1), 0.0)
    assert p.StreamEnded(1) in events


def test_data_for_a_reset_stream_is_answered_at_most_the_limit_times() -> None:
    s = server()
    s.receive(OK_START + connect(1), 0.0)
    s.reset_stream(1)
    s.data_to_send()
    data = frame(DATA, 0, 1, b"x")
    assert not of_type(s.receive(data * LIMITS.max_control_frames, 0.0), p.ConnectionFailed)
    calm(s, s.receive(data, 0.0), lim.CLOSED_STREAM_FRAMES)


def test_a_settings_frame_with_too_many_entries_is_refused() -> None:
    s = server()
    many = frame(SETTINGS, 0, 0, struct.pack("!HI", 0x4, 65535) * (lim.MAX_SETTINGS_ENTRIES + 1))
    calm(s, s.receive(PREFACE + many, 0.0), lim.SETTINGS)


def test_the_client_side_is_limited_too() -> None:
    pair = Pair(p.HboneProtocol(True, 0.0, LIMITS), p.HboneProtocol(False, 0.0))
    pair.pump()
    ping = frame(PING, 0, 0, bytes(8))
    events = pair.c.receive(ping * (LIMITS.max_control_frames + 1), 0.0)
    calm(pair.c, events, lim.PING)


# ---- header blocks -------------------------------------------------------------------------------


def test_a_header_block_over_the_limit_is_refused_before_it_is_buffered() -> None:
    s = server()
    s.receive(OK_START, 0.0)
    start = frame(HEADERS, 0, 1, b"\x00" * 8000)  # no END_HEADERS: CONTINUATIONs follow
    assert not of_type(s.receive(start, 0.0), p.ConnectionFailed)
    more = frame(CONTINUATION, 0, 1, b"\x00" * 8000)
    assert not of_type(s.receive(more, 0.0), p.ConnectionFailed)
    calm(s, s.receive(more, 0.0), lim.HEADER_LIST)


def test_one_headers_frame_over_the_limit_is_refused() -> None:
    s = server()
    big = hpack.Encoder().encode(
        [(":method", "CONNECT"), (":authority", "10.0.0.1:80"), ("baggage", "x" * 20_000)]
    )
    calm(s, s.receive(OK_START + frame(HEADERS, END_HEADERS, 1, big), 0.0), lim.HEADER_LIST)


def test_an_hpack_bomb_is_a_connection_error() -> None:
    """A small block that decodes to a huge list (an indexed entry repeated) leaves the HPACK
    table half-updated: the whole connection goes (it was a stream error before)."""
    enc = hpack.Encoder()
    first = enc.encode([("x-bomb", "y" * 3000)])  # into the dynamic table
    again = enc.encode([("x-bomb", "y" * 3000)] * 20)  # 20 one-byte references: 60 KB
    assert len(again) < 100
    s = server()
    s.receive(OK_START + frame(HEADERS, END_HEADERS | END_STREAM, 1, first), 0.0)
    calm(s, s.receive(frame(HEADERS, END_HEADERS, 3, again), 0.0), lim.HEADER_LIST)


def test_headers_up_to_the_limit_are_fine() -> None:
    s = server()
    events = s.receive(
        OK_START
        + headers_frame(
            1, [(":method", "CONNECT"), (":authority", "10.0.0.1:80"), ("baggage", "k=v" * 4000)]
        ),
        0.0,
    )
    assert of_type(events, p.ConnectRequested)


# ---- structured fuzzing -------------------------------------------------------------------------


frames = st.builds(
    frame,
    st.sampled_from([DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PING, WINDOW_UPDATE])
    | st.integers(0, 12),
    st.integers(0, 255),
    st.sampled_from([0, 1, 3, 5]) | st.integers(0, 2**31 - 1),
    st.sampled_from([b"", bytes(4), bytes(5), bytes(6), bytes(8), CONNECT_1[9:]])
    | st.binary(max_size=64),
)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
EVENT_TYPES = (
    p.ConnectRequested,
    p.ConnectRefused,
    p.ResponseReceived,
    p.DataReceived,
    p.StreamEnded,
    p.StreamReset,
    p.WindowOpened,
    p.GoawayReceived,
    p.ConnectionFailed,
)


def check(side: p.HboneProtocol, events: list[p.Event]) -> None:
    assert all(isinstance(e, EVENT_TYPES) for e in events), events
    failed = of_type(events, p.ConnectionFailed)
    if failed:
        assert len(failed) == 1 and side.closed
        gws = goaways(side.data_to_send())
        assert gws and {c for _, c in gws} == {failed[0].error_code}


@FUZZ
@given(st.lists(frames, max_size=12), st.integers(1, 3))
def test_arbitrary_frame_sequences_to_a_server(seq: list[bytes], reads: int) -> None:
    s = server()
    data = OK_START + connect(1) + b"".join(seq)
    step = max(1, len(data) // reads)
    for i in range(0, len(data), step):
        check(s, s.receive(data[i : i + step], 0.0))
        if s.closed:
            break


@FUZZ
@given(st.lists(frames, max_size=12))
def test_arbitrary_frame_sequences_to_a_client(seq: list[bytes]) -> None:
    pair = Pair(p.HboneProtocol(True, 0.0, LIMITS), p.HboneProtocol(False, 0.0))
    pair.pump()
    pair.c.open_stream(ConnectRequest("10.0.0.1:80"))
    pair.pump()
    check(pair.c, pair.c.receive(b"".join(seq), 0.0))
