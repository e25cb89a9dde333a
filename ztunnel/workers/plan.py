"""How many worker processes an agent runs and how they share the listeners: pure decisions
from the settings, the CPUs the agent may use and the kernel release (no I/O here except the
small readers at the bottom, which only gather those inputs)."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

from ztunnel.config import Settings

# The listeners the workers share (the transparent ones of the ebpf/tproxy captures).
SHARED_KINDS = ("outbound", "inbound", "hbone")

# bpf_sk_assign() onto a listener that is in a SO_REUSEPORT group: before Linux 6.5 the helper
# refused such sockets (-ESOCKTNOSUPPORT, net/core/filter.c: "if (sk->sk_reuseport) ..."
# guard); commit 9c02bec95954 "bpf, net: Support SO_REUSEPORT sockets with bpf_sk_assign"
# (Lorenz Bauer, merged for 6.5) lets it through and runs the reuseport selection when the
# stolen listener is used (inet_steal_sock() -> inet_lookup_reuseport()), so a SYN assigned to
# any member of the group lands on the member the group's hash picks. nftables TPROXY always
# did the selection (nf_tproxy_get_sock_v4() -> inet_lookup_listener()).
REUSEPORT_SK_ASSIGN = (6, 5)


def kernel_version(release: str) -> tuple[int, int]:
    """(major, minor) of a `uname -r` string such as "6.18.44-fc-v782"; (0, 0) if unreadable."""
    m = re.match(r"(\d+)\.(\d+)", release)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def cgroup_cpu_quota(cpu_max_lines: list[str]) -> float | None:
    """The CPUs a cgroup v2 `cpu.max` chain allows (the tightest of the given files' contents,
    e.g. "200000 100000" = 2.0, "max 100000" = no limit); None when none limits."""
    best: float | None = None
    for line in cpu_max_lines:
        parts = line.split()
        if len(parts) != 2 or parts[0] == "max":
            continue
        try:
            quota, period = int(parts[0]), int(parts[1])
        except ValueError:
            continue
        if quota > 0 and period > 0:
            cpus = quota / period
            best = cpus if best is None else min(best, cpus)
    return best


def usable_cpus(affinity: int, quota: float | None) -> int:
    """CPUs the agent may use: its affinity set, capped by the cgroup quota rounded up."""
    n = max(1, affinity)
    if quota is not None:
        n = min(n, max(1, math.ceil(quota - 1e-9)))
    return n


@dataclass(frozen=True)
class WorkerPlan:
    count: int  # processes serving the listeners (the agent's own process is the first)
    sharing: str  # "single" | "reuseport" (a SO_REUSEPORT group) | "shared" (one accept queue)
    reason: str  # for the log line

    @property
    def multi(self) -> bool:
        return self.count > 1


def plan_workers(settings: Settings, cpus: int, kernel_release: str) -> WorkerPlan:
    """The worker count and listener sharing for `settings` on this machine."""
    wanted = settings.workers or cpus
    origin = "--workers" if settings.workers else f"{cpus} usable CPU(s)"
    if wanted <= 1:
        return WorkerPlan(1, "single", f"1 worker ({origin})")
    if settings.capture not in ("ebpf", "tproxy"):
        return WorkerPlan(
            1,
            "single",
            f"1 worker: --capture {settings.capture} listens on each workload address as it comes "
            f"and goes; worker processes share the transparent listeners of the ebpf and tproxy "
            f"captures only ({origin} asked for {wanted})",
        )
    if settings.capture == "ebpf" and kernel_version(kernel_release) < REUSEPORT_SK_ASSIGN:
        return WorkerPlan(
            wanted,
            "shared",
            f"{wanted} workers ({origin}) sharing one accept queue per listener: Linux "
            f"{kernel_release} cannot bpf_sk_assign into a SO_REUSEPORT group (6.5+ can)",
        )
    return WorkerPlan(
        wanted, "reuseport", f"{wanted} workers ({origin}), one SO_REUSEPORT listener each"
    )


def _share(total: int, count: int) -> int:
    return max(1, math.ceil(total / count))


def worker_settings(s: Settings, count: int) -> Settings:
    """A worker's settings: the data path only. Mesh state and certificates come from the
    agent's process (one xDS client, one certificate manager for the node); no admin,
    metrics, readiness or SOCKS5 listener; no kernel capture of its own (the agent attached
    it, and the worker's listeners are in its groups: `tproxy` is exactly "transparent
    listeners, someone else captures"). Limits are node-wide totals divided among workers."""
    return replace(
        primary_settings(s, count),
        capture="tproxy",
        local_xds_path="",
        xds_address="",
        ca_address="",
        ca_dir="",
        admin_port=0,
        stats_port=0,
        readiness_port=0,
        socks5_port=0,
        workers=1,
    )


def primary_settings(s: Settings, count: int) -> Settings:
    """The agent process's own share of the limits (it serves like any worker)."""
    return replace(
        s,
        max_connections=_share(s.max_connections, count) if s.max_connections else 0,
        max_pending_handshakes=_share(s.max_pending_handshakes, count),
        max_pending_handshakes_per_source=_share(s.max_pending_handshakes_per_source, count),
        max_connections_per_identity=_share(s.max_connections_per_identity, count),
    )


@dataclass
class RestartBackoff:
    """Delay before restarting a crashed worker: 0.5 s doubling to 30 s while it keeps
    crashing; a worker that ran `stable` seconds starts over at 0.5 s."""

    first: float = 0.5
    cap: float = 30.0
    stable: float = 60.0
    failures: int = 0

    def next_delay(self, ran_for: float) -> float:
        if ran_for >= self.stable:
            self.failures = 0
        delay = min(self.cap, self.first * 2.0 ** min(self.failures, 30))
        self.failures += 1
        return delay


# ---- gathering the inputs (I/O) ----


def _cgroup_v2_dirs() -> list[Path]:
    """The cgroup v2 directories of this process, itself first, then its ancestors."""
    try:
        own = next(
            line[3:].strip()
            for line in Path("/proc/self/cgroup").read_text().splitlines()
            if line.startswith("0::")
        )
        mounts = [
            line.split(" - ")[0].split()[4]
            for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if " - cgroup2 " in line
        ]
    except (OSError, StopIteration, IndexError):
        return []
    dirs: list[Path] = []
    for mount in mounts[:1]:
        d = Path(mount) / own.lstrip("/")
        root = Path(mount)
        while True:
            dirs.append(d)
            if d == root or root not in d.parents:
                break
            d = d.parent
    return dirs


def available_cpus() -> int:
    """CPUs this process may use: sched_getaffinity, capped by the cgroup v2 cpu.max quota
    (of its cgroup and every ancestor), rounded up, at least 1."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except OSError:
        affinity = os.cpu_count() or 1
    lines: list[str] = []
    for d in _cgroup_v2_dirs():
        try:
            lines.append((d / "cpu.max").read_text().strip())
        except OSError:
            continue
    return usable_cpus(affinity, cgroup_cpu_quota(lines))
