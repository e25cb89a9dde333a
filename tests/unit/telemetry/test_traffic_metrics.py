"""The istio_tcp_* counters: values, byte directions, flags at close, exposition."""

from __future__ import annotations

import ipaddress

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from ztunnel.model import Workload
from ztunnel.proxy.records import ConnectionRecord, ConnectionTracker
from ztunnel.telemetry import Telemetry, TrafficMetrics, traffic_labels

pytestmark = pytest.mark.unit

CLIENT = Workload("uid-c", "client", "frontend", (ipaddress.ip_address("10.0.0.1"),), "web")
SERVER = Workload("uid-s", "server", "shop", (ipaddress.ip_address("10.0.0.2"),), "echo")


def record(direction: str = "outbound", **kw: object) -> ConnectionRecord:
    rec = ConnectionRecord(
        direction,
        ("10.0.0.1", 40000),
        ("10.0.0.2", 8080),
        src_workload=CLIENT,
        src_identity=CLIENT.identity,
        dst_workload=SERVER,
        dst_identity=SERVER.identity,
        mtls=True,
    )
    for k, v in kw.items():
        setattr(rec, k, v)
    return rec


def value(registry: CollectorRegistry, name: str, rec: ConnectionRecord, **override: str) -> float:
    labels = traffic_labels(rec)._replace(**override)._asdict()
    got = registry.get_sample_value(name, labels)
    return 0.0 if got is None else got


def test_open_bytes_close_on_one_series() -> None:
    registry = CollectorRegistry()
    tracker = ConnectionTracker(TrafficMetrics(registry))
    rec = record()
    tracker.open(rec)
    assert value(registry, "istio_tcp_connections_opened_total", rec) == 1
    tracker.transferred(rec, 100, 0)
    tracker.transferred(rec, 0, 7)
    tracker.transferred(rec, 23, 0)
    # While the connection is open the byte counters already show the bytes.
    assert value(registry, "istio_tcp_received_bytes_total", rec) == 123
    assert value(registry, "istio_tcp_sent_bytes_total", rec) == 7
    assert value(registry, "istio_tcp_connections_closed_total", rec) == 0
    tracker.close(rec)
    assert value(registry, "istio_tcp_connections_closed_total", rec) == 1


def test_inbound_records_count_request_bytes_as_received_too() -> None:
    # An inbound record's bytes_sent is client->app (the relay swaps directions), which is
    # Istio's "received" for reporter=destination as well.
    registry = CollectorRegistry()
    tracker = ConnectionTracker(TrafficMetrics(registry))
    rec = record("inbound")
    tracker.open(rec)
    tracker.transferred(rec, 10, 3)
    tracker.close(rec)
    assert traffic_labels(rec).reporter == "destination"
    assert value(registry, "istio_tcp_received_bytes_total", rec) == 10
    assert value(registry, "istio_tcp_sent_bytes_total", rec) == 3


def test_flag_set_at_close_goes_to_the_close_counter_only() -> None:
    registry = CollectorRegistry()
    tracker = ConnectionTracker(TrafficMetrics(registry))
    rec = record()
    tracker.open(rec)
    rec.response_flag = "DENY"
    tracker.close(rec)
    assert value(registry, "istio_tcp_connections_opened_total", rec, response_flags="-") == 1
    assert value(registry, "istio_tcp_connections_closed_total", rec, response_flags="-") == 0
    assert value(registry, "istio_tcp_connections_closed_total", rec) == 1
    text = generate_latest(registry).decode()
    # No opened/bytes series for the DENY label set, since nothing was opened with it.
    assert "istio_tcp_connections_opened_total{" in text
    assert not any(
        'response_flags="DENY"' in line
        for line in text.splitlines()
        if line.startswith("istio_tcp_connections_opened_total")
    )


def test_failed_record_opened_and_closed_with_its_flag() -> None:
    registry = CollectorRegistry()
    tracker = ConnectionTracker(TrafficMetrics(registry))
    rec = record(error="connect refused", response_flag="CONNECT", mtls=False)
    tracker.open(rec)
    tracker.close(rec)
    assert value(registry, "istio_tcp_connections_opened_total", rec) == 1
    assert value(registry, "istio_tcp_connections_closed_total", rec) == 1
    assert traffic_labels(rec).response_flags == "CONNECT"


def test_connections_with_equal_labels_share_a_series_and_cache_is_dropped() -> None:
    registry = CollectorRegistry()
    metrics = TrafficMetrics(registry)
    tracker = ConnectionTracker(metrics)
    a, b = record(), record()
    for r in (a, b):
        tracker.open(r)
        tracker.transferred(r, 5, 5)
        tracker.close(r)
    assert value(registry, "istio_tcp_connections_opened_total", a) == 2
    assert value(registry, "istio_tcp_received_bytes_total", a) == 10
    assert metrics._live == {}
    # Bytes after close (never happens in the relay) are not attributed anywhere.
    metrics.transferred(a, 99, 99)
    assert value(registry, "istio_tcp_received_bytes_total", a) == 10


def test_exposition_has_no_created_series_and_has_build_and_process_metrics() -> None:
    registry = CollectorRegistry()
    telemetry = Telemetry(registry, "9.9.9")
    tracker = ConnectionTracker(telemetry)
    rec = record()
    tracker.open(rec)
    tracker.close(rec)
    text = generate_latest(registry).decode()
    assert "_created" not in text
    assert 'istio_build{component="ztunnel",tag="9.9.9"} 1.0' in text
    assert "process_cpu_seconds_total" in text or "process_virtual_memory_bytes" in text
    assert "python_info" in text


def test_registries_are_independent() -> None:
    one, two = CollectorRegistry(), CollectorRegistry()
    Telemetry(one, "1")
    Telemetry(two, "1")  # would raise "Duplicated timeseries" on a shared registry
    rec = record()
    ConnectionTracker(TrafficMetrics(CollectorRegistry())).open(rec)
    assert value(one, "istio_tcp_connections_opened_total", rec) == 0
