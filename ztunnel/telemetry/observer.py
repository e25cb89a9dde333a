"""The observer the agent's `ConnectionTracker` reports to: metrics plus the access log, and a
fan-out for composing it with observers that other layers plug in."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from prometheus_client.registry import CollectorRegistry

from ztunnel.proxy.records import ConnectionRecord, Observer
from ztunnel.telemetry.accesslog import AccessLog
from ztunnel.telemetry.metrics import (
    TrafficMetrics,
    agent_version,
    register_build_info,
    register_process_metrics,
)

log = logging.getLogger(__name__)


class Telemetry:
    """Registers the agent's metrics on `registry` and observes every connection.

    A failure in here is logged and swallowed: telemetry must never break a connection (the
    observer runs inside the proxy's code paths).
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        version: str | None = None,
        access_log: AccessLog | None = None,
        process_metrics: bool = True,
    ) -> None:
        self.registry = registry
        self.metrics = TrafficMetrics(registry)
        self.access_log = access_log or AccessLog()
        register_build_info(registry, version or agent_version())
        if process_metrics:
            register_process_metrics(registry)

    def opened(self, record: ConnectionRecord) -> None:
        try:
            self.metrics.opened(record)
            self.access_log.opened(record)
        except Exception:
            log.exception("telemetry failed for connection %d", record.id)

    def transferred(self, record: ConnectionRecord, sent: int, recv: int) -> None:
        # Hot path (every relayed chunk): two integer additions, nothing that can raise.
        self.metrics.transferred(record, sent, recv)

    def closed(self, record: ConnectionRecord) -> None:
        try:
            self.metrics.closed(record)
            self.access_log.closed(record)
        except Exception:
            log.exception("telemetry failed for connection %d", record.id)


class FanOut:
    """Passes every event to each observer in order."""

    def __init__(self, observers: Iterable[Observer]) -> None:
        self.observers = tuple(observers)

    def opened(self, record: ConnectionRecord) -> None:
        for o in self.observers:
            o.opened(record)

    def transferred(self, record: ConnectionRecord, sent: int, recv: int) -> None:
        for o in self.observers:
            o.transferred(record, sent, recv)

    def closed(self, record: ConnectionRecord) -> None:
        for o in self.observers:
            o.closed(record)


def combine(*observers: Observer | None) -> Observer:
    """One observer for the tracker: the only one given, or a fan-out over several."""
    present = [o for o in observers if o is not None]
    if len(present) == 1:
        return present[0]
    return FanOut(present)
