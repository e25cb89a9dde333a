"""HTTP/2 abuse limits of every HBONE connection, on both sides, without I/O.

What a peer may send per time window before it is cut off with GOAWAY ENHANCE_YOUR_CALM, as
nghttp2 and Envoy do: stream resets and refused streams (CVE-2023-44487, "rapid reset"),
SETTINGS, PING, PRIORITY, frames for closed streams, empty DATA frames and unknown frame types
(CVE-2019-9512/9515/9516/9518 floods), and the size of a header block. Counters are plain ints
reset per window (no allocation per frame); DATA frames with a payload are never counted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import h2.errors
import h2.exceptions

from ztunnel.logthrottle import ThrottledLog

log = logging.getLogger(__name__)

ENHANCE_YOUR_CALM = 0xB  # RFC 9113 section 7
# SETTINGS entries per frame (nghttp2's default): there are 6 standard settings, a frame with
# more only costs CPU to parse (a 1 MiB SETTINGS frame holds 174,762 entries).
MAX_SETTINGS_ENTRIES = 32

# The kinds of abuse, as counted and as the metric's `reason` label.
RESETS = "stream_resets"
SETTINGS = "settings"
PING = "ping"
PRIORITY = "priority"
CLOSED_STREAM_FRAMES = "closed_stream_frames"
EMPTY_DATA = "empty_data"
UNKNOWN_FRAMES = "unknown_frames"
HEADER_LIST = "header_list"
ABUSE_KINDS = (
    RESETS,
    SETTINGS,
    PING,
    PRIORITY,
    CLOSED_STREAM_FRAMES,
    EMPTY_DATA,
    UNKNOWN_FRAMES,
    HEADER_LIST,
)
_CONTROL_KINDS = (SETTINGS, PING, PRIORITY, CLOSED_STREAM_FRAMES, EMPTY_DATA, UNKNOWN_FRAMES)
_WHAT = {
    SETTINGS: "SETTINGS frames",
    PING: "PING frames",
    PRIORITY: "PRIORITY frames",
    CLOSED_STREAM_FRAMES: "frames for closed streams",
    EMPTY_DATA: "empty DATA frames",
    UNKNOWN_FRAMES: "frames of unknown type",
}


@dataclass(frozen=True, slots=True)
class H2Limits:
    """Per connection and per `window` seconds; defaults protect without touching normal
    HBONE traffic (a pooled client opens at most 100 streams over a connection's life and
    pings every 10 s)."""

    window: float = 10.0
    # RST_STREAM frames received plus streams refused for exceeding MAX_CONCURRENT_STREAMS.
    max_resets: int = 200
    # Each of: SETTINGS, PING, PRIORITY, frames for closed streams, empty DATA, unknown types.
    max_control_frames: int = 1000
    # Encoded header block and decoded header list (RFC 9113 section 6.5.2); HBONE's CONNECT
    # headers take a few hundred bytes.
    max_header_list_size: int = 16 * 1024


class H2AbuseError(h2.exceptions.ProtocolError):
    """The peer went over a limit: a connection error ENHANCE_YOUR_CALM (RFC 9113 section 7)."""

    error_code = h2.errors.ErrorCodes.ENHANCE_YOUR_CALM

    def __init__(self, kind: str, message: str) -> None:
        self.kind = kind
        super().__init__(message)


class FrameBudget:
    """What the peer sent in the current window. `roll(now)` once per read; the counting
    methods raise H2AbuseError past a limit."""

    __slots__ = ("_counts", "_window_end", "limits", "resets")

    def __init__(self, limits: H2Limits, now: float) -> None:
        self.limits = limits
        self.resets = 0
        self._counts = dict.fromkeys(_CONTROL_KINDS, 0)
        self._window_end = now + limits.window

    def roll(self, now: float) -> None:
        if now >= self._window_end:
            self._window_end = now + self.limits.window
            self.resets = 0
            for kind in self._counts:
                self._counts[kind] = 0

    def reset(self) -> None:
        """A stream reset by the peer, or one we refused."""
        self.resets += 1
        if self.resets > self.limits.max_resets:
            raise H2AbuseError(
                RESETS,
                f"more than {self.limits.max_resets} streams reset or refused within "
                f"{self.limits.window:g}s",
            )

    def control(self, kind: str) -> None:
        n = self._counts[kind] + 1
        self._counts[kind] = n
        if n > self.limits.max_control_frames:
            raise H2AbuseError(
                kind,
                f"more than {self.limits.max_control_frames} {_WHAT[kind]} within "
                f"{self.limits.window:g}s",
            )

    def header_block(self, size: int) -> None:
        if size > self.limits.max_header_list_size:
            raise H2AbuseError(
                HEADER_LIST,
                f"header block of {size} bytes exceeds {self.limits.max_header_list_size}",
            )


@dataclass
class AbuseCounters:
    """What the agent's metrics read: connections cut off per kind, and streams whose
    handler was cancelled (or never started) because the peer reset them first."""

    cutoffs: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ABUSE_KINDS, 0))
    streams_cancelled: int = 0
    _log: ThrottledLog = field(default_factory=lambda: ThrottledLog(log), repr=False)

    def cutoff(self, kind: str, who: str, reason: str) -> None:
        self.cutoffs[kind] = self.cutoffs.get(kind, 0) + 1
        self._log.warn(
            f"HTTP/2 abuse ({kind})",
            "%s cut off with GOAWAY ENHANCE_YOUR_CALM: %s",
            who,
            reason,
        )


@dataclass
class H2Guard:
    """The limits and the counters that every HBONE connection of one agent shares."""

    limits: H2Limits = field(default_factory=H2Limits)
    counters: AbuseCounters = field(default_factory=AbuseCounters)
