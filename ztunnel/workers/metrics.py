"""One /metrics for the whole agent: the agent process's own families merged with the latest
snapshot each worker pushed, series by series. Counters, histograms and gauges of connections
are summed (the node's total); a few series that describe a process rather than count work
are not (build info: the same everywhere; start time: the earliest). A worker that exits
leaves its last counters behind (`retire`), so node totals never go backwards on a restart.

`merge_families` is pure; `AggregatingRegistry` is what the stats endpoint scrapes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client.metrics_core import Metric
from prometheus_client.registry import CollectorRegistry
from prometheus_client.samples import Sample

# Series that are the same in every process (max) or a point in time (min), by sample name.
SAME_EVERYWHERE = frozenset({"istio_build", "python_info", "process_max_fds"})
EARLIEST = frozenset({"process_start_time_seconds"})
# Family types whose samples only grow: what a gone worker leaves behind.
MONOTONIC_TYPES = frozenset({"counter", "histogram", "summary"})

SeriesKey = tuple[str, tuple[tuple[str, str], ...]]


def _combine(sample_name: str, family_type: str) -> Callable[[float, float], float]:
    if sample_name.endswith("_created") or sample_name in EARLIEST:
        return min
    if sample_name in SAME_EVERYWHERE or family_type in ("info", "stateset"):
        return max
    return lambda a, b: a + b


def merge_families(groups: Iterable[Iterable[Metric]]) -> list[Metric]:
    """Families of several processes as one set: same family name and sample labels combine."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[SeriesKey, float]] = {}
    for group in groups:
        for fam in group:
            merged = families.get(fam.name)
            if merged is None:
                merged = Metric(fam.name, fam.documentation, fam.type, fam.unit)
                families[fam.name] = merged
                values[fam.name] = {}
            series = values[fam.name]
            for s in fam.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                if key in series:
                    series[key] = _combine(s.name, merged.type)(series[key], s.value)
                else:
                    series[key] = s.value
    out: list[Metric] = []
    for name, merged in families.items():
        merged.samples = [
            Sample(sample_name, dict(labels), value)
            for (sample_name, labels), value in values[name].items()
        ]
        out.append(merged)
    return out


def monotonic_part(families: Iterable[Metric]) -> list[Metric]:
    """The counting part of a snapshot (what stays counted after its process is gone)."""
    out: list[Metric] = []
    for fam in families:
        if fam.type not in MONOTONIC_TYPES:
            continue
        kept = Metric(fam.name, fam.documentation, fam.type, fam.unit)
        kept.samples = [s for s in fam.samples if not s.name.endswith("_created")]
        out.append(kept)
    return out


class AggregatingRegistry(CollectorRegistry):
    """Scrapes the agent's own registry and adds the workers' pushed snapshots."""

    def __init__(self, own: CollectorRegistry, others: Callable[[], list[list[Metric]]]) -> None:
        super().__init__(auto_describe=False)
        self._own = own
        self._others = others

    def collect(self) -> Any:
        yield from merge_families([list(self._own.collect()), *self._others()])
