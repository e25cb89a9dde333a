"""The agent's HTTP endpoints (shared/WIRE.md, Ports): the admin API on 15000 (loopback only:
`/config_dump`, `/logging`, `/quitquitquit`), Prometheus metrics on 15020 (`/metrics`,
`/stats/prometheus`) and readiness on 15021 (`/healthz/ready`).

They share one deliberately small HTTP/1.1 server: one request per connection
(`Connection: close`), a bounded request head and body, a deadline for reading the request
and for writing the answer, and a cap on concurrent connections. Bad requests get a 4xx and end
only their own connection. Parsing (`parse_request_line`, `parse_header_line`,
`parse_target`) does no I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import enum
import http
import ipaddress
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable
from urllib.parse import parse_qs, unquote, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from ztunnel import logs
from ztunnel.capture_report import CaptureSnapshot
from ztunnel.capture_report import readiness as capture_readiness
from ztunnel.certs import CertificateManager
from ztunnel.config import Settings
from ztunnel.errors import ConfigError, ZtunnelError
from ztunnel.identity import SpiffeId
from ztunnel.model import TunnelProtocol, Workload
from ztunnel.proxy.records import ConnectionRecord, ConnectionTracker
from ztunnel.state import WorkloadStore
from ztunnel.telemetry import agent_version

log = logging.getLogger(__name__)

MAX_LINE = 8 * 1024  # request line or one header line
MAX_HEAD = 32 * 1024  # request line and all headers
MAX_HEADERS = 100
MAX_BODY = 64 * 1024  # no endpoint takes a body; read (bounded) and ignore it
MAX_QUERY_FIELDS = 32
REQUEST_TIMEOUT = 10.0  # to receive the whole request
WRITE_TIMEOUT = 10.0  # to hand the whole answer to a slow reader
MAX_CONNECTIONS = 64  # per server; more get 503 at once

TEXT = "text/plain; charset=utf-8"
JSON = "application/json"

_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # RFC 9110 section 5.6.2
_VERSION = re.compile(r"^HTTP/(\d)\.(\d)$")
LOG_LEVELS = ("debug", "info", "warning", "warn", "error")


class HttpError(ZtunnelError):
    """A request that cannot be served; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


class _ClientGone(Exception):
    """The client closed the connection before a whole request arrived: nothing to answer."""


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: Mapping[str, list[str]]
    headers: Mapping[str, str]  # lower-case names; repeated fields joined with ", "
    body: bytes = b""

    def arg(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else None


@dataclass(slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = TEXT
    headers: tuple[tuple[str, str], ...] = ()
    # Runs once the answer has been sent and the connection closed (e.g. start the drain).
    after: Callable[[], None] | None = None

    def encode(self, head_only: bool = False) -> bytes:
        phrase = _phrase(self.status)
        lines = [
            f"HTTP/1.1 {self.status} {phrase}",
            f"Content-Type: {self.content_type}",
            f"Content-Length: {len(self.body)}",
            "Connection: close",
            "Cache-Control: no-cache",
        ]
        lines += [f"{k}: {v}" for k, v in self.headers]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return head if head_only else head + self.body


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def text(status: int, body: str) -> Response:
    if body and not body.endswith("\n"):
        body += "\n"
    return Response(status, body.encode())


def json_response(value: Any, status: int = 200) -> Response:
    return Response(status, (json.dumps(value, indent=2) + "\n").encode(), JSON)


Handler = Callable[[Request], Response]


@dataclass(frozen=True, slots=True)
class Route:
    handler: Handler
    methods: frozenset[str] = frozenset({"GET"})


# ---- parsing (no I/O) ----


def parse_request_line(line: bytes) -> tuple[str, str, tuple[int, int]]:
    """`METHOD SP target SP HTTP/x.y` (RFC 9112 section 3) -> method, target, version."""
    try:
        decoded = line.rstrip(b"\r\n").decode("ascii")
    except UnicodeDecodeError:
        raise HttpError(400, "request line is not ASCII") from None
    parts = decoded.split(" ")
    if len(parts) != 3:
        raise HttpError(400, "malformed request line")
    method, target, version = parts
    if not _TOKEN.match(method):
        raise HttpError(400, "malformed method")
    m = _VERSION.match(version)
    if m is None:
        raise HttpError(400, "malformed HTTP version")
    major, minor = int(m.group(1)), int(m.group(2))
    if major != 1:
        raise HttpError(505, f"HTTP/{major}.{minor} is not supported")
    if not target:
        raise HttpError(400, "empty request target")
    return method, target, (major, minor)


def parse_header_line(line: bytes) -> tuple[str, str]:
    """`name: value` (RFC 9112 section 5) -> lower-case name, value without surrounding OWS."""
    raw = line.rstrip(b"\r\n")
    if raw[:1] in (b" ", b"\t"):
        raise HttpError(400, "obsolete header line folding")
    name_b, sep, value_b = raw.partition(b":")
    name = name_b.decode("latin-1")
    if not sep or not _TOKEN.match(name):
        # Also rejects whitespace between the name and the colon (RFC 9112 section 5.1).
        raise HttpError(400, "malformed header line")
    value = value_b.decode("latin-1").strip(" \t")
    if any(c in value for c in "\r\n\x00"):
        raise HttpError(400, "invalid character in header value")
    return name.lower(), value


def parse_target(target: str) -> tuple[str, dict[str, list[str]]]:
    """Origin-form (`/path?query`) or absolute-form target -> decoded path and query."""
    if not (target.startswith("/") or target.startswith(("http://", "https://"))):
        raise HttpError(400, "unsupported request target")
    try:
        parts = urlsplit(target)
        query = parse_qs(parts.query, keep_blank_values=True, max_num_fields=MAX_QUERY_FIELDS)
    except ValueError as e:
        raise HttpError(400, f"bad request target: {e}") from None
    return unquote(parts.path) or "/", query


# ---- I/O ----


async def _read_line(reader: asyncio.StreamReader) -> bytes:
    try:
        line = await reader.readline()
    except ValueError:  # the stream's limit (MAX_LINE) was hit before a newline
        raise HttpError(431, "request line or header line too long") from None
    if not line.endswith(b"\n"):
        raise _ClientGone
    return line


async def read_request(reader: asyncio.StreamReader) -> Request:
    """Read one request: head within MAX_HEAD/MAX_HEADERS, body (if any) within MAX_BODY."""
    line = await _read_line(reader)
    for _ in range(2):  # RFC 9112 section 2.2: ignore empty lines before the request line
        if line.strip():
            break
        line = await _read_line(reader)
    method, target, version = parse_request_line(line)
    path, query = parse_target(target)
    headers: dict[str, str] = {}
    total = len(line)
    count = 0
    while True:
        line = await _read_line(reader)
        total += len(line)
        if total > MAX_HEAD:
            raise HttpError(431, "request head too large")
        if line in (b"\r\n", b"\n"):
            break
        count += 1
        if count > MAX_HEADERS:
            raise HttpError(431, "too many header fields")
        name, value = parse_header_line(line)
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    if version >= (1, 1) and "host" not in headers:
        raise HttpError(400, "HTTP/1.1 request without a Host header")  # RFC 9112 sec. 3.2
    if "transfer-encoding" in headers:
        raise HttpError(501, "request bodies with Transfer-Encoding are not supported")
    body = b""
    if "content-length" in headers:
        values = {v.strip() for v in headers["content-length"].split(",")}
        if len(values) != 1 or not (n := values.pop()).isdigit():
            raise HttpError(400, "malformed Content-Length")
        if int(n) > MAX_BODY:
            raise HttpError(413, f"request body larger than {MAX_BODY} bytes")
        try:
            body = await reader.readexactly(int(n))
        except asyncio.IncompleteReadError:
            raise _ClientGone from None
    return Request(method, path, query, headers, body)


class HttpServer:
    """Serves `routes` (path -> Route) on one address; `close()` ends it and its connections."""

    def __init__(
        self,
        name: str,
        routes: Mapping[str, Route],
        request_timeout: float = REQUEST_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.name = name
        self.routes = dict(routes)
        self.request_timeout = request_timeout
        self.max_connections = max_connections
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.Task[Any]] = set()
        self.address: tuple[str, int] | None = None

    async def start(self, host: str, port: int) -> None:
        try:
            self._server = await asyncio.start_server(
                self._on_connection, host, port, limit=MAX_LINE, reuse_address=True
            )
        except OSError as e:
            raise ConfigError(
                f"{self.name} listener", f"{host}:{port}", e.strerror or str(e)
            ) from None
        sockname = self._server.sockets[0].getsockname()
        self.address = (str(sockname[0]), int(sockname[1]))
        log.info("%s endpoint listening on %s:%d", self.name, *self.address)

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        task.set_name(f"http-{self.name}")
        self._connections.add(task)
        response: Response | None = None
        head_only = False
        try:
            if len(self._connections) > self.max_connections:
                response = text(503, "too many connections")
            else:
                try:
                    request = await asyncio.wait_for(read_request(reader), self.request_timeout)
                except HttpError as e:
                    response = text(e.status, str(e))
                except TimeoutError:
                    response = text(408, "request not received in time")
                else:
                    head_only = request.method == "HEAD"
                    response = self.dispatch(request)
            writer.write(response.encode(head_only))
            await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)
        except (_ClientGone, ConnectionError, OSError, TimeoutError):
            response = None  # the client is gone or too slow; there is no one to answer
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)
        if response is not None and response.after is not None:
            response.after()

    def dispatch(self, request: Request) -> Response:
        route = self.routes.get(request.path)
        if route is None:
            return text(404, f"no such endpoint: {request.path}; see /")
        method = "GET" if request.method == "HEAD" else request.method
        if method not in route.methods:
            allowed = route.methods | ({"HEAD"} if "GET" in route.methods else set())
            allow = ", ".join(sorted(allowed))
            resp = text(405, f"{request.method} is not allowed here (allowed: {allow})")
            resp.headers = (("Allow", allow),)
            return resp
        try:
            return route.handler(request)
        except HttpError as e:
            return text(e.status, str(e))
        except Exception:
            # A bug in a handler must not take the agent down: answer 500 and keep serving.
            log.exception("%s endpoint %s failed", self.name, request.path)
            return text(500, "internal error (see the agent's log)")


# ---- what the endpoints read from the agent ----


class ListenerView(Protocol):
    @property
    def kind(self) -> str: ...

    @property
    def address(self) -> tuple[str, int]: ...


class ControlPlaneView(Protocol):
    """istiod as the endpoints see it (ztunnel.xds.control.ControlPlane)."""

    def pending(self) -> list[str]: ...

    def status(self) -> dict[str, Any]: ...


class AgentView(Protocol):
    """The parts of the Agent (ztunnel.app) that the endpoints read or trigger."""

    @property
    def istiod(self) -> ControlPlaneView | None: ...

    @property
    def settings(self) -> Settings: ...

    @property
    def store(self) -> WorkloadStore: ...

    @property
    def certs(self) -> CertificateManager: ...

    @property
    def tracker(self) -> ConnectionTracker: ...

    @property
    def listeners(self) -> Mapping[tuple[str, str], ListenerView]: ...

    @property
    def draining(self) -> bool: ...

    def wanted_listeners(self) -> set[tuple[str, str]]: ...

    def request_drain(self) -> None: ...

    def explain_authorization(
        self, source: str, target: str, source_ip: str | None
    ) -> dict[str, Any]: ...


@runtime_checkable
class CaptureView(Protocol):
    """An agent with eBPF capture (ztunnel.app.Agent) also reports what it found on its hooks."""

    def capture_snapshot(self) -> CaptureSnapshot | None: ...


def capture_snapshot(agent: object) -> CaptureSnapshot | None:
    return agent.capture_snapshot() if isinstance(agent, CaptureView) else None


def readiness_warnings(agent: AgentView) -> list[str]:
    """What a ready agent still wants people to know (pods whose capture is refused)."""
    snap = capture_snapshot(agent)
    return capture_readiness(snap)[1] if snap is not None else []


def jsonable(value: object) -> Any:
    """A JSON-ready rendering of model objects: dataclasses field by field (fields hidden from
    repr, such as indexes and caches, are left out), enums by value, SPIFFE ids as URIs,
    addresses and anything unknown as `str`."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, enum.Enum):
        return jsonable(value.value)
    if isinstance(value, SpiffeId):
        return value.uri
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: jsonable(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if f.repr and not f.name.startswith("_")
        }
    if isinstance(value, Mapping):
        return {str(jsonable(k)): jsonable(v) for k, v in value.items()}
    if isinstance(value, set | frozenset):
        return sorted((jsonable(v) for v in value), key=str)
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    return str(value)


def _hostport(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def workload_json(wl: Workload, node: str) -> dict[str, Any]:
    out: dict[str, Any] = jsonable(wl)
    out["identity"] = wl.identity.uri
    out["local"] = wl.node == node
    return out


def connection_json(rec: ConnectionRecord, now: float | None = None) -> dict[str, Any]:
    now = time.monotonic() if now is None else now
    return {
        "id": rec.id,
        "direction": rec.direction,
        "path": rec.path,
        "src": _hostport(*rec.src),
        "dst": _hostport(*rec.dst),
        "hbone_target": rec.hbone_target or None,
        "src_workload": rec.src_workload.name if rec.src_workload else None,
        "src_identity": rec.src_identity.uri if rec.src_identity else None,
        "dst_workload": rec.dst_workload.name if rec.dst_workload else None,
        "dst_service": rec.dst_service.hostname if rec.dst_service else None,
        "dst_identity": rec.dst_identity.uri if rec.dst_identity else None,
        "mtls": rec.mtls,
        "bytes_sent": rec.bytes_sent,
        "bytes_recv": rec.bytes_recv,
        "age_seconds": round(now - rec.started, 3),
        "started": dt.datetime.fromtimestamp(rec.started_wall, dt.UTC).isoformat(),
    }


def readiness_pending(agent: AgentView) -> list[str]:
    """What keeps the agent from being ready; empty when it is ready."""
    if agent.draining:
        return ["draining: the agent is shutting down"]
    out: list[str] = []
    if not agent.store.loaded:
        out.append("mesh state: not loaded yet")
    if agent.istiod is not None:
        out.extend(agent.istiod.pending())
    errors = {c["identity"]: c.get("last_error") for c in agent.certs.snapshot()}
    # Certificates of the local workloads that speak HBONE (the ones that need one).
    identities = {
        wl.identity
        for wl in agent.store.current.local_workloads(agent.settings.node_name)
        if wl.protocol is TunnelProtocol.HBONE
    }
    for ident in sorted(identities):
        if agent.certs.cached(ident) is None:
            err = errors.get(ident.uri)
            out.append(
                f"certificate: {ident.uri} not issued yet"
                + (f" (last error: {err})" if err else "")
            )
    for kind, ip in sorted(agent.wanted_listeners() - set(agent.listeners)):
        out.append(f"listener: {kind} on {ip} not up")
    snap = capture_snapshot(agent)
    if snap is not None:
        out += capture_readiness(snap)[0]
    if (workers := getattr(agent, "workers", None)) is not None:
        out += workers.pending()  # ztunnel.workers: every worker has served once
    return out


def config_dump(agent: AgentView) -> dict[str, Any]:
    s = agent.settings
    state = agent.store.current
    now = time.monotonic()
    live = sorted(agent.tracker.live.values(), key=lambda r: r.id)
    pending = readiness_pending(agent)
    snap = capture_snapshot(agent)
    dump = {
        "node": s.node_name,
        "version": agent_version(),
        "trust_domain": s.trust_domain,
        "cluster_id": s.cluster_id,
        "mesh_state": {
            "source": s.local_xds_path or f"istiod {s.xds_address}",
            "loaded": agent.store.loaded,
            "last_error": agent.store.last_error,
        },
        "readiness": {"ready": not pending, "pending": pending},
        "draining": agent.draining,
        "capture": snap.to_json() if snap is not None else None,
        "workloads": [workload_json(w, s.node_name) for w in state.workloads],
        "services": [jsonable(svc) for svc in state.services],
        "policies": [jsonable(p) for p in state.policies],
        "certificates": agent.certs.snapshot(),
        "istiod": agent.istiod.status() if agent.istiod is not None else None,
        "listeners": [
            {"kind": lst.kind, "address": _hostport(*lst.address)}
            for _, lst in sorted(agent.listeners.items())
        ],
        "connections": {
            "counts": agent.tracker.counts(),
            "total_opened": agent.tracker.total_opened,
            "live": [connection_json(r, now) for r in live],
        },
    }
    if (workers := getattr(agent, "workers", None)) is not None:
        workers.extend_dump(dump)  # ztunnel.workers: their connections, their processes
    return dump


# ---- endpoints ----


def _current_level() -> str:
    return logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()


def admin_routes(agent: AgentView) -> dict[str, Route]:
    def index(_req: Request) -> Response:
        return text(
            200,
            "ztunnel admin\n"
            "  GET  /config_dump      workloads, services, policies, certificates, "
            "istiod (xDS, CA), listeners, connections\n"
            "  GET  /logging          the log level; POST /logging?level=LEVEL "
            "changes it\n"
            "  GET  /authz/check?from=X&to=IP:PORT   explain an authorization decision\n"
            "  POST /quitquitquit     drain gracefully and exit\n",
        )

    def dump(_req: Request) -> Response:
        return json_response(config_dump(agent))

    def logging_(req: Request) -> Response:
        level = req.arg("level")
        if req.method == "GET":
            if level is not None:
                raise HttpError(405, "use POST (or PUT) /logging?level=LEVEL to change the level")
            return text(200, f"current log level is {_current_level()}")
        if level is None:
            raise HttpError(400, f"give ?level=LEVEL, one of {', '.join(LOG_LEVELS)}")
        if level.lower() not in LOG_LEVELS:
            raise HttpError(400, f"unknown log level {level!r}; one of {', '.join(LOG_LEVELS)}")
        logs.set_level(level)
        if (workers := getattr(agent, "workers", None)) is not None:
            workers.set_log_level(level)
        log.warning("log level changed to %s through the admin API", _current_level())
        return text(200, f"current log level is {_current_level()}")

    def check(req: Request) -> Response:
        source, target = req.arg("from"), req.arg("to")
        if not source or not target:
            raise HttpError(400, "give ?from=<workload|ip|spiffe id>&to=<ip:port>")
        try:
            return json_response(agent.explain_authorization(source, target, req.arg("source_ip")))
        except ZtunnelError as e:
            raise HttpError(404, str(e)) from None

    def quit_(_req: Request) -> Response:
        log.warning("drain requested through the admin API (/quitquitquit)")
        return Response(200, b"OK\n", after=agent.request_drain)

    return {
        "/": Route(index),
        "/config_dump": Route(dump),
        "/logging": Route(logging_, frozenset({"GET", "POST", "PUT"})),
        "/quitquitquit": Route(quit_, frozenset({"POST"})),
        "/authz/check": Route(check),
    }


def stats_routes(registry: CollectorRegistry) -> dict[str, Route]:
    def metrics(_req: Request) -> Response:
        return Response(200, generate_latest(registry), CONTENT_TYPE_LATEST)

    return {"/metrics": Route(metrics), "/stats/prometheus": Route(metrics)}


def readiness_routes(agent: AgentView) -> dict[str, Route]:
    def ready(_req: Request) -> Response:
        pending = readiness_pending(agent)
        if pending:
            return text(500, "\n".join(pending))
        return text(200, "\n".join(["ready", *readiness_warnings(agent)]))

    return {"/healthz/ready": Route(ready)}


def check_admin_address(settings: Settings) -> None:
    """The admin API can drain the agent and shows its configuration: loopback only."""
    if not settings.admin_port:
        return
    try:
        loopback = ipaddress.ip_address(settings.admin_address).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ConfigError(
            "settings",
            "admin_address",
            f"the admin API is served on loopback addresses only, got {settings.admin_address!r}"
            " (use 127.0.0.1 or ::1; it can stop the agent and shows its configuration)",
        )


@dataclass
class HttpEndpoints:
    """The admin, metrics and readiness servers of one agent (a port of 0 disables one)."""

    agent: AgentView
    registry: CollectorRegistry
    servers: dict[str, tuple[HttpServer, str, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        s = self.agent.settings
        check_admin_address(s)
        wanted = (
            ("admin", admin_routes(self.agent), s.admin_address, s.admin_port),
            ("stats", stats_routes(self.registry), s.status_address, s.stats_port),
            ("readiness", readiness_routes(self.agent), s.status_address, s.readiness_port),
        )
        for name, routes, host, port in wanted:
            if port:
                self.servers[name] = (HttpServer(name, routes), host, port)

    async def start(self) -> None:
        try:
            for server, host, port in self.servers.values():
                await server.start(host, port)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        await asyncio.gather(*(srv.close() for srv, _, _ in self.servers.values()))

    def address(self, name: str) -> tuple[str, int] | None:
        """Where `name` (admin, stats, readiness) listens once started; None if disabled."""
        entry = self.servers.get(name)
        return entry[0].address if entry else None
