"""`ztunnel demo`: two node agents on one loopback, applications on 127.X.Y.Z addresses,
real traffic through HBONE, and a short readable summary. Needs no root and no kernel capture:
clients enter the mesh through each agent's SOCKS5 port."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ztunnel.ca import CertificateAuthority
from ztunnel.testing import (
    EchoServer,
    SocksRefused,
    free_port,
    free_ports,
    port_open,
    random_loopback_net,
    socks5_connect,
    wait_for,
)


@dataclass
class Flow:
    name: str
    dest: str
    port: int
    expect_ok: bool = True


def mesh_config(net: str, with_policy: bool = True) -> dict[str, Any]:
    """The demo's mesh (also the loopback tests' fixture, without the policy)."""

    def wl(
        name: str,
        ns: str,
        sa: str,
        ip: str,
        node: str,
        proto: str = "HBONE",
        services: dict[str, dict[int, int]] | None = None,
    ) -> dict[str, object]:
        return {
            "uid": f"Kubernetes//Pod/{ns}/{name}",
            "name": name,
            "namespace": ns,
            "serviceAccount": sa,
            "workloadIps": [ip],
            "protocol": proto,
            "node": node,
            "canonicalName": name.rsplit("-", 1)[0],
            "canonicalRevision": "v1",
            "services": services or {},
        }

    svc = {"shop/echo.shop.svc.cluster.local": {80: 8080}}
    return {
        "workloads": [
            wl("client-a", "frontend", "web", f"{net}.1", "node-a"),
            wl("echo-a", "shop", "echo", f"{net}.2", "node-a", services=svc),
            wl("echo-b", "shop", "echo", f"{net}.11", "node-b", services=svc),
            wl("legacy-b", "legacy", "default", f"{net}.12", "node-b", proto="TCP"),
        ],
        "services": [
            {
                "name": "echo",
                "namespace": "shop",
                "hostname": "echo.shop.svc.cluster.local",
                "vips": [f"{net}.100"],
                "ports": {80: 8080},
            },
        ],
        "policies": [
            {
                "name": "deny-admin-port",
                "namespace": "shop",
                "scope": "Namespace",
                "action": "Deny",
                "rules": [[[{"destinationPorts": [9090]}]]],
            },
        ]
        if with_policy
        else [],
    }


def start_agent(
    node: str, workdir: Path, ca_dir: Path, cfg: Path, hbone_port: int, verbose: bool
) -> tuple[subprocess.Popen[bytes], int]:
    socks, outbound, inbound = free_ports(3)
    env = dict(os.environ)
    cmd = [
        sys.executable,
        "-m",
        "ztunnel",
        "run",
        "--node-name",
        node,
        "--local-xds",
        str(cfg),
        "--ca-dir",
        str(ca_dir),
        "--hbone-port",
        str(hbone_port),
        "--outbound-port",
        str(outbound),
        "--inbound-plaintext-port",
        str(inbound),
        "--socks5-port",
        str(socks),
        "--admin-port",
        "0",
        "--stats-port",
        "0",
        "--readiness-port",
        "0",
        "--drain-timeout",
        "2",
    ]
    log = None if verbose else open(workdir / f"{node}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, socks


async def _exchange(socks: int, src: str, dest: str, port: int, payload: bytes) -> bytes:
    r, w = await socks5_connect(("127.0.0.1", socks), dest, port, source_ip=src)
    w.write(payload)
    w.write_eof()
    data = await asyncio.wait_for(r.read(), 10)
    w.close()
    return data


async def _run_flows(net: str, socks_a: int, servers: dict[str, EchoServer]) -> list[list[str]]:
    flows = [
        ("cross node, HBONE", f"{net}.11", 8080, "echo-b"),
        ("same node, HBONE", f"{net}.2", 8080, "echo-a"),
        ("service VIP (2 endpoints)", f"{net}.100", 80, "echo-*"),
        ("service by hostname", "echo.shop.svc.cluster.local", 80, "echo-*"),
        ("TCP workload, passthrough", f"{net}.12", 8080, "legacy-b"),
        ("outside the mesh, passthrough", f"{net}.200", 8080, "outside"),
        ("denied by policy (shop: deny 9090)", f"{net}.11", 9090, "-"),
        ("nothing listening", f"{net}.11", 9, "-"),
    ]
    rows = []
    for name, dest, port, _target in flows:
        before = {k: s.accepted for k, s in servers.items()}
        payload = f"hello {name}".encode()
        t0 = time.perf_counter()
        try:
            got = await _exchange(socks_a, f"{net}.1", dest, port, payload)
            ok = got == payload
            result = "ok, bytes echoed" if ok else f"MISMATCH ({len(got)} bytes)"
        except SocksRefused as e:
            result = f"refused (SOCKS5 reply {e.code})"
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as e:
            result = f"failed: {e}"
        ms = (time.perf_counter() - t0) * 1000
        served = [k for k, s in servers.items() if s.accepted > before[k]]
        seen = ""
        for k in served:
            seen = servers[k].peers[-1][0]
        rows.append(
            [name, f"{dest}:{port}", ",".join(served) or "-", seen or "-", result, f"{ms:.1f}"]
        )
    return rows


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    out = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True)), line]
    out += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def run_demo(verbose: bool = False) -> int:
    net = random_loopback_net()
    workdir = Path(tempfile.mkdtemp(prefix="ztunnel-demo-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        print(f"ztunnel demo: two node agents on loopback, workloads on {net}.0/24")
        ca_dir = workdir / "ca"
        CertificateAuthority.create("cluster.local").save(ca_dir)
        cfg = workdir / "mesh.yaml"
        cfg.write_text(yaml.safe_dump(mesh_config(net)))
        hbone_port = free_port()
        print("  [1/3] starting agents node-a and node-b ...", flush=True)
        a, socks_a = start_agent("node-a", workdir, ca_dir, cfg, hbone_port, verbose)
        b, _ = start_agent("node-b", workdir, ca_dir, cfg, hbone_port, verbose)
        procs += [a, b]
        wait_for(
            lambda: (
                port_open("127.0.0.1", socks_a)
                and port_open(f"{net}.11", hbone_port)
                and port_open(f"{net}.2", hbone_port)
            ),
            timeout=20,
        )

        async def scenario() -> list[list[str]]:
            servers = {
                "echo-a": await EchoServer(f"{net}.2", 8080).start(),
                "echo-b": await EchoServer(f"{net}.11", 8080).start(),
                "echo-b:9090": await EchoServer(f"{net}.11", 9090).start(),
                "legacy-b": await EchoServer(f"{net}.12", 8080).start(),
                "outside": await EchoServer(f"{net}.200", 8080).start(),
            }
            print("  [2/3] sending traffic from client-a (frontend/web) ...", flush=True)
            try:
                return await _run_flows(net, socks_a, servers)
            finally:
                for s in servers.values():
                    await s.close()

        rows = asyncio.run(scenario())
        print("  [3/3] summary\n")
        print(
            _table(rows, ["flow", "destination", "served by", "server saw client", "result", "ms"])
        )
        print(
            f"\nclient-a is {net}.1 (spiffe://cluster.local/ns/frontend/sa/web); HBONE "
            "flows are mutual TLS 1.3 + HTTP/2 CONNECT between the two agents; the server "
            "sees the real client address."
        )
        failed = [r for r in rows[:-2] if not r[4].startswith("ok")]
        if (
            failed
            or rows[-2][4] != "refused (SOCKS5 reply 2)"
            or rows[-1][4] != ("refused (SOCKS5 reply 5)")
        ):
            print("\ndemo: UNEXPECTED RESULTS (see above); agent logs in", workdir)
            return 1
        return 0
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        if not verbose:
            shutil.rmtree(workdir, ignore_errors=True)
