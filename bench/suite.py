"""The benchmark run: scenarios x measurements, repeated and interleaved (rep 1 of every
scenario, then rep 2, ...) so that drift of the machine hits every scenario alike; medians,
ratios to direct and to stunnel measured in the same run, the memory test and the targets.

Measurements per scenario and repetition: bulk throughput with 1 and 8 connections (iperf3),
max requests/s over persistent connections and latency at a fixed moderate rate (our C
generator, 1 KiB request / 1 KiB response), new connections/s (connect, one request, close),
and the CPU time of the scenario's processes (our agents, or the stunnel pair) over each.
"""

from __future__ import annotations

import contextlib
import json
import queue
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import labs, procstat, profile, tools
from bench.labs import BenchLab
from bench.tools import BenchError, LoadGen
from ztunnel.lab import runner
from ztunnel.lab import topology as topo

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Scenario:
    name: str
    label: str
    lab: str  # key of the lab it runs in
    same_node: bool
    via: str  # direct | stunnel | mesh


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("direct", "direct TCP, no mesh (cross node)", "base", False, "direct"),
        Scenario("direct-same", "direct TCP, no mesh (same node)", "base", True, "direct"),
        Scenario("stunnel", "stunnel mTLS 1.3 pair (cross node)", "base", False, "stunnel"),
        Scenario("mesh", "mesh: eBPF + HBONE (cross node)", "ebpf", False, "mesh"),
        Scenario("mesh-same", "mesh: eBPF + HBONE (same node)", "ebpf", True, "mesh"),
        Scenario("tproxy", "mesh: nft TPROXY + HBONE (cross node)", "tproxy", False, "mesh"),
        Scenario("tproxy-same", "mesh: nft TPROXY + HBONE (same node)", "tproxy", True, "mesh"),
        Scenario(
            "mesh-workers",
            "mesh: eBPF + HBONE, one worker process per usable CPU (cross node)",
            "ebpf-workers",
            False,
            "mesh",
        ),
        Scenario(
            "mesh-asyncio",
            "mesh: eBPF + HBONE, asyncio loop (cross node)",
            "ebpf-asyncio",
            False,
            "mesh",
        ),
    )
}

# lab key -> (capture, event loop, worker processes per agent; 0: Plan.workers)
LABS: dict[str, tuple[str | None, str, int]] = {
    "base": (None, "uvloop", 1),
    "ebpf": ("ebpf", "uvloop", 1),
    "tproxy": ("tproxy", "uvloop", 1),
    "ebpf-asyncio": ("ebpf", "asyncio", 1),
    "ebpf-workers": ("ebpf", "uvloop", 0),
}

DEFAULT_SCENARIOS = (
    "direct",
    "direct-same",
    "stunnel",
    "mesh",
    "mesh-same",
    "tproxy",
    "mesh-workers",
    "mesh-asyncio",
)
QUICK_SCENARIOS = ("direct", "stunnel", "mesh", "tproxy", "mesh-workers")
# storm: a connection storm, many short connections at once (cps with `storm_conns` workers)
MEASUREMENTS = ("bulk1", "bulk8", "rr_max", "rr_fixed", "cps", "storm")
# The scenarios the targets are judged on: one agent process, and the default
# `--workers` (one per usable CPU).
TARGET_SCENARIOS = ("mesh", "mesh-workers")


def default_workers() -> int:
    """Workers of the multi-worker variant: what `ztunnel run` would pick here, at least 2."""
    from ztunnel.workers.plan import available_cpus

    return max(2, available_cpus())


@dataclass(frozen=True)
class Plan:
    """Sizes of one run. Everything is bounded: durations in seconds, counts."""

    scenarios: tuple[str, ...] = DEFAULT_SCENARIOS
    reps: int = 3
    bulk_seconds: int = 3  # iperf3 -t (whole seconds)
    load_seconds: float = 3.0  # each loadgen test
    rr_conns: int = 16  # persistent connections, max-rate test
    fixed_rate: float = 1000.0  # requests/s of the latency test
    fixed_conns: int = 8
    cps_conns: int = 16  # concurrent connect-request-close workers
    storm_conns: int = 256  # the same, many at once: a connection storm
    workers: int = 0  # worker processes of the mesh-workers agents (0: default_workers())
    memory_conns: int = 10_000
    memory_scenarios: tuple[str, ...] = ("mesh", "mesh-workers", "stunnel")
    profile: bool = False  # py-spy the agents of the mesh scenario (bench.profile)
    quick: bool = False
    l7: bool = True  # the L7 section: waypoint vs nginx vs HAProxy (bench.l7)

    @classmethod
    def quick_plan(cls) -> Plan:
        return cls(
            scenarios=QUICK_SCENARIOS,
            reps=1,
            bulk_seconds=1,
            load_seconds=0.5,
            fixed_rate=500.0,
            storm_conns=64,
            memory_conns=300,
            memory_scenarios=("mesh",),
            quick=True,
            l7=False,
        )


@dataclass
class Run:
    plan: Plan
    out_dir: Path
    progress: Progress
    loadgen: LoadGen | None = None
    labs: dict[str, BenchLab] = field(default_factory=dict)
    # scenario -> measurement -> one dict per repetition
    raw: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    idle_rss: dict[str, dict[str, int]] = field(default_factory=dict)
    memory: dict[str, dict[str, Any]] = field(default_factory=dict)
    verified: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    recoveries: list[dict[str, Any]] = field(default_factory=list)

    # ---- what a scenario talks to ----

    def target(self, sc: Scenario, kind: str) -> tuple[str, int]:
        """(ip, port) the client connects to for `kind` ("rr" or "iperf")."""
        lab = self.labs[sc.lab]
        if sc.via == "stunnel":
            return str(lab.nodes[0].ip), labs.STUNNEL_ACCEPT[kind]
        port = labs.RR_PORT if kind == "rr" else labs.IPERF_PORT
        return str(lab.server(sc.same_node).ip), port

    def processes(self, sc: Scenario) -> dict[str, int]:
        """The processes whose CPU and memory a scenario costs (none for direct)."""
        lab = self.labs[sc.lab]
        if sc.via == "stunnel":
            return {f"stunnel-{k}": v for k, v in lab.stunnel.items()}
        if sc.via == "mesh":
            n0, n1 = (n.name for n in lab.nodes)
            if sc.same_node:
                return {"agent": lab.agents[n0]}
            return {"agent-src": lab.agents[n0], "agent-dst": lab.agents[n1]}
        return {}

    # ---- measurements ----

    def measure(self, sc: Scenario, what: str) -> dict[str, Any]:
        assert self.loadgen is not None
        p = self.plan
        client = self.labs[sc.lab].client().netns
        procs = self.processes(sc)
        window = procstat.CpuWindow.open(procs)
        if what in ("bulk1", "bulk8"):
            ip, port = self.target(sc, "iperf")
            res = tools.iperf3(client, ip, port, p.bulk_seconds, 1 if what == "bulk1" else 8)
        else:
            ip, port = self.target(sc, "rr")
            if what == "rr_max":
                res = self.loadgen.rr(client, ip, port, p.rr_conns, p.load_seconds)
            elif what == "rr_fixed":
                res = self.loadgen.rr(
                    client, ip, port, p.fixed_conns, p.load_seconds, rate=p.fixed_rate
                )
            else:
                conns = p.storm_conns if what == "storm" else p.cps_conns
                res = self.loadgen.cps(client, ip, port, conns, p.load_seconds)
            done = res.get("requests", res.get("connections", 0))
            if not done:
                raise BenchError(
                    f"{what}: no request completed in {p.load_seconds}s "
                    f"({res.get('errors', 0)} failed)"
                )
            if res.get("errors"):
                res["warning"] = f"{res['errors']} failed requests/connections"
        res["machine"] = window.machine()
        res["cpu_vcpu"] = window.close()
        return res

    def build_lab(self, key: str) -> None:
        assert self.loadgen is not None
        capture, loop, workers = LABS[key]
        self.labs[key] = labs.build(
            key,
            capture,
            loop,
            self.loadgen,
            self.progress,
            self.out_dir / "logs",
            workers=workers or self.plan.workers or default_workers(),
        )

    def recover(self, sc: Scenario, why: str) -> None:
        """After a failed measurement through the mesh, the lab is rebuilt (fresh agents) so
        that one failure does not spoil the figures that follow; the failure stays recorded.
        """
        old = self.labs.pop(sc.lab)
        try:
            old.save_logs(self.out_dir / "logs" / f"recovered-{old.topology.lab_id}")
        finally:
            old.close()
        self.recoveries.append(
            {"scenario": sc.name, "lab": sc.lab, "old_lab_id": old.topology.lab_id, "after": why}
        )
        self.progress(
            f"  rebuilding lab {sc.lab} after the failure (agent logs kept in "
            f"{self.out_dir / 'logs'})"
        )
        self.build_lab(sc.lab)
        for other in SCENARIOS.values():
            if other.lab == sc.lab and other.name in self.plan.scenarios:
                self.warm_up(other)

    def warm_up(self, sc: Scenario) -> None:
        """One short exchange (certificates, pooled HBONE connection, stunnel session)."""
        assert self.loadgen is not None
        ip, port = self.target(sc, "rr")
        self.loadgen.rr(self.labs[sc.lab].client().netns, ip, port, 2, 0.3)

    def verify_mesh(self, sc: Scenario) -> None:
        """Checks that the mesh carried a scenario's traffic: the agents' connection counters
        must move by a short exchange (else the capture was bypassed and figures are lies)."""
        if sc.via != "mesh":
            return
        lab = self.labs[sc.lab]
        src = lab.nodes[0]
        dst = lab.nodes[0] if sc.same_node else lab.nodes[1]

        def opened(node: Any, reporter: str) -> float:
            return runner.metrics_totals(node).get(f"istio_tcp_connections_opened[{reporter}]", 0.0)

        before = (opened(src, "source"), opened(dst, "destination"))
        self.warm_up(sc)
        after = before

        def moved() -> bool:
            nonlocal after
            after = (opened(src, "source"), opened(dst, "destination"))
            return after[0] > before[0] and after[1] > before[1]

        # Worker processes push their counters every second: wait for them (bounded).
        ok = topo.wait_until(moved, 5.0, 0.2)
        self.verified[sc.name] = {
            "ok": ok,
            "source_opened": after[0] - before[0],
            "destination_opened": after[1] - before[1],
        }
        if not ok:
            raise BenchError(
                f"{sc.name}: the agents did not see the test connections "
                f"(counters {before} -> {after}); capture is not working"
            )

    def memory_test(self, sc: Scenario) -> dict[str, Any]:
        """RSS of the scenario's processes with N idle connections open through it."""
        assert self.loadgen is not None
        p = self.plan
        lab = self.labs[sc.lab]
        ip, port = self.target(sc, "rr")
        procs = self.processes(sc)
        time.sleep(0.5)
        before = procstat.rss_of(procs)
        setup = 20.0 + p.memory_conns / 250
        argv = topo.netns_exec_argv(
            lab.client().netns, self.loadgen.hold_argv(ip, port, p.memory_conns, 120, setup)
        )
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        lines = _LineReader(proc)
        try:
            opened = lines.next_json(setup + 10)
            time.sleep(1.0)  # let the agents settle (buffers, tasks) before reading RSS
            during = procstat.rss_of(procs)
            threads = {k: procstat.thread_count(v) for k, v in procs.items()}
            assert proc.stdin is not None
            proc.stdin.close()
            final = lines.next_json(60.0)
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        time.sleep(2.0)  # closing 10k connections takes the agents a moment
        after = procstat.rss_of(procs)
        n = int(opened.get("opened", 0))
        delta = {k: during[k] - before[k] for k in procs}
        return {
            "connections": n,
            "failed": int(opened.get("failed", 0)),
            "setup_s": opened.get("setup_s"),
            "still_open_at_end": final.get("still_open"),
            "rss_before": before,
            "rss_with_connections": during,
            "rss_after_close": after,
            "threads_with_connections": threads,
            "bytes_per_connection": {k: round(v / n) if n else None for k, v in delta.items()},
            "bytes_per_connection_total": round(sum(delta.values()) / n) if n else None,
        }

    # ---- the run ----

    def execute(self) -> None:
        p = self.plan
        tools.ensure_tools(self.progress)
        tools.raise_nofile(max(65536, 4 * p.memory_conns))
        self.loadgen = LoadGen(tools.build_loadgen(self.out_dir / "build"))
        scenarios = [SCENARIOS[n] for n in p.scenarios]
        for key in dict.fromkeys(sc.lab for sc in scenarios):
            self.build_lab(key)
        for sc in scenarios:
            self.warm_up(sc)
            self.verify_mesh(sc)
        # Idle RSS: agents after start-up and a first tunneled connection, before any load.
        time.sleep(1.0)
        for key, lab in self.labs.items():
            pids = (
                {f"agent-{n}": pid for n, pid in lab.agents.items()}
                if lab.agents
                else {f"stunnel-{n}": pid for n, pid in lab.stunnel.items()}
            )
            self.idle_rss[key] = procstat.rss_of(pids)
        for rep in range(1, p.reps + 1):
            for sc in scenarios:
                figures = []
                for what in MEASUREMENTS:
                    try:
                        res = self.measure(sc, what)
                    except (BenchError, procstat.ProcessGone) as e:
                        self.errors.append(f"rep {rep} {sc.name} {what}: {e}")
                        self.progress(f"  ERROR {sc.name} {what}: {e}")
                        res = {"error": str(e)}
                        if sc.via == "mesh":
                            self.recover(sc, f"rep {rep} {what}: {e}")
                    self.raw.setdefault(sc.name, {}).setdefault(what, []).append(res)
                    figures.append(_short(what, res))
                self.progress(f"[rep {rep}/{p.reps}] {sc.name:<13} " + "  ".join(figures))
        for name in p.memory_scenarios:
            if name not in SCENARIOS or SCENARIOS[name].lab not in self.labs:
                continue
            sc = SCENARIOS[name]
            self.progress(f"memory: {p.memory_conns} idle connections through {name}")
            try:
                self.memory[name] = self.memory_test(sc)
            except (
                BenchError,
                procstat.ProcessGone,
                OSError,
                AssertionError,
                subprocess.TimeoutExpired,
            ) as e:
                self.errors.append(f"memory {name}: {e}")
                self.progress(f"  ERROR memory {name}: {e}")
        if p.l7:
            from bench import l7

            try:
                self.extra["l7"] = l7.run(p.reps, p.load_seconds, self.out_dir, self.progress)
            except (BenchError, OSError) as e:
                self.errors.append(f"l7: {e}")
                self.progress(f"  ERROR l7: {e}")
        if p.profile:
            meshes = [n for n in ("mesh", "tproxy", "mesh-asyncio") if n in p.scenarios]
            try:
                if meshes:
                    self.profile_agents(meshes[0])
            except (BenchError, OSError) as e:
                self.errors.append(f"profile: {e}")
                self.progress(f"  ERROR profile: {e}")

    def profile_agents(self, name: str = "mesh") -> None:
        """Runs bulk, max-rate and new-connection load once more with py-spy sampling the
        agents; keeps the collapsed stacks and the top functions."""
        sc = SCENARIOS[name]
        if sc.lab not in self.labs:
            return
        profiles: dict[str, Any] = {}
        for what in ("bulk1", "rr_max", "cps"):
            seconds = self.plan.bulk_seconds if what == "bulk1" else self.plan.load_seconds
            spies = {}
            for proc, pid in self.processes(sc).items():
                out = self.out_dir / "profiles" / f"{name}-{what}-{proc}.txt"
                spies[proc] = (profile.start(pid, seconds, out), out)
            try:
                res = self.measure(sc, what)
            finally:
                for spy, _ in spies.values():
                    try:
                        spy.wait(seconds + 30)
                    except subprocess.TimeoutExpired:
                        spy.kill()
                        spy.wait(5)
            entry: dict[str, Any] = {"figure": _short(what, res)}
            for proc, (_, out) in spies.items():
                entry[proc] = profile.summarise(out) if out.exists() else {"samples": 0}
                entry[proc]["raw"] = str(out)
            profiles[what] = entry
            self.progress(f"profiled {name} {what}: {entry['figure']}")
        self.extra["profiles"] = {name: profiles}

    def close(self, keep_logs: bool) -> None:
        """Tears every lab down (also after a failure); optionally keeps the agents' logs."""
        failures = []
        for lab in self.labs.values():
            if keep_logs:
                with contextlib.suppress(OSError):
                    lab.save_logs(self.out_dir / "logs")
            try:
                lab.close()
            except Exception as e:  # keep tearing the others down
                failures.append(f"{lab.name}: {e}")
        self.labs.clear()
        if failures:
            raise BenchError("teardown: " + "; ".join(failures))

    # ---- results ----

    def summary(self) -> dict[str, dict[str, Any]]:
        """Median of each figure over the repetitions, per scenario."""
        return {name: _summarise(by) for name, by in self.raw.items()}

    def ratios(self, summary: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Each scenario against direct (same placement) and against stunnel (cross node)."""
        keys = ("bulk1_gbps", "bulk8_gbps", "rr_max_rps", "cps", "storm_cps")
        out: dict[str, dict[str, Any]] = {}
        for name, s in summary.items():
            sc = SCENARIOS[name]
            base = summary.get(
                "direct-same" if sc.same_node and "direct-same" in summary else "direct", {}
            )
            st = summary.get("stunnel", {})
            r: dict[str, Any] = {}
            for k in keys:
                r[f"{k}_vs_direct"] = _ratio(s.get(k), base.get(k))
                r[f"{k}_vs_stunnel"] = _ratio(s.get(k), st.get(k))
            for q in ("p50", "p90", "p99"):
                key = f"lat_{q}_us"
                r[f"added_{q}_us"] = _diff(s.get(key), base.get(key))
            r["added_p50_us_stunnel"] = _diff(
                st.get("lat_p50_us"), summary.get("direct", {}).get("lat_p50_us")
            )
            out[name] = r
        return out

    def capture_comparison(self, summary: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """eBPF vs TPROXY capture: the same agents, only the capture path differs."""
        out: dict[str, Any] = {}
        for ebpf, tp in (("mesh", "tproxy"), ("mesh-same", "tproxy-same")):
            if ebpf not in summary or tp not in summary:
                continue
            a, b = summary[ebpf], summary[tp]
            out[f"{ebpf} vs {tp}"] = {
                "bulk1_ratio": _ratio(a.get("bulk1_gbps"), b.get("bulk1_gbps")),
                "bulk8_ratio": _ratio(a.get("bulk8_gbps"), b.get("bulk8_gbps")),
                "rr_max_ratio": _ratio(a.get("rr_max_rps"), b.get("rr_max_rps")),
                "cps_ratio": _ratio(a.get("cps"), b.get("cps")),
                "p50_diff_us": _diff(a.get("lat_p50_us"), b.get("lat_p50_us")),
            }
        return out

    def targets(
        self, summary: dict[str, dict[str, Any]], ratios: dict[str, dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """The issue's targets, each with the measured value and met / missed, for the
        single-process agent (`mesh`) and the multi-worker one (`mesh-workers`)."""
        out: list[dict[str, Any]] = []
        for name in TARGET_SCENARIOS:
            if name in summary:
                out += self._targets_of(name, summary[name], ratios.get(name, {}))
        return out

    def _targets_of(self, name: str, m: dict[str, Any], r: dict[str, Any]) -> list[dict[str, Any]]:
        lab = self.labs.get(SCENARIOS[name].lab)
        n = lab.workers if lab else 0
        variant = f"{name}, {n} worker{'s' if n != 1 else ''}" if n else name
        out: list[dict[str, Any]] = []

        def add(label: str, value: Any, goal: str, met: bool | None) -> None:
            out.append(
                {
                    "scenario": name,
                    "target": f"{label} [{variant}]",
                    "value": value,
                    "goal": goal,
                    "met": met,
                }
            )

        for k, label in (
            ("bulk1_gbps", "bulk throughput, 1 conn, vs stunnel"),
            ("bulk8_gbps", "bulk throughput, 8 conns, vs stunnel"),
            ("rr_max_rps", "requests/s on persistent connections vs stunnel"),
        ):
            v = r.get(f"{k}_vs_stunnel")
            add(label, v, ">= 1.0x", None if v is None else v >= 1.0)
        v = r.get("cps_vs_stunnel")
        add("new connections/s vs stunnel", v, ">= 3x", None if v is None else v >= 3.0)
        mine, theirs = r.get("added_p50_us"), r.get("added_p50_us_stunnel")
        add(
            f"added p50 (us) at {self.plan.fixed_rate:.0f} req/s vs stunnel's",
            {"mesh": mine, "stunnel": theirs},
            "<= stunnel's",
            None if mine is None or theirs is None else mine <= theirs,
        )
        cpu = m.get("cpu", {})

        def worst_agent(key: str) -> float | None:
            vals = [c[key] for c in cpu.values() if c.get(key) is not None]
            return max(vals) if vals else None

        fixed = worst_agent("vcpu_per_1k_rps_fixed")
        # (tests/deploy sizes the DaemonSet from this line: keep "...: fixed N")
        add(
            f"vCPU per 1,000 req/s (worst agent, all its processes; at {self.plan.fixed_rate:.0f}"
            " req/s, and at the max rate)",
            {"fixed": fixed, "max": worst_agent("vcpu_per_1k_rps_max")},
            "<= 0.1 (at the fixed rate)",
            None if fixed is None else fixed <= 0.1,
        )
        lab_key = SCENARIOS[name].lab
        idle = self.idle_rss.get(lab_key, {})
        biggest = max(idle.values()) if idle else None
        add(
            "idle RSS of the eBPF agent (MB, all its processes)",
            None if biggest is None else round(biggest / 2**20, 1),
            "<= 50",
            None if biggest is None else biggest <= 50 * 2**20,
        )
        mem = self.memory.get(name, {}).get("bytes_per_connection", {})
        per = max((v for v in mem.values() if v is not None), default=None)
        add(
            "bytes per idle tunnelled connection (worst agent)",
            per,
            "<= 20480",
            None if per is None else per <= 20480,
        )
        storm = r.get("storm_cps_vs_stunnel")
        add(
            f"connection storm ({self.plan.storm_conns} at once) conn/s vs stunnel "
            "(no issue target; recorded)",
            storm,
            "-",
            None,
        )
        return out

    def results(self) -> dict[str, Any]:
        summary = self.summary()
        ratios = self.ratios(summary)
        return {
            "schema": 1,
            "machine": procstat.machine(),
            "plan": {
                **self.plan.__dict__,
                "measurements": list(MEASUREMENTS),
                "request_bytes": 1024,
                "response_bytes": 1024,
            },
            "scenarios": {
                n: {
                    "label": SCENARIOS[n].label,
                    "lab": SCENARIOS[n].lab,
                    "same_node": SCENARIOS[n].same_node,
                    "via": SCENARIOS[n].via,
                }
                for n in self.plan.scenarios
            },
            "labs": {
                k: {
                    "capture": v.capture,
                    "event_loop": v.event_loop,
                    "workers": v.workers,
                    "lab_id": v.topology.lab_id,
                }
                for k, v in self.labs.items()
            },
            "summary": summary,
            "ratios": ratios,
            "capture_comparison": self.capture_comparison(summary),
            "idle_rss_bytes": self.idle_rss,
            "memory": self.memory,
            "mesh_verified": self.verified,
            "targets": self.targets(summary, ratios),
            "errors": self.errors,
            "recoveries": self.recoveries,
            "raw": self.raw,
            **self.extra,
        }


def _summarise(by: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """One scenario's medians (failed repetitions are left out)."""

    def med(what: str, *path: str) -> float | None:
        got = []
        for r in by.get(what, []):
            v: Any = r
            for k in path:
                v = v.get(k) if isinstance(v, dict) else None
            if isinstance(v, int | float):
                got.append(float(v))
        return round(statistics.median(got), 3) if got else None

    def per(what: str, proc: str, unit: str, scale: float) -> float | None:
        """Median over repetitions of (vCPU of `proc`) / (figure `unit` / scale)."""
        return _median(
            [
                r["cpu_vcpu"][proc] / (r[unit] / scale)
                for r in by.get(what, [])
                if proc in r.get("cpu_vcpu", {}) and r.get(unit)
            ]
        )

    s: dict[str, Any] = {
        "bulk1_gbps": med("bulk1", "gbps"),
        "bulk8_gbps": med("bulk8", "gbps"),
        "rr_max_rps": med("rr_max", "rps"),
        "rr_max_p50_us": med("rr_max", "latency_us", "p50"),
        "fixed_rate_rps": med("rr_fixed", "rps"),
        **{f"lat_{q}_us": med("rr_fixed", "latency_us", q) for q in ("p50", "p90", "p99")},
        "cps": med("cps", "cps"),
        "cps_p50_us": med("cps", "latency_us", "p50"),
        "storm_cps": med("storm", "cps"),
        "storm_p99_us": med("storm", "latency_us", "p99"),
        "storm_errors": med("storm", "errors"),
        # The whole machine while this scenario was measured (everything running, ours or not).
        "machine_busy_vcpu": _median(
            [r["machine"]["busy_vcpu"] for rs in by.values() for r in rs if "machine" in r]
        ),
        "machine_steal_vcpu": _median(
            [r["machine"]["steal_vcpu"] for rs in by.values() for r in rs if "machine" in r]
        ),
    }
    procs = sorted({k for rs in by.values() for r in rs for k in r.get("cpu_vcpu", {})})
    s["cpu"] = {
        proc: {
            "vcpu_per_1k_rps_fixed": per("rr_fixed", proc, "rps", 1000.0),
            "vcpu_per_1k_rps_max": per("rr_max", proc, "rps", 1000.0),
            "vcpu_per_1k_cps": per("cps", proc, "cps", 1000.0),
            "vcpu_per_1k_storm_cps": per("storm", proc, "cps", 1000.0),
            "vcpu_per_gbps_bulk1": per("bulk1", proc, "gbps", 1.0),
            "vcpu_at_fixed_rate": med("rr_fixed", "cpu_vcpu", proc),
            "vcpu_at_rr_max": med("rr_max", "cpu_vcpu", proc),
            "vcpu_at_bulk1": med("bulk1", "cpu_vcpu", proc),
            "vcpu_at_bulk8": med("bulk8", "cpu_vcpu", proc),
            "vcpu_at_cps": med("cps", "cpu_vcpu", proc),
        }
        for proc in procs
    }
    return s


def _median(v: list[float]) -> float | None:
    return round(statistics.median(v), 4) if v else None


def _ratio(a: Any, b: Any) -> float | None:
    if isinstance(a, int | float) and isinstance(b, int | float) and b:
        return round(a / b, 3)
    return None


def _diff(a: Any, b: Any) -> float | None:
    if isinstance(a, int | float) and isinstance(b, int | float):
        return round(a - b, 1)
    return None


def _short(what: str, res: dict[str, Any]) -> str:
    if "error" in res:
        return f"{what}=ERROR"
    if what.startswith("bulk"):
        return f"{what}={res['gbps']:.2f}Gb/s"
    if what == "rr_max":
        return f"rr={res['rps']:.0f}/s"
    if what == "rr_fixed":
        return f"p50={res['latency_us']['p50']:.0f}us"
    if what == "storm":
        return f"storm={res['cps']:.0f}/s"
    return f"cps={res['cps']:.0f}/s"


class _LineReader:
    """JSON lines of a child's stdout, read on a thread so that waits have a timeout."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self._lines: queue.Queue[str | None] = queue.Queue()
        stream = proc.stdout
        assert stream is not None

        def pump() -> None:
            for line in stream:
                self._lines.put(line)
            self._lines.put(None)

        threading.Thread(target=pump, name="loadgen-stdout", daemon=True).start()

    def next_json(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                raise BenchError("the load generator ended early")
            with contextlib.suppress(ValueError):
                data: dict[str, Any] = json.loads(line)
                return data
        raise BenchError(f"no answer from the load generator within {timeout:.0f}s")
