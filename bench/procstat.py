"""What a process costs, read from /proc: CPU time (utime + stime of all its threads) and
resident memory; and the description of the machine a run was made on."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


class ProcessGone(Exception):
    """The process exited (or never existed) while it was being measured."""


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` (all threads), in seconds; /proc/<pid>/stat fields 14 and 15."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError as e:
        raise ProcessGone(f"process {pid}: {e.strerror}") from None
    # The command name (field 2) may contain spaces; everything after its ')' is fixed.
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (an agent and its worker processes), from /proc."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def tree_cpu_seconds(pid: int) -> dict[int, float]:
    """CPU seconds of `pid` and of each of its descendants still there (by pid)."""
    out = {pid: cpu_seconds(pid)}
    for p in descendants(pid)[1:]:
        with contextlib.suppress(ProcessGone):
            out[p] = cpu_seconds(p)
    return out


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of `pid` and its descendants, summed (separate interpreters: the
    pages they share are the read-only ones of the binary and libraries)."""
    total = rss_bytes(pid)
    for p in descendants(pid)[1:]:
        with contextlib.suppress(ProcessGone):
            total += rss_bytes(p)
    return total


def rss_bytes(pid: int) -> int:
    """Resident set size of `pid` (VmRSS)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError as e:
        raise ProcessGone(f"process {pid}: {e.strerror}") from None
    raise ProcessGone(f"process {pid} has no VmRSS (a zombie?)")


def thread_count(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _system_ticks() -> tuple[int, int]:
    """(busy, steal) jiffies of the whole machine since boot (/proc/stat, first line)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    steal = fields[7] if len(fields) > 7 else 0
    # guest time is already counted in user time; steal is time the hypervisor took.
    return sum(fields[:8]) - idle - steal, steal


@dataclass
class CpuWindow:
    """CPU time of a set of named processes over a wall-clock interval."""

    start_wall: float
    start_cpu: dict[str, dict[int, float]]
    pids: dict[str, int]
    start_system: tuple[int, int] = (0, 0)

    @classmethod
    def open(cls, pids: Mapping[str, int]) -> CpuWindow:
        """Each named process counts with its descendants (an agent's worker processes)."""
        return cls(
            time.monotonic(),
            {k: tree_cpu_seconds(p) for k, p in pids.items()},
            dict(pids),
            _system_ticks(),
        )

    def machine(self) -> dict[str, float]:
        """The whole machine over the window: busy vCPU (everything: our processes, the
        clients and servers, the kernel, anything else running) and vCPU stolen by the
        hypervisor. Call before `close`."""
        wall = max(time.monotonic() - self.start_wall, 1e-6)
        busy, steal = _system_ticks()
        return {
            "busy_vcpu": round((busy - self.start_system[0]) / CLK_TCK / wall, 3),
            "steal_vcpu": round((steal - self.start_system[1]) / CLK_TCK / wall, 3),
        }

    def close(self) -> dict[str, float]:
        """vCPU used by each process over the window (1.0 = one core busy all the time)."""
        wall = max(time.monotonic() - self.start_wall, 1e-6)
        out = {}
        for k, pid in self.pids.items():
            now, then = tree_cpu_seconds(pid), self.start_cpu[k]
            # A worker restarted within the window counts from its start.
            used = sum(v - then.get(p, 0.0) for p, v in now.items())
            out[k] = round(used / wall, 4)
        return out


def rss_of(pids: Mapping[str, int]) -> dict[str, int]:
    """RSS of each named process with its descendants."""
    return {k: tree_rss_bytes(p) for k, p in pids.items()}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _version_of(argv: Iterable[str], prefix: str = "") -> str:
    """The first line of a tool's version output (that starts with `prefix`)."""
    import subprocess

    try:
        out = subprocess.run(list(argv), capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    for line in (out.stdout + "\n" + out.stderr).splitlines():
        if line.strip() and line.startswith(prefix):
            return line.strip()
    return "unknown"


def machine() -> dict[str, object]:
    """The machine and software a run was made on (goes into the JSON and the README)."""
    try:
        import uvloop

        uvloop_version = str(getattr(uvloop, "__version__", "unknown"))
    except ImportError:
        uvloop_version = "not installed"
    import ssl

    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count() or 0,
        "memory_bytes": _mem_total(),
        "kernel": platform.release(),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "openssl": ssl.OPENSSL_VERSION,
        "uvloop": uvloop_version,
        "stunnel": _version_of(["stunnel", "-version"], "stunnel "),
        "iperf3": _version_of(["iperf3", "--version"]),
        "gcc": _version_of(["gcc", "--version"]),
    }
