"""Metrics of the agent's limits and protections (README: Limits and protections): load shed
by admission control, HBONE connections cut off for HTTP/2 abuse, streams whose upstream work
was cancelled because the peer reset them, and the gauges a soak test watches (connections
held, handshakes pending, asyncio tasks). Read from plain counters at scrape time."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from ztunnel.admission import Protection

SHED = "ztunnel_connections_shed"
CUTOFFS = "ztunnel_hbone_abuse_cutoffs"
CANCELLED = "ztunnel_hbone_streams_cancelled"
ACTIVE = "ztunnel_connections_active"
LIMIT = "ztunnel_connections_limit"
PENDING = "ztunnel_hbone_pending_handshakes"
TASKS = "ztunnel_asyncio_tasks"

_HELP = {
    SHED: "Connections refused or closed by admission control, by the limit that shed them",
    CUTOFFS: "HBONE connections cut off with GOAWAY ENHANCE_YOUR_CALM, by the abuse seen",
    CANCELLED: "Inbound HBONE streams reset by the peer before their upstream connection "
    "was made (the upstream work never started or was cancelled)",
    ACTIVE: "Connections held now against the --max-connections cap",
    LIMIT: "The --max-connections cap in force",
    PENDING: "HBONE TLS handshakes in progress",
    TASKS: "asyncio tasks alive in the agent's event loop",
}


class ProtectionMetrics(Collector):
    def __init__(self, registry: CollectorRegistry, protection: Protection) -> None:
        self.protection = protection
        registry.register(self)

    def collect(self) -> Iterator[Metric]:
        adm = self.protection.admission
        counters = self.protection.h2.counters
        shed = CounterMetricFamily(SHED, _HELP[SHED], labels=["reason"])
        for reason, n in adm.shed.items():
            shed.add_metric([reason], n)
        cutoffs = CounterMetricFamily(CUTOFFS, _HELP[CUTOFFS], labels=["reason"])
        for kind, n in counters.cutoffs.items():
            cutoffs.add_metric([kind], n)
        yield shed
        yield cutoffs
        yield CounterMetricFamily(CANCELLED, _HELP[CANCELLED], value=counters.streams_cancelled)
        yield GaugeMetricFamily(ACTIVE, _HELP[ACTIVE], value=adm.active)
        yield GaugeMetricFamily(LIMIT, _HELP[LIMIT], value=adm.limits.max_connections)
        yield GaugeMetricFamily(PENDING, _HELP[PENDING], value=adm.pending)
        try:
            tasks = len(asyncio.all_tasks())
        except RuntimeError:  # scraped outside the agent's loop (a test's registry)
            tasks = 0
        yield GaugeMetricFamily(TASKS, _HELP[TASKS], value=tasks)

    def describe(self) -> Iterable[Metric]:
        return [
            CounterMetricFamily(SHED, _HELP[SHED], labels=["reason"]),
            CounterMetricFamily(CUTOFFS, _HELP[CUTOFFS], labels=["reason"]),
            CounterMetricFamily(CANCELLED, _HELP[CANCELLED]),
            GaugeMetricFamily(ACTIVE, _HELP[ACTIVE]),
            GaugeMetricFamily(LIMIT, _HELP[LIMIT]),
            GaugeMetricFamily(PENDING, _HELP[PENDING]),
            GaugeMetricFamily(TASKS, _HELP[TASKS]),
        ]
