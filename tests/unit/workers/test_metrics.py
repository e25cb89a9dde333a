"""One /metrics for all workers (`ztunnel.workers.metrics`): series summed across processes,
build info and start times not, and a gone worker's counters kept so totals never drop."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from ztunnel.workers.metrics import AggregatingRegistry, merge_families, monotonic_part

pytestmark = pytest.mark.unit


def process(opened: float, active: float, reporter: str = "destination") -> list[Metric]:
    c = CounterMetricFamily("istio_tcp_connections_opened", "opened", labels=["reporter"])
    c.add_metric([reporter], opened)
    g = GaugeMetricFamily("ztunnel_connections_active", "active", value=active)
    build = GaugeMetricFamily("istio_build", "build", labels=["tag"])
    build.add_metric(["1.0"], 1)
    start = GaugeMetricFamily("process_start_time_seconds", "start", value=100 + opened)
    return [c, g, build, start]


def values(families: list[Metric]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}


def test_series_sum_across_processes_but_build_info_and_start_time_do_not() -> None:
    got = values(merge_families([process(3, 2), process(5, 1), process(1, 0, "source")]))
    assert got[("istio_tcp_connections_opened_total", (("reporter", "destination"),))] == 8
    assert got[("istio_tcp_connections_opened_total", (("reporter", "source"),))] == 1
    assert got[("ztunnel_connections_active", ())] == 3
    assert got[("istio_build", (("tag", "1.0"),))] == 1
    assert got[("process_start_time_seconds", ())] == 101


def test_a_gone_workers_counters_stay_and_its_gauges_go() -> None:
    retired = monotonic_part(process(7, 4))
    assert [f.name for f in retired] == ["istio_tcp_connections_opened"]
    got = values(merge_families([retired, process(2, 1)]))
    assert got[("istio_tcp_connections_opened_total", (("reporter", "destination"),))] == 9
    assert got[("ztunnel_connections_active", ())] == 1


def test_the_aggregating_registry_exposes_valid_text_with_one_family_per_name() -> None:
    own = CollectorRegistry()
    Counter("requests", "requests", ["code"], registry=own).labels("200").inc(2)
    Gauge("open", "open", registry=own).set(1)
    worker = CollectorRegistry()
    Counter("requests", "requests", ["code"], registry=worker).labels("200").inc(3)
    Gauge("open", "open", registry=worker).set(4)
    reg = AggregatingRegistry(own, lambda: [list(worker.collect())])
    text = generate_latest(reg).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert text.count("# TYPE requests_total counter") + text.count("# TYPE requests counter") == 1
    samples = {s.name: s.value for s in families["requests"].samples}
    assert samples["requests_total"] == 5
    assert {s.name: s.value for s in families["open"].samples}["open"] == 5
    # _created is a time, not a count: the earliest one, not a sum.
    key = ("requests_created", (("code", "200"),))
    created = [values(list(r.collect()))[key] for r in (own, worker)]
    assert values(list(reg.collect()))[key] == min(created)
