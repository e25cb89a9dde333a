"""Request telemetry of the waypoint: Istio's HTTP metrics (`istio_requests_total`,
`istio_request_duration_milliseconds`, `istio_request_bytes`, `istio_response_bytes`, with
reporter="waypoint" and Istio's labels), one access-log line per request, and W3C trace
context (`traceparent`) with spans exported over OTLP when an endpoint is configured."""

from __future__ import annotations

import bisect
import logging
import secrets
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from opentelemetry.sdk.trace.id_generator import IdGenerator
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from ztunnel.identity import SpiffeId
from ztunnel.model import Service, Workload
from ztunnel.proxy.records import ConnectionRecord
from ztunnel.telemetry.accesslog import LogText
from ztunnel.telemetry.labels import traffic_labels

ACCESS_LOGGER = "waypoint.access"
access_log = logging.getLogger(ACCESS_LOGGER)

# Istio's default buckets (proxy stats: istio_request_duration_milliseconds, *_bytes).
DURATION_BUCKETS = (
    0.5,
    1,
    5,
    10,
    25,
    50,
    100,
    250,
    500,
    1000,
    2500,
    5000,
    10000,
    30000,
    60000,
    300000,
    600000,
    1800000,
    3600000,
)
BYTES_BUCKETS = (1, 10, 100, 1000, 10000, 100000, 1000000, 10000000, 100000000, 1000000000)


class RequestLabels(NamedTuple):
    reporter: str
    source_workload: str
    source_canonical_service: str
    source_canonical_revision: str
    source_workload_namespace: str
    source_principal: str
    source_app: str
    source_version: str
    source_cluster: str
    destination_service: str
    destination_service_namespace: str
    destination_service_name: str
    destination_workload: str
    destination_canonical_service: str
    destination_canonical_revision: str
    destination_workload_namespace: str
    destination_principal: str
    destination_app: str
    destination_version: str
    destination_cluster: str
    request_protocol: str
    response_code: str
    grpc_response_status: str
    response_flags: str
    connection_security_policy: str


@dataclass
class RequestRecord:
    """One request through the waypoint, as telemetry reads it."""

    method: str
    path: str
    authority: str
    protocol: str  # http | grpc
    src_addr: str
    src_identity: SpiffeId | None = None
    src_workload: Workload | None = None
    service: Service | None = None
    dst_workload: Workload | None = None
    dst_addr: str = ""
    status: int = 0
    grpc_status: str = ""
    flags: list[str] = field(default_factory=list)
    route: str = ""
    attempts: int = 0
    request_bytes: int = 0
    response_bytes: int = 0
    started: float = field(default_factory=time.monotonic)
    duration: float = 0.0
    trace_id: str = ""
    span_id: str = ""
    request_id: str = ""
    user_agent: str = ""
    error: str = ""

    @property
    def flag(self) -> str:
        return ",".join(dict.fromkeys(self.flags)) or "-"

    def labels(self) -> RequestLabels:
        rec = ConnectionRecord("outbound", ("0.0.0.0", 0), ("0.0.0.0", 0))
        rec.src_workload, rec.src_identity = self.src_workload, self.src_identity
        rec.dst_workload, rec.dst_service, rec.mtls = self.dst_workload, self.service, True
        t = traffic_labels(rec)
        return RequestLabels(
            "waypoint",
            *t[1:20],
            self.protocol,
            str(self.status),
            self.grpc_status or ("-" if self.protocol != "grpc" else "2"),
            self.flag,
            "mutual_tls",
        )


class _Hist:
    __slots__ = ("buckets", "count", "total")

    def __init__(self, n: int) -> None:
        self.buckets = [0] * (n + 1)
        self.count = 0
        self.total = 0.0

    def observe(self, bounds: tuple[float, ...], value: float) -> None:
        self.buckets[bisect.bisect_left(bounds, value)] += 1
        self.count += 1
        self.total += value


class RequestMetrics(Collector):
    """Istio's four HTTP metrics, kept as plain numbers and exported by collection (no
    `_created` series, which Istio does not have)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.series: dict[RequestLabels, tuple[list[int], _Hist, _Hist, _Hist]] = {}
        self._labels: dict[tuple[object, ...], RequestLabels] = {}
        registry.register(self)

    def record(self, r: RequestRecord) -> None:
        # The label set depends on few inputs; computing it costs more than the rest of the
        # request's telemetry, so it is cached per distinct input.
        key = (
            r.src_workload.uid if r.src_workload else "",
            r.src_identity,
            r.service.key if r.service else "",
            r.dst_workload.uid if r.dst_workload else "",
            r.protocol,
            r.status,
            r.grpc_status,
            r.flag,
        )
        labels = self._labels.get(key)
        if labels is None:
            if len(self._labels) > 100_000:
                self._labels.clear()
            labels = self._labels[key] = r.labels()
        s = self.series.get(labels)
        if s is None:
            s = self.series[labels] = (
                [0],
                _Hist(len(DURATION_BUCKETS)),
                _Hist(len(BYTES_BUCKETS)),
                _Hist(len(BYTES_BUCKETS)),
            )
        s[0][0] += 1
        s[1].observe(DURATION_BUCKETS, r.duration * 1000.0)
        s[2].observe(BYTES_BUCKETS, r.request_bytes)
        s[3].observe(BYTES_BUCKETS, r.response_bytes)

    def collect(self) -> Iterator[Metric]:
        names = list(RequestLabels._fields)
        total = CounterMetricFamily("istio_requests", "Total requests", labels=names)
        hists = [
            (
                HistogramMetricFamily(
                    "istio_request_duration_milliseconds", "Request duration", labels=names
                ),
                DURATION_BUCKETS,
            ),
            (
                HistogramMetricFamily("istio_request_bytes", "Request body size", labels=names),
                BYTES_BUCKETS,
            ),
            (
                HistogramMetricFamily("istio_response_bytes", "Response body size", labels=names),
                BYTES_BUCKETS,
            ),
        ]
        for labels, (count, *hs) in list(self.series.items()):
            total.add_metric(list(labels), count[0])
            for (fam, bounds), h in zip(hists, hs, strict=True):
                acc = 0
                buckets = []
                for bound, n in zip([*map(str, bounds), "+Inf"], h.buckets, strict=True):
                    acc += n
                    buckets.append((bound, acc))
                fam.add_metric(list(labels), buckets, h.total)
        yield total
        for fam, _ in hists:
            yield fam

    def describe(self) -> Iterable[Metric]:
        return []


def log_request(r: RequestRecord) -> None:
    """The access log: one line per request ("request complete"), fields as extras."""
    if not access_log.isEnabledFor(logging.INFO):
        return  # (`--log-level warning`): not even the fields are built
    fields: dict[str, Any] = {
        "src.addr": r.src_addr,
        "method": r.method,
        "path": LogText(r.path),
        "authority": LogText(r.authority),
        "protocol": r.protocol,
        "response_code": r.status,
        "response_flags": r.flag,
        "duration": f"{int(r.duration * 1000)}ms",
        "bytes_received": r.request_bytes,
        "bytes_sent": r.response_bytes,
    }
    if r.src_identity is not None:
        fields["src.identity"] = LogText(r.src_identity.uri)
    if r.src_workload is not None:
        fields["src.workload"] = LogText(r.src_workload.name)
        fields["src.namespace"] = LogText(r.src_workload.namespace)
    if r.service is not None:
        fields["dst.service"] = LogText(r.service.hostname)
    if r.dst_workload is not None:
        fields["dst.workload"] = LogText(r.dst_workload.name)
        fields["dst.namespace"] = LogText(r.dst_workload.namespace)
    if r.dst_addr:
        fields["dst.addr"] = r.dst_addr
    if r.route:
        fields["route"] = LogText(r.route)
    if r.attempts > 1:
        fields["attempts"] = r.attempts
    if r.grpc_status:
        fields["grpc_status"] = r.grpc_status
    if r.trace_id:
        fields["trace_id"] = r.trace_id
    if r.request_id:
        fields["request_id"] = LogText(r.request_id)
    if r.user_agent:
        fields["user_agent"] = LogText(r.user_agent)
    if r.error:
        fields["error"] = LogText(r.error)
    access_log.info("request complete", extra=fields)


# ---- tracing ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TraceContext:
    trace_id: str  # 32 hex
    parent_id: str  # 16 hex, the caller's span ("" when we start the trace)
    span_id: str  # ours
    flags: str  # "01" sampled

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}"


def _valid_hex(s: str, n: int) -> bool:
    return len(s) == n and all(c in "0123456789abcdef" for c in s) and s != "0" * n


def trace_context(traceparent: str | None, sample: bool) -> TraceContext:
    """Continue the caller's trace (W3C trace-context section 3.2), or start one."""
    if traceparent:
        parts = traceparent.strip().split("-")
        if (
            len(parts) >= 4
            and len(parts[0]) == 2
            and parts[0] != "ff"
            and _valid_hex(parts[1], 32)
            and _valid_hex(parts[2], 16)
            and len(parts[3]) == 2
        ):
            return TraceContext(parts[1], parts[2], secrets.token_hex(8), parts[3])
    return TraceContext(secrets.token_hex(16), "", secrets.token_hex(8), "01" if sample else "00")


class Tracer:
    """Exports one span per request with the OpenTelemetry SDK over OTLP (HTTP/protobuf or
    gRPC); our span keeps the ids we propagated in `traceparent`."""

    def __init__(
        self, endpoint: str, protocol: str = "http/protobuf", service_name: str = "waypoint"
    ) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter as GrpcExporter,
            )

            exporter: Any = GrpcExporter(endpoint=endpoint, insecure=True)
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                OTLPSpanExporter as HttpExporter,
            )

            url = (
                endpoint if endpoint.endswith("/v1/traces") else endpoint.rstrip("/") + "/v1/traces"
            )
            exporter = HttpExporter(endpoint=url)
        self.provider = TracerProvider(
            resource=Resource.create({"service.name": service_name}),
            id_generator=_FixedIds(),
        )
        self.processor = BatchSpanProcessor(exporter, schedule_delay_millis=500)
        self.provider.add_span_processor(self.processor)
        self.tracer = self.provider.get_tracer("waypoint")

    def export(self, ctx: TraceContext, r: RequestRecord, start_ns: int, end_ns: int) -> None:
        if ctx.flags[-1] not in "13579bdf":  # not sampled
            return
        from opentelemetry import trace
        from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

        parent = None
        if ctx.parent_id:
            parent = trace.set_span_in_context(
                trace.NonRecordingSpan(
                    SpanContext(int(ctx.trace_id, 16), int(ctx.parent_id, 16), True, TraceFlags(1))
                )
            )
        _FixedIds.next_ids = (int(ctx.trace_id, 16), int(ctx.span_id, 16))
        span = self.tracer.start_span(
            f"{r.method} {r.service.hostname if r.service else r.authority}",
            context=parent,
            kind=SpanKind.SERVER,
            start_time=start_ns,
            attributes={
                "http.method": r.method,
                "http.url": f"http://{r.authority}{r.path}",
                "http.status_code": r.status,
                "response_flags": r.flag,
                "upstream_cluster": r.dst_addr,
                "istio.canonical_service": r.service.name if r.service else "",
                "node_id": "waypoint",
            },
        )
        if r.status >= 500 or r.status == 0:
            span.set_status(Status(StatusCode.ERROR))
        span.end(end_time=end_ns)

    def shutdown(self) -> None:
        self.provider.shutdown()


class _FixedIds(IdGenerator):
    """An id generator that hands out the ids we already put on the wire."""

    next_ids: tuple[int, int] = (0, 0)

    def generate_trace_id(self) -> int:
        return self.next_ids[0] or secrets.randbits(128)

    def generate_span_id(self) -> int:
        return self.next_ids[1] or secrets.randbits(64)
