"""The admin API and `ztunnel ctl` against a real `ztunnel run` process on loopback: views,
output formats, run-time log level, bad HTTP input, /quitquitquit and SIGTERM exits."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from ztunnel.admin import HttpServer, Route, text
from ztunnel.ca import CertificateAuthority
from ztunnel.testing import EchoServer, free_port, random_loopback_net, socks5_connect

pytestmark = pytest.mark.integration

WEB = "spiffe://cluster.local/ns/frontend/sa/web"
ECHO = "spiffe://cluster.local/ns/shop/sa/echo"


@dataclass
class RunningAgent:
    proc: subprocess.Popen[bytes]
    net: str
    admin: int
    stats: int
    readiness: int
    socks5: int
    log: Path

    @property
    def admin_addr(self) -> str:
        return f"127.0.0.1:{self.admin}"

    def log_lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text().splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return out


def request(port: int, method: str, path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def poll(predicate: Any, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def start_agent(workdir: Path, *extra: str) -> RunningAgent:
    net = random_loopback_net()
    ca_dir = workdir / "ca"
    if not ca_dir.exists():
        CertificateAuthority.create("cluster.local").save(ca_dir)
    cfg = workdir / f"mesh-{net}.yaml"

    def wl(name: str, ns: str, sa: str, ip: str) -> dict[str, Any]:
        return {
            "uid": f"Kubernetes//Pod/{ns}/{name}",
            "name": name,
            "namespace": ns,
            "serviceAccount": sa,
            "workloadIps": [ip],
            "node": "node-a",
        }

    cfg.write_text(
        yaml.safe_dump(
            {
                "workloads": [
                    wl("client-a", "frontend", "web", f"{net}.1"),
                    wl("echo-a", "shop", "echo", f"{net}.2"),
                ],
                "policies": [
                    {
                        "name": "deny-admin-port",
                        "namespace": "shop",
                        "scope": "Namespace",
                        "action": "Deny",
                        "rules": [[[{"destinationPorts": [9090]}]]],
                    }
                ],
            }
        )
    )
    ports = {name: free_port() for name in ("admin", "stats", "readiness", "socks5")}
    log = workdir / f"agent-{net}.log"
    cmd = [
        sys.executable,
        "-m",
        "ztunnel",
        "run",
        "--node-name",
        "node-a",
        "--local-xds",
        str(cfg),
        "--ca-dir",
        str(ca_dir),
        "--hbone-port",
        str(free_port()),
        "--outbound-port",
        str(free_port()),
        "--inbound-plaintext-port",
        str(free_port()),
        "--socks5-port",
        str(ports["socks5"]),
        "--admin-port",
        str(ports["admin"]),
        "--stats-port",
        str(ports["stats"]),
        "--readiness-port",
        str(ports["readiness"]),
        "--drain-timeout",
        "2",
        *extra,
    ]
    env = {**os.environ, "LOG_FORMAT": "json"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    agent = RunningAgent(
        proc, net, ports["admin"], ports["stats"], ports["readiness"], ports["socks5"], log
    )

    def is_ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"agent exited with {proc.returncode}:\n{log.read_text()}")
        try:
            return request(agent.readiness, "GET", "/healthz/ready")[0] == 200
        except OSError:
            return False

    poll(is_ready, "the agent to be ready")
    return agent


def stop(agent: RunningAgent) -> int:
    if agent.proc.poll() is None:
        agent.proc.send_signal(signal.SIGTERM)
    try:
        return agent.proc.wait(15)
    except subprocess.TimeoutExpired:
        agent.proc.kill()
        agent.proc.wait()
        raise


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningAgent]:
    running = start_agent(tmp_path_factory.mktemp("agent"))
    yield running
    assert stop(running) == 0


def ctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ztunnel", "ctl", *args], capture_output=True, text=True, timeout=30
    )


def test_ctl_workloads_table_and_json(agent: RunningAgent) -> None:
    table = ctl("workloads", "--admin", agent.admin_addr)
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split()[:2] == ["NAMESPACE", "NAME"]
    assert any("client-a" in r and WEB in r and f"{agent.net}.1" in r for r in rows)
    as_json = ctl("--admin", agent.admin_addr, "workloads", "-o", "json")
    assert as_json.returncode == 0, as_json.stderr
    workloads = {w["name"]: w for w in json.loads(as_json.stdout)}
    assert set(workloads) == {"client-a", "echo-a"}
    assert workloads["echo-a"]["identity"] == ECHO
    assert workloads["echo-a"]["addresses"] == [f"{agent.net}.2"]
    assert workloads["client-a"]["local"] is True


def test_ctl_connections_json_lists_a_live_connection(agent: RunningAgent) -> None:
    chunk = b"z" * 4096

    async def scenario() -> list[dict[str, Any]]:
        echo = await EchoServer(f"{agent.net}.2", 8080).start()
        try:
            r, w = await socks5_connect(
                ("127.0.0.1", agent.socks5), f"{agent.net}.2", 8080, source_ip=f"{agent.net}.1"
            )
            w.write(chunk)
            assert await r.readexactly(len(chunk)) == chunk
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "ztunnel",
                "ctl",
                "connections",
                "-o",
                "json",
                "--admin",
                agent.admin_addr,
                stdout=asyncio.subprocess.PIPE,
            )
            out, _ = await asyncio.wait_for(proc.communicate(), 30)
            assert proc.returncode == 0
            w.write_eof()
            assert await asyncio.wait_for(r.read(), 10) == b""
            w.close()
            live: list[dict[str, Any]] = json.loads(out)
            return live
        finally:
            await echo.close()

    live = asyncio.run(scenario())
    by_direction = {c["direction"]: c for c in live}
    assert set(by_direction) == {"outbound", "inbound"}
    out = by_direction["outbound"]
    assert (out["src"].split(":")[0], out["dst"]) == (f"{agent.net}.1", f"{agent.net}.2:8080")
    assert (out["src_identity"], out["dst_identity"]) == (WEB, ECHO)
    assert (out["bytes_sent"], out["bytes_recv"]) == (len(chunk), len(chunk))
    assert out["age_seconds"] >= 0 and out["path"] == "hbone"

    # LOG_FORMAT=json: the finished connection's access-log line parses and names identities.
    def logged() -> bool:
        return any(
            e.get("message") == "connection complete" and e.get("direction") == "outbound"
            for e in agent.log_lines()
        )

    poll(logged, "the access-log line")
    (entry,) = [
        e
        for e in agent.log_lines()
        if e.get("message") == "connection complete" and e["direction"] == "outbound"
    ]
    assert entry["scope"] == "ztunnel.access"
    assert (entry["src.identity"], entry["dst.identity"]) == (WEB, ECHO)
    assert (entry["bytes_sent"], entry["bytes_recv"]) == (len(chunk), len(chunk))


def test_ctl_other_views_and_config_dump(agent: RunningAgent) -> None:
    certs = ctl("certificates", "--admin", agent.admin_addr, "-o", "yaml")
    assert certs.returncode == 0, certs.stderr
    idents = {c["identity"]: c for c in yaml.safe_load(certs.stdout)}
    assert set(idents) == {WEB, ECHO}
    assert idents[WEB]["state"] == "available" and idents[WEB]["not_after"]
    services = ctl("services", "--admin", agent.admin_addr)
    assert services.returncode == 0 and services.stdout.strip() == "no services"
    policies = ctl("policies", "--admin", agent.admin_addr)
    assert policies.returncode == 0, policies.stderr
    header, row = policies.stdout.splitlines()
    assert header.split() == ["NAMESPACE", "NAME", "SCOPE", "ACTION", "RULES", "DRY", "RUN"]
    assert row.split() == ["shop", "deny-admin-port", "NAMESPACE", "DENY", "1", "no"]
    dump = ctl("config-dump", "--admin", agent.admin_addr)
    assert dump.returncode == 0
    data = json.loads(dump.stdout)
    assert data["node"] == "node-a" and data["readiness"] == {"ready": True, "pending": []}
    assert data["mesh_state"]["loaded"] is True and data["mesh_state"]["last_error"] is None
    kinds = {(lst["kind"], lst["address"].rsplit(":", 1)[0]) for lst in data["listeners"]}
    assert ("hbone", f"{agent.net}.1") in kinds and ("socks5", "127.0.0.1") in kinds
    assert set(data) >= {"workloads", "services", "policies", "certificates", "connections"}


def test_ctl_names_the_address_when_no_agent_listens() -> None:
    port = free_port()
    result = ctl("workloads", "--admin", f"127.0.0.1:{port}")
    assert result.returncode == 1
    assert f"127.0.0.1:{port}" in result.stderr and "cannot reach" in result.stderr
    assert result.stdout == ""


def test_logging_level_changes_at_run_time(agent: RunningAgent) -> None:
    assert request(agent.admin, "GET", "/logging") == (200, "current log level is info\n")
    try:
        assert request(agent.admin, "POST", "/logging?level=debug") == (
            200,
            "current log level is debug\n",
        )
        assert request(agent.admin, "GET", "/logging")[1] == "current log level is debug\n"
        status, body = request(agent.admin, "PUT", "/logging?level=loud")
        assert status == 400 and "unknown log level" in body
        assert request(agent.admin, "POST", "/logging")[0] == 400
        assert request(agent.admin, "GET", "/logging?level=error")[0] == 405
        assert request(agent.admin, "GET", "/logging")[1] == "current log level is debug\n"
    finally:
        assert request(agent.admin, "PUT", "/logging?level=info")[0] == 200
    assert any(
        e.get("message", "").startswith("log level changed to debug") for e in agent.log_lines()
    )


def test_bad_http_gets_4xx_and_the_agent_keeps_serving(agent: RunningAgent) -> None:
    def status_of(answer: bytes) -> int:
        return int(answer.split(b" ", 2)[1])

    assert status_of(raw(agent.admin, b"garbage\r\n\r\n")) == 400
    assert status_of(raw(agent.admin, b"GET / HTTP/1.1\r\n\r\n")) == 400  # no Host
    assert status_of(raw(agent.stats, b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\n")) == 400
    big = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"
    assert status_of(raw(agent.stats, big)) == 431
    assert status_of(raw(agent.readiness, b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")) == 404
    assert status_of(raw(agent.admin, b"GET /quitquitquit HTTP/1.1\r\nHost: x\r\n\r\n")) == 405
    assert raw(agent.admin, b"") == b""  # connect and close: nothing to answer
    head = raw(agent.admin, b"HEAD /config_dump HTTP/1.1\r\nHost: x\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")
    assert request(agent.readiness, "GET", "/healthz/ready") == (200, "ready\n")
    assert agent.proc.poll() is None


def test_quitquitquit_drains_and_exits_0(tmp_path: Path) -> None:
    running = start_agent(tmp_path)
    try:
        assert request(running.admin, "POST", "/quitquitquit") == (200, "OK\n")
        assert running.proc.wait(15) == 0
    finally:
        stop(running)
    assert any(e.get("message", "").startswith("draining") for e in running.log_lines())


def test_sigterm_drains_and_exits_0(tmp_path: Path) -> None:
    running = start_agent(tmp_path)
    assert stop(running) == 0
    assert any(e.get("message", "").startswith("draining") for e in running.log_lines())


def test_admin_on_a_non_loopback_address_is_a_configuration_error(tmp_path: Path) -> None:
    CertificateAuthority.create("cluster.local").save(tmp_path / "ca")
    (tmp_path / "mesh.yaml").write_text("workloads: []\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ztunnel",
            "run",
            "--local-xds",
            str(tmp_path / "mesh.yaml"),
            "--ca-dir",
            str(tmp_path / "ca"),
            "--admin-address",
            "0.0.0.0",
            "--admin-port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "admin_address" in result.stderr and "loopback" in result.stderr


def test_request_deadline_and_connection_cap() -> None:
    async def scenario() -> None:
        server = HttpServer(
            "t", {"/": Route(lambda r: text(200, "ok"))}, request_timeout=0.3, max_connections=1
        )
        await server.start("127.0.0.1", 0)
        assert server.address is not None
        try:
            slow_r, slow_w = await asyncio.open_connection(*server.address)
            slow_w.write(b"GET / HT")  # and then nothing
            r, w = await asyncio.open_connection(*server.address)
            busy = await asyncio.wait_for(r.read(), 5)
            assert busy.startswith(b"HTTP/1.1 503 ")
            w.close()
            answer = await asyncio.wait_for(slow_r.read(), 5)
            assert answer.startswith(b"HTTP/1.1 408 ")
            slow_w.close()
            r, w = await asyncio.open_connection(*server.address)
            w.write(b"GET / HTTP/1.0\r\n\r\n")
            assert (await asyncio.wait_for(r.read(), 5)).endswith(b"\r\n\r\nok\n")
            w.close()
        finally:
            await server.close()

    asyncio.run(scenario())
