"""The L7 section of the benchmark: requests/s and latency through the waypoint, side by side
in the same run with nginx and HAProxy configured as equivalent reverse proxies, and direct
requests as the baseline. All run in one namespace lab; the proxies all live in the same pod
(n1p5), the backend is nginx in n1p3 (1 KiB answers), the load generator is our C client
(`bench/httpload.c`, HTTP/1.1 keep-alive, closed loop).

Paths (each crosses the same veths and bridge):
- direct: n0p2 -> n1p3:9080 (neither enrolled; the backend is unenrolled for these runs)
- nginx / haproxy: n0p2 -> n1p5:8081 / :8082 -> n1p3:9080, plain HTTP, keep-alive upstream
- waypoint: n0p0 (enrolled) -> agent n0 -> HBONE -> waypoint in n1p5 -> HBONE -> agent n1 ->
  n1p3 (enrolled for these runs): two mTLS hops and two node agents more than the others,
  which is what a mesh L7 hop costs; `mesh-l4` (the same without the waypoint: n0p0 ->
  n1p3 over HBONE) separates the agents' share.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bench.procstat import ProcessGone, cpu_seconds
from bench.tools import BenchError, Processes, wait_port
from ztunnel.lab import runner
from ztunnel.lab import topology as topo
from ztunnel.lab import waypoint as waypoint_lab
from ztunnel.lab.topology import Topology

ROOT = Path(__file__).resolve().parents[1]  # the checkout
SOURCE = ROOT / "bench" / "httpload.c"
BACKEND_PORT = 9080
NGINX_PORT = 8081
HAPROXY_PORT = 8082
SCENARIOS = ("direct", "nginx", "haproxy", "waypoint", "mesh-l4")
Progress = Callable[[str], None]

WAYPOINT_CONFIG = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  subsets: [{name: bench, labels: {pod: %(pod)s}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http: [{route: [{destination: {host: reviews, subset: bench}}]}]
"""


def build_httpload(build_dir: Path) -> Path:
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    binary = build_dir / f"httpload-{digest}"
    if binary.exists():
        return binary
    build_dir.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["gcc", "-O2", "-Wall", "-o", str(binary), str(SOURCE)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(f"compiling {SOURCE} failed:\n{done.stderr.strip()}")
    return binary


def nginx_conf(workdir: Path, listen: str, body: str | None, upstream: str | None) -> Path:
    """nginx as a backend (`body`) or as a reverse proxy to `upstream` with keep-alive."""
    if body is not None:
        location = f'location / {{ default_type text/plain; return 200 "{body}"; }}'
        upstream_block = ""
    else:
        location = (
            "location / { proxy_pass http://backend; proxy_http_version 1.1; "
            'proxy_set_header Connection ""; }'
        )
        upstream_block = f"upstream backend {{ server {upstream}; keepalive 64; }}"
    conf = workdir / f"nginx-{listen.replace(':', '-')}.conf"
    conf.write_text(
        f"daemon off; worker_processes 1; pid {workdir}/nginx-{listen.replace(':', '-')}.pid;\n"
        f"error_log {workdir}/nginx-error.log warn;\n"
        "events { worker_connections 4096; }\n"
        f"http {{ access_log off; keepalive_requests 1000000; {upstream_block}\n"
        f"  client_body_temp_path {workdir}; proxy_temp_path {workdir};\n"
        f"  server {{ listen {listen}; {location} }} }}\n"
    )
    return conf


def haproxy_conf(workdir: Path, listen: str, upstream: str) -> Path:
    conf = workdir / "haproxy.cfg"
    conf.write_text(
        "global\n  nbthread 1\n  maxconn 8192\n"
        "defaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n"
        "  option http-keep-alive\n  http-reuse always\n"
        f"frontend fe\n  bind {listen}\n  default_backend be\n"
        f"backend be\n  server s1 {upstream}\n"
    )
    return conf


@dataclass
class L7Lab:
    topology: Topology
    workdir: Path
    processes: Processes
    pids: dict[str, int]

    def close(self) -> None:
        try:
            self.processes.stop_all()
        finally:
            runner.down(self.topology.lab_id)


def build(progress: Progress, failure_logs: Path) -> L7Lab:
    t = runner.up(2, waypoint_lab.PODS_PER_NODE, lambda m: progress(f"  l7 lab: {m}"))
    workdir = runner.lab_dir(t.lab_id) / "l7"
    lab = L7Lab(t, workdir, Processes(), {})
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        p = waypoint_lab.pods(t)
        backend, proxy = p["v1-b"], p["waypoint"]
        d = runner.lab_dir(t.lab_id)
        (d / "mesh.yaml").write_text(
            yaml.safe_dump(waypoint_lab.mesh_state(t, runner.mesh_state(t)), sort_keys=False)
        )
        (d / "waypoint.yaml").write_text(WAYPOINT_CONFIG % {"pod": backend.name})
        runner.set_enrolled(t, proxy, False)
        body = "x" * 1024
        lab.processes.start(
            backend.netns,
            ["nginx", "-c", str(nginx_conf(workdir, f"0.0.0.0:{BACKEND_PORT}", body, None))],
            workdir / "backend.log",
        )
        up = f"{backend.ip}:{BACKEND_PORT}"
        pn = lab.processes.start(
            proxy.netns,
            ["nginx", "-c", str(nginx_conf(workdir, f"0.0.0.0:{NGINX_PORT}", None, up))],
            workdir / "nginx.log",
        )
        ph = lab.processes.start(
            proxy.netns,
            ["haproxy", "-f", str(haproxy_conf(workdir, f"0.0.0.0:{HAPROXY_PORT}", up)), "-db"],
            workdir / "haproxy.log",
        )
        pw = lab.processes.start(
            proxy.netns,
            waypoint_lab.waypoint_argv(t, "--log-level", "warning"),
            workdir / "waypoint.log",
        )
        lab.pids = {"nginx": pn.pid, "haproxy": ph.pid, "waypoint": pw.pid}
        for port in (NGINX_PORT, HAPROXY_PORT, 15008):
            wait_port(proxy.netns, str(proxy.ip), port)
        wait_port(backend.netns, str(backend.ip), BACKEND_PORT)
        progress(
            f"  l7 lab {t.lab_id} up: backend nginx in {backend.name}, proxies in {proxy.name}"
        )
    except BaseException:
        lab.close()
        raise
    return lab


def _target(lab: L7Lab, scenario: str) -> tuple[str, str, int, str]:
    """(client netns, host, port, authority) of a scenario."""
    p = waypoint_lab.pods(lab.topology)
    plain = lab.topology.pod(f"{lab.topology.nodes[0].name}p2")
    if scenario == "direct":
        return plain.netns, str(p["v1-b"].ip), BACKEND_PORT, "backend"
    if scenario == "nginx":
        return plain.netns, str(p["waypoint"].ip), NGINX_PORT, "backend"
    if scenario == "haproxy":
        return plain.netns, str(p["waypoint"].ip), HAPROXY_PORT, "backend"
    if scenario == "waypoint":
        return p["client"].netns, waypoint_lab.VIP, 80, waypoint_lab.HOST
    return p["client"].netns, str(p["v1-b"].ip), BACKEND_PORT, "backend"


MESH = ("waypoint", "mesh-l4")


def set_backend_enrolled(lab: L7Lab, enrolled: bool, binary: Path) -> None:
    """The backend is enrolled for the mesh paths only; after a change, one short exchange
    per affected path settles the agents (certificates, pooled connections)."""
    runner.set_enrolled(lab.topology, waypoint_lab.pods(lab.topology)["v1-b"], enrolled)
    for s in MESH if enrolled else ("direct",):
        with contextlib.suppress(BenchError):
            measure(lab, binary, s, 2, 0.3)


# Whose CPU each scenario's rate test reads: the proxy process (with its children: nginx's
# worker) and the node agents (mesh paths only).
PROXY_OF = {"nginx": "nginx", "haproxy": "haproxy", "waypoint": "waypoint"}


def _tree_cpu(pid: int) -> float:
    """CPU seconds of `pid` and its child processes (nginx's master forks its worker)."""
    total = cpu_seconds(pid)
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError):
            for child in (task / "children").read_text().split():
                with contextlib.suppress(ProcessGone):
                    total += cpu_seconds(int(child))
    return total


def _cpu_of(lab: L7Lab, scenario: str) -> dict[str, float]:
    out: dict[str, float] = {}
    with contextlib.suppress(ProcessGone, OSError):
        if (name := PROXY_OF.get(scenario)) is not None:
            out["proxy"] = _tree_cpu(lab.pids[name])
        if scenario in MESH:
            out["agents"] = sum(
                cpu_seconds(
                    int((runner.lab_dir(lab.topology.lab_id) / n.name / "agent.pid").read_text())
                )
                for n in lab.topology.nodes
            )
    return out


def measure(lab: L7Lab, binary: Path, scenario: str, conns: int, seconds: float) -> dict[str, Any]:
    """One load run; with `cpu_us_per_req` of the proxy and the agents on the path: what a
    request costs them, far steadier on a shared machine than the rate itself."""
    netns, host, port, authority = _target(lab, scenario)
    before = _cpu_of(lab, scenario)
    argv = topo.netns_exec_argv(
        netns,
        [
            str(binary),
            "--host",
            host,
            "--port",
            str(port),
            "--conns",
            str(conns),
            "--duration",
            str(seconds),
            "--authority",
            authority,
        ],
    )
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
    try:
        res: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise BenchError(f"l7 {scenario}: {done.stderr.strip()[-300:] or 'no output'}") from None
    if not res.get("requests"):
        raise BenchError(f"l7 {scenario}: no request completed ({res})")
    after = _cpu_of(lab, scenario)
    res["cpu_us_per_req"] = {
        k: round((after[k] - before[k]) * 1e6 / res["requests"], 1) for k in before if k in after
    }
    return res


def run(
    reps: int, seconds: float, out_dir: Path, progress: Progress, conns: int = 16
) -> dict[str, Any]:
    """Every scenario, `reps` interleaved repetitions of max rate (`conns` connections) and
    latency (one connection); medians and ratios."""
    binary = build_httpload(out_dir / "build")
    lab = build(progress, out_dir / "logs")
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {s: {"max": [], "lat": []} for s in SCENARIOS}
    errors: list[str] = []
    try:
        for rep in range(1, reps + 1):
            for s in SCENARIOS:
                if s == SCENARIOS[0]:
                    set_backend_enrolled(lab, False, binary)
                elif s == MESH[0]:
                    set_backend_enrolled(lab, True, binary)
                for kind, c in (("max", conns), ("lat", 1)):
                    try:
                        raw[s][kind].append(measure(lab, binary, s, c, seconds))
                    except BenchError as e:
                        errors.append(f"rep {rep} {s} {kind}: {e}")
                m = raw[s]["max"][-1] if raw[s]["max"] else {}
                progress(f"[l7 rep {rep}/{reps}] {s:<9} {m.get('rps', 0):>9.0f} req/s")
    finally:
        lab.close()
    summary = {s: _summary(raw[s]) for s in SCENARIOS}
    return {
        "summary": summary,
        "ratios": _ratios(summary),
        "errors": errors,
        "raw": raw,
        "reps": reps,
        "seconds": seconds,
        "conns": conns,
        "load": round(os.getloadavg()[0], 1),
        "lab_id": lab.topology.lab_id,
    }


def _summary(by: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    def med(kind: str, *path: str) -> float | None:
        vals = []
        for r in by[kind]:
            v: Any = r
            for k in path:
                v = v.get(k) if isinstance(v, dict) else None
            if isinstance(v, int | float):
                vals.append(float(v))
        return round(statistics.median(vals), 1) if vals else None

    return {
        "rps": med("max", "rps"),
        "p50_us": med("lat", "latency_us", "p50"),
        "p99_us": med("lat", "latency_us", "p99"),
        "errors": sum(int(r.get("errors", 0)) for k in by for r in by[k]),
        "proxy_cpu_us": med("max", "cpu_us_per_req", "proxy"),
        "agents_cpu_us": med("max", "cpu_us_per_req", "agents"),
    }


def _ratios(summary: dict[str, dict[str, Any]]) -> dict[str, Any]:
    def ratio(a: str, b: str) -> float | None:
        x, y = summary[a].get("rps"), summary[b].get("rps")
        return round(x / y, 3) if x and y else None

    def added(s: str, q: str) -> float | None:
        x, y = summary[s].get(q), summary["direct"].get(q)
        return round(x - y, 1) if x is not None and y is not None else None

    def cpu_ratio(a: str, b: str) -> float | None:
        x, y = summary[a].get("proxy_cpu_us"), summary[b].get("proxy_cpu_us")
        return round(x / y, 1) if x and y else None

    return {
        "waypoint_vs_nginx_cpu": cpu_ratio("waypoint", "nginx"),
        "waypoint_vs_nginx_rps": ratio("waypoint", "nginx"),
        "waypoint_vs_haproxy_rps": ratio("waypoint", "haproxy"),
        "nginx_vs_direct_rps": ratio("nginx", "direct"),
        "added_us": {
            s: {"p50": added(s, "p50_us"), "p99": added(s, "p99_us")}
            for s in SCENARIOS
            if s != "direct"
        },
    }


def table(res: dict[str, Any]) -> str:
    lines = [
        f"| L7 path | req/s ({res.get('conns', 16)} conns) | p50 us (1 conn) | p99 us "
        "| +p50 us vs direct | +p99 us | proxy CPU us/req | agents CPU us/req |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def cpu(v: float | None) -> str:
        return "-" if v is None else f"{v:,.0f}"

    for s in SCENARIOS:
        m = res["summary"][s]
        a = res["ratios"]["added_us"].get(s, {"p50": 0, "p99": 0})
        lines.append(
            f"| {s} | {m['rps'] or 0:,.0f} | {m['p50_us'] or 0:.0f} | {m['p99_us'] or 0:.0f} | "
            f"+{a['p50'] or 0:.0f} | +{a['p99'] or 0:.0f} | {cpu(m.get('proxy_cpu_us'))} | "
            f"{cpu(m.get('agents_cpu_us'))} |"
        )
    r = res["ratios"]
    lines.append("")
    lines.append(
        f"- waypoint req/s vs nginx: {r['waypoint_vs_nginx_rps']}x, vs HAProxy: "
        f"{r['waypoint_vs_haproxy_rps']}x (the waypoint path also has two node agents and two "
        "mTLS hops; mesh-l4 shows their share)"
    )
    if r.get("waypoint_vs_nginx_cpu"):
        lines.append(
            f"- CPU per request, waypoint vs nginx: {r['waypoint_vs_nginx_cpu']}x (steadier than "
            "the rates on a shared machine: a request waits for a CPU at every hop)"
        )
    return "\n".join(lines)


README_BEGIN = "<!-- bench-l7:begin (written by `ztunnel bench`; edits inside are overwritten) -->"
README_END = "<!-- bench-l7:end -->"


def update_readme(readme: Path, res: dict[str, Any]) -> None:
    """Rewrite the L7 block of the README (between its markers) with this run's table."""
    text = readme.read_text()
    start, end = text.find(README_BEGIN), text.find(README_END)
    if start < 0 or end < start:
        return
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    block = (
        f"{README_BEGIN}\nLatest run: {when} (this machine: 2 cores shared with other test "
        f"runs, load average {res.get('load', '?')} at the end: rates and latencies are "
        "noisy, CPU per request much less); medians of "
        f"{res['reps']} run(s) of {res['seconds']} s; 1 KiB answers from nginx.\n\n"
        f"{table(res)}\n"
    )
    readme.write_text(text[:start] + block + text[end:])


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.l7`: only the L7 section (as root), e.g. after a waypoint
    change; `ztunnel bench` runs it after the L4 suite."""
    ap = argparse.ArgumentParser(prog="python -m bench.l7", description=main.__doc__)
    ap.add_argument("--reps", type=int, default=3, help="repetitions (medians over them)")
    ap.add_argument("--seconds", type=float, default=3.0, help="duration of each measurement")
    ap.add_argument("--conns", type=int, default=16, help="connections of the rate test")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--readme", action="store_true", help="rewrite the README's L7 table")
    args = ap.parse_args(argv)
    if not 1 <= args.reps <= 20 or not 0.2 <= args.seconds <= 60 or not 1 <= args.conns <= 1024:
        ap.error("--reps 1..20, --seconds 0.2..60, --conns 1..1024")
    res = run(args.reps, args.seconds, args.out, lambda m: print(m, flush=True), args.conns)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "l7.json").write_text(json.dumps(res, indent=1) + "\n")
    print("\n" + table(res))
    for e in res["errors"]:
        print(f"ERROR {e}")
    if args.readme and not res["errors"]:
        update_readme(ROOT / "README.md", res)
        print(f"updated the L7 table of {ROOT / 'README.md'}")
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
