"""The programs a benchmark run drives inside lab namespaces: our C load generator
(`bench/loadgen.c`, compiled here with gcc), iperf3, stunnel, and the nftables TPROXY rules of
the iptables-style capture. Every client runs under a timeout; servers are owned by a
`Processes` set and stopped by pid."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ztunnel.errors import ZtunnelError
from ztunnel.lab import topology as topo

REPO_ROOT = Path(__file__).resolve().parents[1]
LOADGEN_SOURCE = REPO_ROOT / "bench" / "loadgen.c"
# Client processes get this long beyond their own duration before they are killed (iperf3
# ends within a second of its -t; a tunnel that stalls must not cost much of a run).
CLIENT_SLACK = 10.0
IPERF3_SLACK = 6.0


class BenchError(ZtunnelError):
    """A benchmark step failed (a tool missing, a client that errored, a lab that broke)."""


_TOOLS = {
    "gcc": "gcc",
    "iperf3": "iperf3",
    "stunnel": "stunnel4",
    "nft": "nftables",
    "ip": "iproute2",
}


def ensure_tools(progress: Callable[[str], None]) -> None:
    """Makes sure every external program of a run is there: like `scripts/setup.sh`, a run does
    its own set-up and installs missing Debian packages (idempotent); raises if it cannot."""
    missing = {tool: pkg for tool, pkg in _TOOLS.items() if shutil.which(tool) is None}
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        pkgs = sorted(set(missing.values()))
        progress(f"installing Debian packages: {' '.join(pkgs)}")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-qq", *pkgs]
        with contextlib.suppress(subprocess.TimeoutExpired):
            if (
                subprocess.run(
                    install, capture_output=True, env=env, timeout=600, check=False
                ).returncode
                != 0
            ):
                subprocess.run(
                    ["apt-get", "update", "-qq"],
                    capture_output=True,
                    env=env,
                    timeout=600,
                    check=False,
                )
                subprocess.run(install, capture_output=True, env=env, timeout=600, check=False)
        missing = {tool: pkg for tool, pkg in missing.items() if shutil.which(tool) is None}
    if missing:
        raise BenchError(
            "missing tools: "
            + ", ".join(f"{tool} (Debian package {pkg})" for tool, pkg in missing.items())
        )


def build_loadgen(build_dir: Path) -> Path:
    """Compiles bench/loadgen.c (once per source version) and returns the binary's path."""
    source = LOADGEN_SOURCE.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:12]
    binary = build_dir / f"loadgen-{digest}"
    if binary.exists():
        return binary
    build_dir.mkdir(parents=True, exist_ok=True)
    tmp = binary.with_suffix(".tmp")
    done = subprocess.run(
        ["gcc", "-O2", "-Wall", "-pthread", "-o", str(tmp), str(LOADGEN_SOURCE)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(f"compiling {LOADGEN_SOURCE} failed:\n{done.stderr.strip()}")
    tmp.replace(binary)
    return binary


@dataclass
class Processes:
    """Long-running processes of a run (servers, stunnel), each stopped by its own pid."""

    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, netns: str, argv: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            proc = topo.popen_in_netns(
                netns,
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def stop_all(self, grace: float = 3.0) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in self.procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(5)
        self.procs.clear()


def wait_port(netns: str, ip: str, port: int, timeout: float = 10.0) -> None:
    """Waits until a TCP connect from `netns` to ip:port succeeds."""
    import socket

    def probe() -> bool:
        try:
            with socket.create_connection((ip, port), timeout=0.5):
                return True
        except OSError:
            return False

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if topo.call_in_netns(netns, probe):
            return
        time.sleep(0.05)
    raise BenchError(f"nothing answers on {ip}:{port} from {netns} after {timeout:.0f}s")


def run_json(netns: str, argv: Sequence[str], timeout: float) -> dict[str, Any]:
    """Runs a client in `netns` to completion and returns the last JSON object it printed."""
    full = topo.netns_exec_argv(netns, argv)
    try:
        done = subprocess.run(full, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{argv[0]} in {netns} did not finish within {timeout:.0f}s") from None
    text = done.stdout.strip()
    try:
        # iperf3 -J prints one multi-line object; loadgen prints one object per line.
        try:
            data: dict[str, Any] = json.loads(text)
        except ValueError:
            data = json.loads(text.splitlines()[-1])
    except (ValueError, IndexError):
        raise BenchError(
            f"{' '.join(argv)} in {netns}: exit {done.returncode}, no JSON: "
            f"{(done.stderr or done.stdout).strip()[-400:]}"
        ) from None
    if "error" in data:
        raise BenchError(f"{' '.join(argv)} in {netns}: {data['error']}")
    return data


# ---- the load generator ---------------------------------------------------------------------


@dataclass(frozen=True)
class LoadGen:
    binary: Path
    req: int = 1024
    resp: int = 1024

    def server_argv(self, port: int, threads: int = 2) -> list[str]:
        return [str(self.binary), "server", "--port", str(port), "--threads", str(threads)]

    def _client(self, mode: str, ip: str, port: int, conns: int, extra: list[str]) -> list[str]:
        return [
            str(self.binary),
            mode,
            "--host",
            ip,
            "--port",
            str(port),
            "--conns",
            str(conns),
            "--req",
            str(self.req),
            "--resp",
            str(self.resp),
            *extra,
        ]

    def rr(
        self, netns: str, ip: str, port: int, conns: int, duration: float, rate: float = 0.0
    ) -> dict[str, Any]:
        extra = ["--duration", str(duration)] + (["--rate", str(rate)] if rate else [])
        return run_json(netns, self._client("rr", ip, port, conns, extra), duration + CLIENT_SLACK)

    def cps(self, netns: str, ip: str, port: int, conns: int, duration: float) -> dict[str, Any]:
        return run_json(
            netns,
            self._client("cps", ip, port, conns, ["--duration", str(duration)]),
            duration + CLIENT_SLACK,
        )

    def hold_argv(self, ip: str, port: int, conns: int, hold: float, setup: float) -> list[str]:
        return self._client("hold", ip, port, conns, ["--hold", str(hold), "--setup", str(setup)])


def iperf3(netns: str, ip: str, port: int, seconds: int, parallel: int) -> dict[str, Any]:
    """Bulk throughput client -> server; Gbit/s received by the server, and retransmits."""
    argv = [
        "iperf3",
        "-c",
        ip,
        "-p",
        str(port),
        "-t",
        str(seconds),
        "-P",
        str(parallel),
        "-J",
        "--connect-timeout",
        "5000",
    ]
    data = run_json(netns, argv, seconds + IPERF3_SLACK)
    end = data.get("end", {})
    try:
        bps = float(end["sum_received"]["bits_per_second"])
        sent = end.get("sum_sent", {})
    except (KeyError, TypeError, ValueError):
        raise BenchError(f"iperf3 in {netns}: unexpected output") from None
    return {
        "gbps": round(bps / 1e9, 4),
        "retransmits": int(sent.get("retransmits", 0)),
        "seconds": seconds,
        "parallel": parallel,
    }


def iperf3_server_argv(port: int) -> list[str]:
    # --idle-timeout: a server left stuck by a failed client restarts by itself.
    return ["iperf3", "-s", "-p", str(port), "--idle-timeout", "20"]


# ---- stunnel --------------------------------------------------------------------------------


@dataclass(frozen=True)
class StunnelService:
    name: str
    accept: str  # ip:port
    connect: str  # ip:port


def stunnel_config(
    client: bool, services: Sequence[StunnelService], cert_dir: Path, log: Path
) -> str:
    """A stunnel 5 configuration: mutual TLS 1.3 with our CA's certificates, in the foreground,
    logging errors only, TCP_NODELAY on both sides (as the mesh sets it)."""
    lines = [
        "foreground = yes",
        "pid =",
        "debug = 3",
        f"output = {log}",
        "socket = l:TCP_NODELAY=1",
        "socket = r:TCP_NODELAY=1",
    ]
    for svc in services:
        lines += [
            "",
            f"[{svc.name}]",
            f"client = {'yes' if client else 'no'}",
            f"accept = {svc.accept}",
            f"connect = {svc.connect}",
            f"cert = {cert_dir / 'cert-chain.pem'}",
            f"key = {cert_dir / 'key.pem'}",
            f"CAfile = {cert_dir / 'root-cert.pem'}",
            "verifyChain = yes",
            "sslVersionMin = TLSv1.3",
        ]
    return "\n".join(lines) + "\n"


# ---- TPROXY capture (the iptables-style comparison) -----------------------------------------


def tproxy_ruleset(
    table: str,
    pod_ifnames: Sequence[str],
    pod_ips: Sequence[str],
    node_ips: Sequence[str],
    uplink: str,
    mark: int,
    ports: tuple[int, int, int] = (15001, 15006, 15008),
) -> str:
    """nftables rules that capture enrolled pods' TCP like the eBPF programs do, with TPROXY.

    Packets of sockets that exist already in the node (accepted captures, the agent's
    spoofed-source connections to pods) are marked for local delivery; new connections leaving
    an enrolled pod go to the outbound listener; new connections arriving on the uplink for an
    enrolled pod go to the HBONE (port 15008) or the inbound plaintext listener.
    """
    outbound, inbound, hbone = ports
    ifs = ", ".join(f'"{i}"' for i in pod_ifnames)
    pods = ", ".join(pod_ips)
    nodes = ", ".join(node_ips)
    to_local = f"meta mark set {mark:#x} accept"
    rules = [
        f"meta l4proto tcp socket transparent 1 {to_local}",
        f"iifname {{ {ifs} }} meta l4proto tcp ip daddr != {{ {nodes} }} "
        f"tproxy to :{outbound} {to_local}",
        f'iifname "{uplink}" ip daddr {{ {pods} }} tcp dport {hbone} tproxy to :{hbone} {to_local}',
        f'iifname "{uplink}" ip daddr {{ {pods} }} meta l4proto tcp '
        f"tproxy to :{inbound} {to_local}",
    ]
    body = "\n".join(f"        {r}" for r in rules)
    return (
        f"table ip {table} {{\n    chain prerouting {{\n"
        f"        type filter hook prerouting priority mangle; policy accept;\n"
        f"{body}\n    }}\n}}\n"
    )


def install_tproxy(netns: str, ruleset: str, rules_file: Path, mark: int, table: int) -> None:
    """Loads the ruleset and the local-delivery route in a node namespace (never the root one)."""
    rules_file.write_text(ruleset)
    topo.run_in_netns(netns, ["nft", "-f", str(rules_file)])
    topo.run_in_netns(
        netns,
        [
            "ip",
            "rule",
            "add",
            "fwmark",
            f"{mark:#x}/{mark:#x}",
            "lookup",
            str(table),
            "priority",
            "100",
        ],
    )
    topo.run_in_netns(
        netns, ["ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", str(table)]
    )


def raise_nofile(limit: int) -> None:
    """Raises this process's open-file limit to `limit` (inherited by everything it starts:
    agents, servers, clients); root may raise the hard limit too."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= limit:
        return
    new_hard = hard if hard == resource.RLIM_INFINITY or hard >= limit else limit
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, new_hard))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
