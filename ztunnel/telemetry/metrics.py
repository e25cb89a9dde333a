"""Prometheus metrics of the node agent on a registry that the composition root owns: Istio's
`istio_tcp_*` connection and byte counters, `istio_build`, and process/platform/GC metrics."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterable, Iterator

from prometheus_client import (
    Gauge,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from ztunnel.proxy.records import ConnectionRecord
from ztunnel.telemetry.labels import TrafficLabels, traffic_labels

OPENED = "istio_tcp_connections_opened"
CLOSED = "istio_tcp_connections_closed"
RECEIVED = "istio_tcp_received_bytes"
SENT = "istio_tcp_sent_bytes"

_HELP = {
    OPENED: "The total number of TCP connections opened",
    CLOSED: "The total number of TCP connections closed",
    RECEIVED: "The size of total bytes received during request in case of a TCP connection",
    SENT: "The size of total bytes sent during response in case of a TCP connection",
}


class _Series:
    """The four counters of one label set, as plain ints: the data path only adds to them."""

    __slots__ = ("closed", "opened", "received", "sent")

    def __init__(self) -> None:
        self.opened = 0
        self.closed = 0
        self.received = 0
        self.sent = 0


class TrafficMetrics(Collector):
    """Counts connections and bytes per Istio label set; both an `Observer` and a collector.

    The counters are kept by us and exposed through prometheus-client's custom-collector API
    rather than as `Counter` objects for two reasons: the byte counters are bumped for every
    relayed chunk, and adding to a cached `_Series` slot is cheaper than a labelled `Counter`'s
    locked increment; and `Counter` adds a `*_created` series per label set that Istio does
    not export and that prometheus-client can only switch off process-wide.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._series: dict[TrafficLabels, _Series] = {}
        # record id -> (labels at open, their series); lets `transferred` skip the label
        # computation and the dict lookup. Entries go when the connection closes.
        self._live: dict[int, tuple[TrafficLabels, _Series]] = {}
        registry.register(self)

    def _get(self, labels: TrafficLabels) -> _Series:
        series = self._series.get(labels)
        if series is None:
            series = self._series[labels] = _Series()
        return series

    # ---- Observer ----

    def opened(self, record: ConnectionRecord) -> None:
        labels = traffic_labels(record)
        series = self._get(labels)
        series.opened += 1
        self._live[record.id] = (labels, series)

    def transferred(self, record: ConnectionRecord, sent: int, recv: int) -> None:
        entry = self._live.get(record.id)
        if entry is None:  # never opened (or already closed): nothing to attribute it to
            return
        series = entry[1]
        # Istio's byte direction (istio/ztunnel src/copy.rs): "received" counts what came from
        # the downstream (the client side) and went upstream, "sent" what went back down to
        # the client, for BOTH reporters. Our records count `bytes_sent` towards the
        # destination on both sides (the relay swaps directions for inbound records), so:
        # istio_tcp_received_bytes_total += record's sent, istio_tcp_sent_bytes_total += recv.
        series.received += sent
        series.sent += recv

    def closed(self, record: ConnectionRecord) -> None:
        entry = self._live.pop(record.id, None)
        labels = entry[0] if entry is not None else traffic_labels(record)
        flag = record.response_flag or "-"
        if labels.response_flags != flag:
            # The outcome is known only now (as Istio does, the close carries the final flag).
            labels = labels._replace(response_flags=flag)
        self._get(labels).closed += 1

    # ---- Collector ----

    def collect(self) -> Iterator[Metric]:
        names = TrafficLabels.label_names()
        opened = CounterMetricFamily(OPENED, _HELP[OPENED], labels=names)
        closed = CounterMetricFamily(CLOSED, _HELP[CLOSED], labels=names)
        received = CounterMetricFamily(RECEIVED, _HELP[RECEIVED], labels=names)
        sent = CounterMetricFamily(SENT, _HELP[SENT], labels=names)
        for labels, s in list(self._series.items()):
            # A label set that only ever saw closes (its flag was set at close) exports only
            # the close counter; byte counters exist from the open on, as in Istio.
            if s.opened:
                opened.add_metric(labels, s.opened)
                received.add_metric(labels, s.received)
                sent.add_metric(labels, s.sent)
            if s.closed:
                closed.add_metric(labels, s.closed)
        yield from (opened, closed, received, sent)

    def describe(self) -> Iterable[Metric]:
        names = TrafficLabels.label_names()
        return [CounterMetricFamily(n, _HELP[n], labels=names) for n in _HELP]


def agent_version() -> str:
    """The agent's version: `ztunnel.__version__`, else the installed distribution's."""
    import ztunnel

    # An editable install can expose `ztunnel` as a namespace package (its __init__ unrun).
    version = getattr(ztunnel, "__version__", None)
    if isinstance(version, str):
        return version
    try:
        return importlib.metadata.version("ztunnel-py")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def register_build_info(registry: CollectorRegistry, version: str) -> None:
    """`istio_build{component="ztunnel",tag=<version>} 1`, as Istio's components export it."""
    build = Gauge(
        "istio_build", "Istio component build info", ["component", "tag"], registry=registry
    )
    build.labels(component="ztunnel", tag=version).set(1)


def register_process_metrics(registry: CollectorRegistry) -> None:
    """CPU, memory, file descriptors, Python platform and GC: what the default registry has."""
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
