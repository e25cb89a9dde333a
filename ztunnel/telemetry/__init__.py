"""Telemetry of the node agent: Istio's TCP metrics and the per-connection access log.

- `labels`: Istio's standard traffic labels computed from a `ConnectionRecord` (pure).
- `metrics`: `TrafficMetrics` (the `istio_tcp_*` counters, an Observer and a Prometheus
  collector), `istio_build` and process metrics, all on a registry passed in.
- `accesslog`: the "connection complete" access log on the `ztunnel.access` logger.
- `observer`: `Telemetry`, the observer the composition root gives the connection tracker.
- `protection`: metrics of the limits and protections (load shed, HTTP/2 abuse cut-offs,
  cancelled streams, connections held, pending handshakes, asyncio tasks).

The HTTP side (serving `/metrics`, readiness and the admin API) is in `ztunnel.admin`.
"""

from ztunnel.telemetry.accesslog import ACCESS_LOGGER, AccessLog, access_fields
from ztunnel.telemetry.labels import UNKNOWN, TrafficLabels, traffic_labels
from ztunnel.telemetry.metrics import (
    TrafficMetrics,
    agent_version,
    register_build_info,
    register_process_metrics,
)
from ztunnel.telemetry.observer import FanOut, Telemetry, combine

__all__ = [
    "ACCESS_LOGGER",
    "UNKNOWN",
    "AccessLog",
    "FanOut",
    "Telemetry",
    "TrafficLabels",
    "TrafficMetrics",
    "access_fields",
    "agent_version",
    "combine",
    "register_build_info",
    "register_process_metrics",
    "traffic_labels",
]
