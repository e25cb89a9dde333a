"""Telemetry end to end: two in-process agents on loopback, traffic through SOCKS5 and HBONE,
then what Prometheus, the access log and readiness probes would see over HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from ztunnel.app import Agent
from ztunnel.ca import CertificateAuthority
from ztunnel.config import Settings
from ztunnel.logs import JsonFormatter
from ztunnel.testing import EchoServer, SocksRefused, free_port, random_loopback_net, socks5_connect

pytestmark = pytest.mark.integration

WEB = "spiffe://cluster.local/ns/frontend/sa/web"
ECHO = "spiffe://cluster.local/ns/shop/sa/echo"
HOSTNAME = "echo.shop.svc.cluster.local"
HELLO = b"hello from echo-b\n"  # the server speaks first, so response bytes != request bytes

T = TypeVar("T")


def mesh_config(net: str) -> dict[str, Any]:
    def wl(
        name: str, ns: str, sa: str, ip: str, node: str, canonical: str, rev: str, **extra: Any
    ) -> dict[str, Any]:
        return {
            "uid": f"Kubernetes//Pod/{ns}/{name}",
            "name": name,
            "namespace": ns,
            "serviceAccount": sa,
            "workloadIps": [ip],
            "protocol": "HBONE",
            "node": node,
            "canonicalName": canonical,
            "canonicalRevision": rev,
            **extra,
        }

    return {
        "workloads": [
            wl("client-a", "frontend", "web", f"{net}.1", "node-a", "client", "v1"),
            wl(
                "echo-b",
                "shop",
                "echo",
                f"{net}.11",
                "node-b",
                "echo",
                "v2",
                services={f"shop/{HOSTNAME}": {80: 8080}},
            ),
        ],
        "services": [
            {
                "name": "echo",
                "namespace": "shop",
                "hostname": HOSTNAME,
                "vips": [f"{net}.100"],
                "ports": {80: 8080},
            }
        ],
    }


def agent_settings(node: str, cfg: Path, ca_dir: Path, hbone_port: int, **kw: Any) -> Settings:
    values: dict[str, Any] = dict(
        node_name=node,
        local_xds_path=str(cfg),
        ca_dir=str(ca_dir),
        hbone_port=hbone_port,
        outbound_port=free_port(),
        inbound_plaintext_port=free_port(),
        socks5_port=free_port(),
        admin_port=free_port(),
        stats_port=free_port(),
        readiness_port=free_port(),
        drain_timeout=3.0,
        reload_interval=60.0,
    )
    values.update(kw)
    return Settings(**values)


async def http(addr: tuple[str, int] | None, path: str, method: str = "GET") -> tuple[int, str]:
    assert addr is not None
    r, w = await asyncio.wait_for(asyncio.open_connection(*addr), 5)
    w.write(
        f"{method} {path} HTTP/1.1\r\nHost: {addr[0]}:{addr[1]}\r\n"
        "Content-Length: 0\r\n\r\n".encode()
    )
    data = await asyncio.wait_for(r.read(), 5)
    w.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body.decode()


async def eventually(probe: Callable[[], Awaitable[T]], what: str, within: float = 10.0) -> T:
    """Poll `probe` until it returns something truthy (never sleep to synchronise)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        value = await probe()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def scrape(agent: Agent) -> str:
    status, body = await http(agent.http.address("stats"), "/metrics")
    assert status == 200
    return body


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0 if none)."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def series(text: str, name: str, **labels: str) -> list[dict[str, str]]:
    return [
        dict(s.labels)
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]


@dataclass
class Mesh:
    net: str
    a: Agent
    b: Agent
    echo: EchoServer

    async def connect(
        self, dest: str, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        assert self.a.settings.socks5_port
        return await socks5_connect(
            ("127.0.0.1", self.a.settings.socks5_port), dest, port, source_ip=f"{self.net}.1"
        )

    async def exchange(self, payload: bytes) -> bytes:
        r, w = await self.connect(f"{self.net}.100", 80)
        w.write(payload)
        w.write_eof()
        data = await asyncio.wait_for(r.read(), 10)
        w.close()
        return data


async def ready(agent: Agent) -> bool:
    return (await http(agent.http.address("readiness"), "/healthz/ready"))[0] == 200


@contextlib.asynccontextmanager
async def two_agents(tmp_path: Path) -> AsyncIterator[Mesh]:
    net = random_loopback_net()
    ca_dir = tmp_path / "ca"
    CertificateAuthority.create("cluster.local").save(ca_dir)
    cfg = tmp_path / "mesh.yaml"
    cfg.write_text(yaml.safe_dump(mesh_config(net)))
    hbone = free_port()
    agents: list[Agent] = []
    echo = await EchoServer(f"{net}.11", 8080, hello=HELLO).start()
    try:
        for node in ("node-a", "node-b"):
            agent = Agent(agent_settings(node, cfg, ca_dir, hbone))
            agents.append(agent)
            await agent.start()
        for agent in agents:
            await eventually(functools.partial(ready, agent), "readiness")
        yield Mesh(net, agents[0], agents[1], echo)
    finally:
        await echo.close()
        for agent in agents:
            await agent.drain(0.5)


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 60))


def test_both_reporters_count_connections_and_exact_bytes(tmp_path: Path) -> None:
    payload = bytes(range(256)) * 400  # 102400 bytes: several relay chunks on the way

    async def scenario() -> None:
        async with two_agents(tmp_path) as mesh:
            assert await mesh.exchange(payload) == HELLO + payload

            async def closed(agent: Agent, reporter: str) -> str:
                text = await scrape(agent)
                n = metric(text, "istio_tcp_connections_closed_total", reporter=reporter)
                return text if n == 1 else ""

            source = await eventually(lambda: closed(mesh.a, "source"), "source close")
            dest = await eventually(lambda: closed(mesh.b, "destination"), "destination close")
            common = {
                "source_workload": "client-a",
                "source_canonical_service": "client",
                "source_canonical_revision": "v1",
                "source_workload_namespace": "frontend",
                "source_principal": WEB,
                "source_app": "client",
                "source_version": "v1",
                "source_cluster": "Kubernetes",
                "destination_workload": "echo-b",
                "destination_canonical_service": "echo",
                "destination_canonical_revision": "v2",
                "destination_workload_namespace": "shop",
                "destination_principal": ECHO,
                "destination_app": "echo",
                "destination_version": "v2",
                "destination_cluster": "Kubernetes",
                "request_protocol": "tcp",
                "response_flags": "-",
                "connection_security_policy": "mutual_tls",
            }
            for text, reporter in ((source, "source"), (dest, "destination")):
                labels = {**common, "reporter": reporter}
                (opened,) = series(text, "istio_tcp_connections_opened_total", **labels)
                assert set(opened) == {
                    *common,
                    "reporter",
                    "destination_service",
                    "destination_service_namespace",
                    "destination_service_name",
                }
                assert metric(text, "istio_tcp_connections_opened_total", **labels) == 1
                assert metric(text, "istio_tcp_connections_closed_total", **labels) == 1
                # received = from the client (the request), sent = back to it (the response)
                assert metric(text, "istio_tcp_received_bytes_total", **labels) == len(payload)
                assert metric(text, "istio_tcp_sent_bytes_total", **labels) == (
                    len(HELLO) + len(payload)
                )
                # Each agent reports only its own side.
                other = "destination" if reporter == "source" else "source"
                assert metric(text, "istio_tcp_connections_opened_total", reporter=other) == 0
            # The sending side knows the service it addressed.
            assert (
                metric(
                    source,
                    "istio_tcp_connections_opened_total",
                    reporter="source",
                    destination_service=HOSTNAME,
                    destination_service_name="echo",
                    destination_service_namespace="shop",
                )
                == 1
            )
            assert 'istio_build{component="ztunnel",tag="0.1.0"} 1.0' in source
            assert "process_cpu_seconds_total" in source or "python_info" in source
            status, same = await http(mesh.a.http.address("stats"), "/stats/prometheus")
            assert status == 200 and "istio_tcp_connections_opened_total" in same

    run(scenario)


def test_byte_counters_move_while_the_connection_is_open(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with two_agents(tmp_path) as mesh:
            r, w = await mesh.connect(f"{mesh.net}.11", 8080)
            assert await r.readexactly(len(HELLO)) == HELLO
            sent = 0
            for size in (1000, 70_000):
                w.write(b"x" * size)
                sent += size
                await r.readexactly(size)

                async def counted(agent: Agent, reporter: str, total: int = sent) -> bool:
                    text = await scrape(agent)
                    return (
                        metric(text, "istio_tcp_received_bytes_total", reporter=reporter) == total
                        and metric(text, "istio_tcp_sent_bytes_total", reporter=reporter)
                        == total + len(HELLO)
                        and metric(text, "istio_tcp_connections_closed_total") == 0
                    )

                await eventually(lambda: counted(mesh.a, "source"), f"source bytes {sent}")
                await eventually(lambda: counted(mesh.b, "destination"), f"dest bytes {sent}")
            # The admin API lists the live connection with its bytes.
            status, body = await http(mesh.a.http.address("admin"), "/config_dump")
            assert status == 200
            (live,) = json.loads(body)["connections"]["live"]
            assert (live["direction"], live["src_identity"], live["dst_identity"]) == (
                "outbound",
                WEB,
                ECHO,
            )
            assert (live["bytes_sent"], live["bytes_recv"]) == (sent, sent + len(HELLO))
            w.close()

    run(scenario)


def test_failed_connection_is_counted_with_a_response_flag(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with two_agents(tmp_path) as mesh:
            with pytest.raises(SocksRefused):
                await mesh.connect(f"{mesh.net}.11", 9)  # nothing listens there

            async def failed(agent: Agent, reporter: str) -> list[dict[str, str]]:
                return series(
                    await scrape(agent), "istio_tcp_connections_closed_total", reporter=reporter
                )

            for agent, reporter in ((mesh.a, "source"), (mesh.b, "destination")):
                (labels,) = await eventually(functools.partial(failed, agent, reporter), reporter)
                assert labels["response_flags"] not in ("-", "")
                assert labels["response_flags"] == "CONNECT"
                assert labels["source_workload"] == "client-a"

    run(scenario)


def test_json_access_log_lines_carry_identities_and_bytes(tmp_path: Path) -> None:
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(JsonFormatter())
    access = logging.getLogger("ztunnel.access")
    old_level = access.level
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    payload = b"ping" * 100

    def complete() -> dict[str, dict[str, Any]]:
        lines = [json.loads(line) for line in buf.getvalue().splitlines()]
        return {e["direction"]: e for e in lines if e["message"] == "connection complete"}

    async def scenario() -> None:
        async with two_agents(tmp_path) as mesh:
            assert await mesh.exchange(payload) == HELLO + payload

            async def both_logged() -> bool:
                return len(complete()) == 2

            await eventually(both_logged, "two access-log lines")
            out, inb = complete()["outbound"], complete()["inbound"]
            for entry in (out, inb):
                assert entry["scope"] == "ztunnel.access" and entry["level"] == "info"
                assert entry["src.identity"] == WEB
                assert entry["dst.identity"] == ECHO
                assert entry["src.workload"] == "client-a"
                assert entry["src.namespace"] == "frontend"
                assert entry["dst.workload"] == "echo-b" and entry["dst.namespace"] == "shop"
                assert entry["duration"].endswith("ms")
                assert "error" not in entry
            assert out["dst.service"] == HOSTNAME
            # Outbound: dialed the peer agent's HBONE port, CONNECT to the service address.
            assert out["dst.addr"] == f"{mesh.net}.11:{mesh.b.settings.hbone_port}"
            assert out["dst.hbone_addr"] == f"{mesh.net}.100:80"
            assert inb["dst.addr"] == inb["dst.hbone_addr"] == f"{mesh.net}.11:8080"
            # Each agent's bytes as it sent/received them over the mesh hop.
            assert (out["bytes_sent"], out["bytes_recv"]) == (
                len(payload),
                len(HELLO) + len(payload),
            )
            assert (inb["bytes_sent"], inb["bytes_recv"]) == (
                len(HELLO) + len(payload),
                len(payload),
            )

    try:
        run(scenario)
    finally:
        access.removeHandler(handler)
        access.setLevel(old_level)


def test_readiness_goes_500_first_then_listeners_close_and_drain_ends(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with two_agents(tmp_path) as mesh:
            readiness = mesh.b.http.address("readiness")
            assert await http(readiness, "/healthz/ready") == (200, "ready\n")
            drain = asyncio.ensure_future(mesh.b.drain(2))
            status, body = await http(readiness, "/healthz/ready")
            assert status == 500 and "draining" in body
            with pytest.raises(OSError):  # listeners no longer accept
                await asyncio.open_connection(f"{mesh.net}.11", mesh.b.settings.hbone_port)
            await asyncio.wait_for(drain, 10)
            with pytest.raises(OSError):
                await http(readiness, "/healthz/ready")
            assert await ready(mesh.a)

    run(scenario)


def test_open_connection_keeps_working_during_the_drain_grace_period(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with two_agents(tmp_path) as mesh:
            r, w = await mesh.connect(f"{mesh.net}.11", 8080)
            assert await r.readexactly(len(HELLO)) == HELLO
            drain = asyncio.ensure_future(mesh.b.drain(10))
            assert (await http(mesh.b.http.address("readiness"), "/healthz/ready"))[0] == 500
            w.write(b"still here")
            assert await asyncio.wait_for(r.readexactly(10), 5) == b"still here"
            assert not drain.done()
            w.write_eof()
            assert await asyncio.wait_for(r.read(), 5) == b""
            w.close()
            await asyncio.wait_for(drain, 10)

    run(scenario)


def test_readiness_lists_what_is_pending(tmp_path: Path) -> None:
    async def scenario() -> None:
        ca_dir = tmp_path / "ca"
        CertificateAuthority.create("cluster.local").save(ca_dir)
        cfg = tmp_path / "mesh.yaml"
        # 192.0.2.10 (TEST-NET-1) is not an address of this host: its listeners cannot bind.
        cfg.write_text(
            yaml.safe_dump(
                {
                    "workloads": [
                        {
                            "uid": "u",
                            "name": "w",
                            "namespace": "ns",
                            "workloadIps": ["192.0.2.10"],
                            "node": "node-c",
                        }
                    ]
                }
            )
        )
        agent = Agent(agent_settings("node-c", cfg, ca_dir, free_port(), socks5_port=0))
        await agent.start()
        try:

            async def pending() -> str:
                status, body = await http(agent.http.address("readiness"), "/healthz/ready")
                assert status == 500
                return body if body.count("listener:") == 3 else ""

            body = await eventually(pending, "three failed listeners")
            assert "listener: hbone on 192.0.2.10 not up" in body.splitlines()
            assert "ready" not in body.splitlines()
        finally:
            await agent.drain(0.5)

    run(scenario)
