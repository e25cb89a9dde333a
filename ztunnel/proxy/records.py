"""Live connections as plain records, and the tracker that lists and closes them.

A record is what the access log, the metrics and the admin API read; the relay updates its
byte counts while data flows.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from ztunnel.identity import SpiffeId
from ztunnel.model import Service, Workload

_ids = itertools.count(1)


@dataclass(eq=False)
class ConnectionRecord:
    """One proxied connection, from the point of view of one agent (`direction`)."""

    direction: str  # "outbound" | "inbound"
    src: tuple[str, int]
    dst: tuple[str, int]
    src_workload: Workload | None = None
    src_identity: SpiffeId | None = None
    dst_workload: Workload | None = None
    dst_identity: SpiffeId | None = None
    dst_service: Service | None = None
    hbone_target: str = ""  # next hop of the tunnel (ip:port), "" when not tunneled
    path: str = ""  # "hbone" | "waypoint" | "passthrough" | "plaintext" | "direct"
    mtls: bool = False
    id: int = field(default_factory=lambda: next(_ids))
    started: float = field(default_factory=time.monotonic)
    started_wall: float = field(default_factory=time.time)
    bytes_sent: int = 0  # towards the destination
    bytes_recv: int = 0  # back from the destination
    error: str = ""
    response_flag: str = "-"
    closed: bool = False
    _closer: Callable[[str], None] | None = field(default=None, repr=False)

    def set_closer(self, closer: Callable[[str], None]) -> None:
        self._closer = closer

    def close(self, reason: str) -> None:
        """Tear the connection down from outside (policy change, drain)."""
        if not self.error:
            self.error = reason
        if self._closer is not None:
            self._closer(reason)

    @property
    def duration(self) -> float:
        return time.monotonic() - self.started


class Observer(Protocol):
    """What telemetry hooks into: open, bytes moved, close."""

    def opened(self, record: ConnectionRecord) -> None: ...

    def transferred(self, record: ConnectionRecord, sent: int, recv: int) -> None: ...

    def closed(self, record: ConnectionRecord) -> None: ...


class NullObserver:
    def opened(self, record: ConnectionRecord) -> None:
        pass

    def transferred(self, record: ConnectionRecord, sent: int, recv: int) -> None:
        pass

    def closed(self, record: ConnectionRecord) -> None:
        pass


class ConnectionTracker:
    """Every live connection; notifies the observer when they open and close."""

    def __init__(self, observer: Observer | None = None) -> None:
        self.observer: Observer = observer or NullObserver()
        self.live: dict[int, ConnectionRecord] = {}
        self.total_opened = 0
        self._empty_waiters: list[asyncio.Future[None]] = []

    def open(self, record: ConnectionRecord) -> None:
        self.live[record.id] = record
        self.total_opened += 1
        self.observer.opened(record)

    def transferred(self, record: ConnectionRecord, sent: int, recv: int) -> None:
        record.bytes_sent += sent
        record.bytes_recv += recv
        self.observer.transferred(record, sent, recv)

    def close(self, record: ConnectionRecord) -> None:
        if record.closed:
            return
        record.closed = True
        self.live.pop(record.id, None)
        self.observer.closed(record)
        if not self.live:
            for w in self._empty_waiters:
                if not w.done():
                    w.set_result(None)
            self._empty_waiters.clear()

    async def wait_empty(self, timeout: float) -> bool:
        """Wait until no connection is live (drain); False if `timeout` passed first."""
        if not self.live:
            return True
        w: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._empty_waiters.append(w)
        try:
            await asyncio.wait_for(w, max(0.0, timeout))
        except TimeoutError:
            return False
        return True

    def counts(self) -> dict[str, int]:
        out = {"inbound": 0, "outbound": 0}
        for r in self.live.values():
            out[r.direction] = out.get(r.direction, 0) + 1
        return out
