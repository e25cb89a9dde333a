"""The admin module without sockets: HTTP request parsing, the generic JSON rendering,
readiness conditions and the loopback-only rule for the admin address."""

from __future__ import annotations

import asyncio
import enum
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field

import pytest

from ztunnel.admin import (
    HttpError,
    HttpServer,
    Request,
    Route,
    check_admin_address,
    jsonable,
    parse_header_line,
    parse_request_line,
    parse_target,
    read_request,
    readiness_pending,
    text,
)
from ztunnel.ca import CertificateAuthority
from ztunnel.certs import CertificateManager, LocalCaSource
from ztunnel.config import Settings
from ztunnel.errors import ConfigError
from ztunnel.identity import SpiffeId
from ztunnel.model import Workload
from ztunnel.proxy.records import ConnectionTracker
from ztunnel.state import MeshState, WorkloadStore

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"GET /metrics HTTP/1.1\r\n", ("GET", "/metrics", (1, 1))),
        (b"POST /logging?level=debug HTTP/1.0\n", ("POST", "/logging?level=debug", (1, 0))),
    ],
)
def test_request_line(line: bytes, expected: tuple[str, str, tuple[int, int]]) -> None:
    assert parse_request_line(line) == expected


@pytest.mark.parametrize(
    ("line", "status"),
    [
        (b"GET /\r\n", 400),
        (b"GET  / HTTP/1.1\r\n", 400),
        (b"G(T / HTTP/1.1\r\n", 400),
        (b"GET / HTTP/2.0\r\n", 505),
        (b"GET / FTP/1.1\r\n", 400),
        (b"GET /\xff HTTP/1.1\r\n", 400),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n", 400),  # TLS to a plain port
    ],
)
def test_bad_request_lines(line: bytes, status: int) -> None:
    with pytest.raises(HttpError) as e:
        parse_request_line(line)
    assert e.value.status == status


def test_header_lines() -> None:
    assert parse_header_line(b"Host: 127.0.0.1:15000\r\n") == ("host", "127.0.0.1:15000")
    assert parse_header_line(b"X-A:\t v \r\n") == ("x-a", "v")
    for bad in (b"Host : x\r\n", b" folded\r\n", b"no colon\r\n", b": empty name\r\n"):
        with pytest.raises(HttpError) as e:
            parse_header_line(bad)
        assert e.value.status == 400


def test_targets() -> None:
    assert parse_target("/logging?level=debug") == ("/logging", {"level": ["debug"]})
    assert parse_target("/config%5Fdump") == ("/config_dump", {})
    assert parse_target("http://127.0.0.1:15000/ready?x") == ("/ready", {"x": [""]})
    with pytest.raises(HttpError):
        parse_target("*")
    with pytest.raises(HttpError):
        parse_target("/?" + "&".join(f"a{i}=1" for i in range(100)))


def _read(data: bytes) -> Request:
    async def go() -> Request:
        reader = asyncio.StreamReader(limit=8 * 1024)
        reader.feed_data(data)
        reader.feed_eof()
        return await read_request(reader)

    return asyncio.run(go())


def test_read_request_with_body_and_repeated_headers() -> None:
    req = _read(b"\r\nPOST /x HTTP/1.1\r\nHost: h\r\nA: 1\r\nA: 2\r\nContent-Length: 3\r\n\r\nabc")
    assert (req.method, req.path, req.body) == ("POST", "/x", b"abc")
    assert req.headers["a"] == "1, 2"


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", 400),  # no Host
        (b"GET / HTTP/1.1\r\nHost: h\r\nX: " + b"a" * 9000 + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: h\r\n" + b"X: y\r\n" * 101 + b"\r\n", 431),
        (
            b"GET / HTTP/1.1\r\nHost: h\r\n"
            + b"X: "
            + b"y" * 8000
            + b"\r\n" * 1
            + b"Z: "
            + b"y" * 8000
            + b"\r\n"
            + b"W: "
            + b"y" * 8000
            + b"\r\n"
            + b"V: "
            + b"y" * 8000
            + b"\r\n"
            + b"U: "
            + b"y" * 8000
            + b"\r\n\r\n",
            431,
        ),
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 999999\r\n\r\n", 413),
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: -1\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
    ],
)
def test_read_request_limits(data: bytes, status: int) -> None:
    with pytest.raises(HttpError) as e:
        _read(data)
    assert e.value.status == status


def test_dispatch_answers_404_405_and_500_without_raising() -> None:
    def boom(_req: Request) -> object:
        raise RuntimeError("bug")

    server = HttpServer(
        "t",
        {
            "/ok": Route(lambda r: text(200, "ok")),
            "/boom": Route(boom),  # type: ignore[arg-type]
            "/post": Route(lambda r: text(200, "posted"), frozenset({"POST"})),
        },
    )

    def req(method: str, path: str) -> Request:
        return Request(method, path, {}, {"host": "h"})

    assert server.dispatch(req("GET", "/ok")).status == 200
    assert server.dispatch(req("HEAD", "/ok")).status == 200
    assert server.dispatch(req("GET", "/nope")).status == 404
    resp = server.dispatch(req("GET", "/post"))
    assert resp.status == 405 and ("Allow", "POST") in resp.headers
    assert server.dispatch(req("GET", "/boom")).status == 500
    assert server.dispatch(req("HEAD", "/ok")).encode(head_only=True).endswith(b"\r\n\r\n")


class Color(enum.Enum):
    RED = "red"


@dataclass(frozen=True)
class Inner:
    ip: ipaddress.IPv4Address
    who: SpiffeId


@dataclass(frozen=True)
class Outer:
    name: str
    color: Color
    inner: tuple[Inner, ...]
    ports: Mapping[int, int]
    tags: frozenset[str]
    index: dict[str, str] = field(default_factory=dict, repr=False)


def test_jsonable_renders_dataclasses_generically() -> None:
    value = Outer(
        "p",
        Color.RED,
        (Inner(ipaddress.IPv4Address("10.0.0.1"), SpiffeId("td", "ns", "sa")),),
        {80: 8080},
        frozenset({"b", "a"}),
        {"hidden": "x"},
    )
    assert jsonable(value) == {
        "name": "p",
        "color": "red",
        "inner": [{"ip": "10.0.0.1", "who": "spiffe://td/ns/ns/sa/sa"}],
        "ports": {"80": 8080},
        "tags": ["a", "b"],
    }
    assert jsonable(object.__new__(object)).startswith("<object")


def test_admin_address_must_be_loopback() -> None:
    check_admin_address(Settings(admin_address="127.0.0.1"))
    check_admin_address(Settings(admin_address="::1"))
    check_admin_address(Settings(admin_address="0.0.0.0", admin_port=0))  # disabled
    for bad in ("0.0.0.0", "10.1.2.3", "::"):
        with pytest.raises(ConfigError) as e:
            check_admin_address(Settings(admin_address=bad))
        assert "admin_address" in str(e.value) and "loopback" in str(e.value)


@dataclass
class FakeListener:
    kind: str
    address: tuple[str, int]


@dataclass
class FakeAgent:
    settings: Settings
    store: WorkloadStore
    certs: CertificateManager
    tracker: ConnectionTracker = field(default_factory=ConnectionTracker)
    listeners: dict[tuple[str, str], FakeListener] = field(default_factory=dict)
    draining: bool = False
    wanted: set[tuple[str, str]] = field(default_factory=set)
    istiod: None = None

    def wanted_listeners(self) -> set[tuple[str, str]]:
        return self.wanted

    def request_drain(self) -> None:
        self.draining = True


def test_readiness_waits_for_state_certificates_and_listeners() -> None:
    ca = CertificateAuthority.create("cluster.local")
    wl = Workload("uid", "app", "ns", (ipaddress.ip_address("10.0.0.1"),), "sa", node="n1")
    agent = FakeAgent(
        Settings(node_name="n1"), WorkloadStore(), CertificateManager(LocalCaSource(ca))
    )
    assert readiness_pending(agent) == ["mesh state: not loaded yet"]
    agent.store.replace(MeshState.build([wl]))
    agent.wanted = {("hbone", "10.0.0.1")}
    assert readiness_pending(agent) == [
        "certificate: spiffe://cluster.local/ns/ns/sa/sa not issued yet",
        "listener: hbone on 10.0.0.1 not up",
    ]

    async def issue() -> None:
        await agent.certs.get(wl.identity)
        await agent.certs.close()

    asyncio.run(issue())
    agent.listeners[("hbone", "10.0.0.1")] = FakeListener("hbone", ("10.0.0.1", 15008))
    assert readiness_pending(agent) == []
    agent.request_drain()
    assert readiness_pending(agent) == ["draining: the agent is shutting down"]
