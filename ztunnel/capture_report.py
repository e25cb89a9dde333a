"""What the eBPF capture found on its hooks, for people and machines: the Prometheus
collector, the readiness lines, and the `capture` section of the admin config dump (which
`ztunnel ctl capture` shows). Reads snapshots only; the checking is `ztunnel.capture`'s.

Importing this module does not load the capture layer (bpf(), pyroute2): it works on the
plain `CaptureSnapshot` that `ztunnel.kernel_capture` fills.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

HOOK_KINDS = ("pod", "uplink")
STATES = ("safe", "accepted", "refused")
LAYERS = ("xdp", "tcx", "tc")


@dataclass(frozen=True, slots=True)
class CaptureSnapshot:
    """The capture's state at one moment: hooks (HookStatus.to_json() each), pods' capture
    answers by "namespace/name", counters, and the last check's outcome."""

    mode: str = ""
    tcx_available: bool = False
    check_interval: float = 0.0
    hooks: tuple[dict[str, Any], ...] = ()
    pods: Mapping[str, dict[str, Any]] = field(default_factory=dict)
    reorders: Mapping[str, int] = field(default_factory=dict)
    detections: Mapping[tuple[str, str], int] = field(default_factory=dict)
    checks: int = 0
    check_errors: int = 0
    last_error: str = ""
    last_check_age: float | None = None  # seconds since the last completed check

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "tcx_available": self.tcx_available,
            "check_interval_seconds": self.check_interval,
            "last_check_age_seconds": (
                round(self.last_check_age, 3) if self.last_check_age is not None else None
            ),
            "checks": self.checks,
            "check_errors": self.check_errors,
            "last_error": self.last_error or None,
            "hooks": list(self.hooks),
            "pods": dict(self.pods),
            "reorders": dict(self.reorders),
        }


class SnapshotSource(Protocol):
    def snapshot(self) -> CaptureSnapshot: ...


def readiness(snap: CaptureSnapshot) -> tuple[list[str], list[str]]:
    """(pending, warnings). A refused uplink refuses every enrolled pod of the node: the
    agent is not ready. A refused pod hook affects that pod only: the agent stays ready and
    says which pods it refuses. A check that keeps failing is pending too."""
    pending: list[str] = []
    warnings: list[str] = []
    for hook in snap.hooks:
        if hook.get("state") != "refused":
            continue
        line = f"capture: {hook.get('detail')}"
        (pending if hook.get("hook") == "uplink" else warnings).append(line)
    if snap.last_error and snap.check_errors and snap.checks == 0:
        pending.append(f"capture: checking the hooks failed: {snap.last_error}")
    elif snap.last_error:
        warnings.append(f"capture: the last check of the hooks failed: {snap.last_error}")
    return pending, warnings


class CaptureCollector(Collector):
    """`ztunnel_capture_*` metrics, read from the capture's snapshot at scrape time."""

    def __init__(self, source: SnapshotSource) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        snap = self.source.snapshot()
        hooks = GaugeMetricFamily(
            "ztunnel_capture_hooks",
            "Hooks the eBPF capture depends on, by kind and state (safe: ztunnel runs first;"
            " accepted: something runs ahead, risk accepted; refused: fail closed)",
            labels=["hook", "state"],
        )
        ahead = GaugeMetricFamily(
            "ztunnel_capture_programs_ahead",
            "Programs or filters currently running ahead of ztunnel's capture programs",
            labels=["hook"],
        )
        counts = {(k, s): 0 for k in HOOK_KINDS for s in STATES}
        ahead_counts = dict.fromkeys(HOOK_KINDS, 0)
        for hook in snap.hooks:
            kind, state = str(hook.get("hook")), str(hook.get("state"))
            if (kind, state) in counts:
                counts[(kind, state)] += 1
            if kind in ahead_counts:
                ahead_counts[kind] += len(hook.get("ahead") or ())
        for (kind, state), n in counts.items():
            hooks.add_metric([kind, state], n)
        for kind, n in ahead_counts.items():
            ahead.add_metric([kind], n)
        refused = GaugeMetricFamily(
            "ztunnel_capture_refused_pods",
            "Pods whose capture is not safe (new connections refused), see `ztunnel ctl capture`",
        )
        refused.add_metric([], sum(1 for p in snap.pods.values() if not p.get("ok")))
        reorders = CounterMetricFamily(
            "ztunnel_capture_reorders",
            "Times ztunnel moved its program back to the front of a hook",
            labels=["hook"],
        )
        for kind in HOOK_KINDS:
            reorders.add_metric([kind], snap.reorders.get(kind, 0))
        detections = CounterMetricFamily(
            "ztunnel_capture_detections",
            "Programs or filters found running ahead of ztunnel's capture programs",
            labels=["hook", "layer"],
        )
        for kind in HOOK_KINDS:
            for layer in LAYERS:
                detections.add_metric([kind, layer], snap.detections.get((kind, layer), 0))
        checks = CounterMetricFamily(
            "ztunnel_capture_checks", "Checks of the capture hooks", labels=["outcome"]
        )
        checks.add_metric(["ok"], snap.checks)
        checks.add_metric(["error"], snap.check_errors)
        mode = GaugeMetricFamily(
            "ztunnel_capture_attach_mode",
            "How the capture programs are attached (tcx or cls_bpf)",
            labels=["mode"],
        )
        if snap.mode:
            mode.add_metric([snap.mode], 1)
        yield from (hooks, ahead, refused, reorders, detections, checks, mode)

    def describe(self) -> Iterable[Metric]:
        return []  # collected lazily: the snapshot is only read at scrape time
