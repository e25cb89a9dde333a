"""A loopback mesh with a waypoint: two node agents (in process), the waypoint (in process),
HTTP backends on workload addresses, and curl as the client through agent A's SOCKS5 port.

127.X.Y: .1 client (frontend/web, node-a); .2/.3 reviews v1/v2 (shop, node-a/node-b);
.4 reviews v3 (node-b); .50 the waypoint (shop/waypoint). Service reviews.shop VIP .100 port
80 -> 8080, bound to the waypoint; service plain.shop VIP .101 (no waypoint)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from waypoint.app import Waypoint
from waypoint.config import WaypointSettings
from ztunnel.app import Agent
from ztunnel.ca import CertificateAuthority
from ztunnel.config import Settings
from ztunnel.testing import EchoServer, async_wait_for, free_ports, random_loopback_net


class Backend:
    """An HTTP/1.1 app on a workload address: answers with its name and version, counts
    requests; `fail` makes it answer 500 (`flaky`: every other request)."""

    def __init__(self, name: str, version: str) -> None:
        self.name, self.version = name, version
        self.requests: list[dict[str, str]] = []
        self.fail = False
        self.flaky = False
        self.delay = 0.0
        self.server: asyncio.AbstractServer | None = None

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await r.readline()
                if not line:
                    return
                method, target, _ = line.decode().split(" ", 2)
                headers: dict[str, str] = {}
                while (h := await r.readline()) not in (b"\r\n", b""):
                    k, _, v = h.decode().partition(":")
                    headers[k.strip().lower()] = v.strip()
                n = int(headers.get("content-length", "0") or 0)
                body = await r.readexactly(n) if n else b""
                if headers.get("transfer-encoding") == "chunked":
                    while True:
                        size = int((await r.readline()).strip(), 16)
                        if size == 0:
                            await r.readline()
                            break
                        body += await r.readexactly(size)
                        await r.readline()
                self.requests.append(
                    {"method": method, "path": target, **headers, "body": body.decode()}
                )
                if self.delay:
                    await asyncio.sleep(self.delay)
                status = 200
                if self.fail or (self.flaky and len(self.requests) % 2 == 1):
                    status = 500
                out = json.dumps(
                    {
                        "pod": self.name,
                        "version": self.version,
                        "path": target,
                        "host": headers.get("host", ""),
                        "headers": headers,
                    }
                ).encode()
                w.write(
                    b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\n\r\n%s" % (status, len(out), out)
                )
                await w.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            w.close()


@dataclass
class WaypointMesh:
    tmp: Path
    net: str = field(default_factory=random_loopback_net)
    p: list[int] = field(default_factory=lambda: free_ports(8))
    backends: dict[str, Backend] = field(default_factory=dict)
    agents: list[Agent] = field(default_factory=list)
    echo: list[EchoServer] = field(default_factory=list)
    waypoint: Waypoint | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def ip(self, n: int) -> str:
        return f"{self.net}.{n}"

    @property
    def vip(self) -> str:
        return self.ip(100)

    @property
    def hbone(self) -> int:
        return self.p[0]

    @property
    def socks(self) -> int:
        return self.p[3]

    def mesh(self) -> dict[str, Any]:
        svc = {"shop/reviews.shop.svc.cluster.local": {80: 8080}}

        def wl(
            name: str,
            ns: str,
            sa: str,
            n: int,
            node: str,
            labels: dict[str, str],
            services: Any = None,
        ) -> dict[str, Any]:
            return {
                "name": name,
                "namespace": ns,
                "serviceAccount": sa,
                "workloadIps": [self.ip(n)],
                "node": node,
                "canonicalName": labels.get("app", name),
                "canonicalRevision": labels.get("version", "v1"),
                "labels": labels,
                "services": services or {},
            }

        return {
            "workloads": [
                wl("client", "frontend", "web", 1, "node-a", {"app": "client"}),
                wl(
                    "reviews-v1",
                    "shop",
                    "reviews",
                    2,
                    "node-a",
                    {"app": "reviews", "version": "v1"},
                    svc,
                ),
                wl(
                    "reviews-v2",
                    "shop",
                    "reviews",
                    3,
                    "node-b",
                    {"app": "reviews", "version": "v2"},
                    svc,
                ),
                wl(
                    "reviews-v3",
                    "shop",
                    "reviews",
                    4,
                    "node-b",
                    {"app": "reviews", "version": "v3"},
                    svc,
                ),
                wl(
                    "waypoint",
                    "shop",
                    "waypoint",
                    50,
                    "node-wp",
                    {"gateway.networking.k8s.io/gateway-name": "waypoint"},
                    {"shop/waypoint.shop.svc.cluster.local": {15008: 15008}},
                ),
            ],
            "services": [
                {
                    "name": "reviews",
                    "namespace": "shop",
                    "hostname": "reviews.shop.svc.cluster.local",
                    "vips": [self.vip],
                    "ports": [
                        {"servicePort": 80, "targetPort": 8080, "appProtocol": "http"},
                        {"servicePort": 9000, "targetPort": 9000},
                    ],
                    "waypoint": {"destination": self.ip(50), "hboneMtlsPort": self.p[7]},
                },
                {
                    "name": "waypoint",
                    "namespace": "shop",
                    "hostname": "waypoint.shop.svc.cluster.local",
                    "vips": [self.ip(99)],
                    "ports": {15008: 15008},
                },
            ],
        }

    def write_config(self, text: str) -> None:
        (self.tmp / "config.yaml").write_text(text)

    async def start(self, config: str = "") -> None:
        CertificateAuthority.create("cluster.local").save(self.tmp / "ca")
        (self.tmp / "mesh.yaml").write_text(yaml.safe_dump(self.mesh()))
        self.write_config(config)
        for name, n, version in (
            ("reviews-v1", 2, "v1"),
            ("reviews-v2", 3, "v2"),
            ("reviews-v3", 4, "v3"),
        ):
            b = Backend(name, version)
            b.server = await asyncio.start_server(b.handle, self.ip(n), 8080)
            self.backends[name] = b
            self.echo.append(await EchoServer(self.ip(n), 9000, hello=f"{name}\n".encode()).start())
        for node, base in (("node-a", 1), ("node-b", 4)):
            a = Agent(
                Settings(
                    node_name=node,
                    local_xds_path=str(self.tmp / "mesh.yaml"),
                    ca_dir=str(self.tmp / "ca"),
                    hbone_port=self.hbone,
                    outbound_port=self.p[base],
                    inbound_plaintext_port=self.p[base + 1],
                    socks5_port=self.p[base + 2] if node == "node-a" else 0,
                    admin_port=0,
                    stats_port=0,
                    readiness_port=0,
                    connect_timeout=5.0,
                    reload_interval=0.05,
                )
            )
            await a.start()
            self.agents.append(a)
        for a in self.agents:
            await async_wait_for(lambda a=a: a.wanted_listeners() <= set(a.listeners), 10)  # type: ignore[misc]
        self.waypoint = Waypoint(
            WaypointSettings(
                name="waypoint",
                namespace="shop",
                addresses=(self.ip(50),),
                local_xds_path=str(self.tmp / "mesh.yaml"),
                config_paths=(str(self.tmp / "config.yaml"),),
                ca_dir=str(self.tmp / "ca"),
                hbone_address=self.ip(50),
                hbone_port=self.p[7],
                peer_hbone_port=self.hbone,
                stats_port=0,
                reload_interval=0.05,
                header_timeout=2.0,
                **self.extra,
            )
        )
        await self.waypoint.start()

    async def close(self) -> None:
        if self.waypoint is not None:
            with contextlib.suppress(Exception):
                await self.waypoint.drain(1.0)
        for a in self.agents:
            with contextlib.suppress(Exception):
                await a.drain(1.0)
        for b in self.backends.values():
            if b.server is not None:
                b.server.close()
        for e in self.echo:
            await e.close()

    async def reload(self, config: str) -> None:
        assert self.waypoint is not None
        before = self.waypoint.view
        self.write_config(config)
        await async_wait_for(
            lambda: self.waypoint is not None and self.waypoint.view is not before, 10
        )

    async def curl(
        self, *args: str, path: str = "/", host: str = ""
    ) -> tuple[int, dict[str, str], str]:
        """curl through agent A's SOCKS5 port from the client's address."""
        url = f"http://{host or self.vip}{path}"
        argv = [
            "curl",
            "-sS",
            "-i",
            "--max-time",
            "10",
            "--socks5",
            f"127.0.0.1:{self.socks}",
            "--interface",
            self.ip(1),
            *args,
            url,
        ]
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await proc.communicate()
        text = out.decode(errors="replace")
        head, _, body = text.partition("\r\n\r\n")
        lines = head.split("\r\n")
        if not lines or not lines[0].startswith("HTTP/"):
            return 0, {}, err.decode()
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        return status, headers, body


@pytest.fixture
def wmesh(
    loop: asyncio.AbstractEventLoop, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[WaypointMesh]:
    """The mesh; `@pytest.mark.parametrize("wmesh", [{...settings}], indirect=True)` passes
    extra waypoint settings."""
    m = WaypointMesh(tmp_path, extra=dict(getattr(request, "param", {})))
    try:
        loop.run_until_complete(asyncio.wait_for(m.start(), 30))
        yield m
    finally:
        loop.run_until_complete(asyncio.wait_for(m.close(), 30))
