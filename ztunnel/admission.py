"""Admission control of the node agent: how many connections it holds at once (globally; per
source address while their TLS handshake runs; per peer identity once it is known) and how
long a handshake may take. What is over a limit is shed, with a throttled log line and a
counter. Decisions and counts only, no I/O: the HBONE server and the composition root ask
before they take a connection on, and give it back when it ends.
"""

from __future__ import annotations

import logging
import resource
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ztunnel.hbone.limits import H2Guard, H2Limits
from ztunnel.logthrottle import ThrottledLog

if TYPE_CHECKING:
    from ztunnel.config import Settings

log = logging.getLogger(__name__)

MAX_CONNECTIONS = "max_connections"
PENDING_HANDSHAKES = "pending_handshakes"
PENDING_HANDSHAKES_PER_SOURCE = "pending_handshakes_per_source"
CONNECTIONS_PER_IDENTITY = "connections_per_identity"
HANDSHAKE_TIMEOUT = "handshake_timeout"
SHED_REASONS = (
    MAX_CONNECTIONS,
    PENDING_HANDSHAKES,
    PENDING_HANDSHAKES_PER_SOURCE,
    CONNECTIONS_PER_IDENTITY,
    HANDSHAKE_TIMEOUT,
)
# File descriptors kept out of the automatic connection cap: listeners, the admin servers,
# pooled HBONE connections, BPF objects, logs.
RESERVED_FDS = 512
# A connection unit can hold two descriptors (the accepted socket and its upstream).
FDS_PER_CONNECTION = 2


@dataclass(frozen=True, slots=True)
class AdmissionLimits:
    # Connections held at once: sockets accepted on any listener plus inbound HBONE streams
    # (each opens one upstream socket). 0 = derived from the open-file limit.
    max_connections: int = 0
    # TLS handshakes in progress on the HBONE port (each costs ~70 KB until it completes).
    max_pending_handshakes: int = 512
    max_pending_handshakes_per_source: int = 64
    # Established inbound HBONE connections of one peer identity (SPIFFE id).
    max_connections_per_identity: int = 1024
    # From accept to a verified peer, including the certificate lookup.
    handshake_timeout: float = 5.0


def raise_open_file_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit (as Istio's ztunnel does);
    returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, e)
    return soft


def auto_max_connections(nofile: int) -> int:
    """The connection cap that keeps the agent below its open-file limit, where accept()
    would start failing for everyone (EMFILE)."""
    if nofile < 0 or nofile > 1 << 22:  # RLIM_INFINITY or absurdly large
        nofile = 1 << 22
    return max(256, (nofile - RESERVED_FDS) // FDS_PER_CONNECTION)


class Admission:
    """Counts what the agent holds and says yes or no; every yes is paired with a release."""

    def __init__(self, limits: AdmissionLimits) -> None:
        if limits.max_connections <= 0:
            raise ValueError("max_connections must be resolved (see Protection.from_settings)")
        self.limits = limits
        self.active = 0
        self.pending = 0
        self._pending_by_source: dict[str, int] = {}
        self._by_identity: dict[str, int] = {}
        self.shed: dict[str, int] = dict.fromkeys(SHED_REASONS, 0)
        self._log = ThrottledLog(log)

    def _shed(self, reason: str, msg: str, *args: object) -> None:
        self.shed[reason] += 1
        self._log.warn(f"shedding load ({reason})", "shedding load: " + msg, *args)

    # ---- the global cap ----

    def admit(self, what: str, peer: str) -> bool:
        """One more connection (an accepted socket, or an inbound stream's upstream)?"""
        if self.active >= self.limits.max_connections:
            self._shed(
                MAX_CONNECTIONS,
                "%s from %s refused: %d connections open (limit %d, --max-connections)",
                what,
                peer,
                self.active,
                self.limits.max_connections,
            )
            return False
        self.active += 1
        return True

    def release(self) -> None:
        self.active -= 1

    # ---- TLS handshakes on the HBONE port ----

    def begin_handshake(self, source: str) -> bool:
        """May a handshake from `source` (an IP address) start now?"""
        lim = self.limits
        if self.pending >= lim.max_pending_handshakes:
            self._shed(
                PENDING_HANDSHAKES,
                "HBONE connection from %s closed: %d TLS handshakes in progress "
                "(limit %d, --max-pending-handshakes)",
                source,
                self.pending,
                lim.max_pending_handshakes,
            )
            return False
        mine = self._pending_by_source.get(source, 0)
        if mine >= lim.max_pending_handshakes_per_source:
            self._shed(
                PENDING_HANDSHAKES_PER_SOURCE,
                "HBONE connection from %s closed: %d TLS handshakes from it in progress "
                "(limit %d, --max-pending-handshakes-per-source)",
                source,
                mine,
                lim.max_pending_handshakes_per_source,
            )
            return False
        self.pending += 1
        self._pending_by_source[source] = mine + 1
        return True

    def end_handshake(self, source: str) -> None:
        self.pending -= 1
        left = self._pending_by_source[source] - 1
        if left:
            self._pending_by_source[source] = left
        else:
            del self._pending_by_source[source]

    def handshake_timed_out(self, peer: str) -> None:
        self._shed(
            HANDSHAKE_TIMEOUT,
            "HBONE connection from %s closed: no verified TLS handshake within %.1fs "
            "(--hbone-handshake-timeout)",
            peer,
            self.limits.handshake_timeout,
        )

    # ---- per peer identity ----

    def admit_identity(self, identity: str, peer: str) -> bool:
        n = self._by_identity.get(identity, 0)
        if n >= self.limits.max_connections_per_identity:
            self._shed(
                CONNECTIONS_PER_IDENTITY,
                "HBONE connection from %s (%s) refused: %d connections of this identity "
                "(limit %d, --max-connections-per-identity)",
                peer,
                identity,
                n,
                self.limits.max_connections_per_identity,
            )
            return False
        self._by_identity[identity] = n + 1
        return True

    def release_identity(self, identity: str) -> None:
        left = self._by_identity[identity] - 1
        if left:
            self._by_identity[identity] = left
        else:
            del self._by_identity[identity]

    def identity_connections(self, identity: str) -> int:
        return self._by_identity.get(identity, 0)


@dataclass
class Protection:
    """Everything that keeps one agent standing: admission control and the HTTP/2 limits
    with their counters; the composition root builds one and hands it down."""

    admission: Admission
    h2: H2Guard = field(default_factory=H2Guard)

    @classmethod
    def from_settings(cls, s: Settings) -> Protection:
        nofile = raise_open_file_limit()
        max_conns = s.max_connections if s.max_connections > 0 else auto_max_connections(nofile)
        limits = AdmissionLimits(
            max_connections=max_conns,
            max_pending_handshakes=s.max_pending_handshakes,
            max_pending_handshakes_per_source=s.max_pending_handshakes_per_source,
            max_connections_per_identity=s.max_connections_per_identity,
            handshake_timeout=s.hbone_handshake_timeout,
        )
        h2 = H2Limits(
            window=s.h2_limit_window,
            max_resets=s.h2_max_resets,
            max_control_frames=s.h2_max_control_frames,
            max_header_list_size=s.h2_max_header_list_size,
        )
        return cls(Admission(limits), H2Guard(h2))
