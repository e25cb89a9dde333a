"""The composition root of the waypoint: its identity and certificate, the state source
(the mesh state file, and the configuration files), the HBONE listener, the HBONE pool
toward node agents, the request handler, metrics and readiness. `start()` brings it up,
`drain()` takes it down (stop accepting, GOAWAY, grace period)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from waypoint.balancer import Endpoint
from waypoint.config import WaypointSettings
from waypoint.http.h1 import Response, ServerLimits, serve_h1
from waypoint.http.messages import BodyChannel, RequestHead, ResponseHead
from waypoint.http.streams import AsyncioByteStream, ByteStream, HboneByteStream
from waypoint.proxy import RequestHandler
from waypoint.proxy import Settings as ProxySettings
from waypoint.server import WaypointServer
from waypoint.state import WaypointIdentity, WaypointView, build_view
from waypoint.telemetry import RequestMetrics, Tracer
from waypoint.upstream import Upstreams
from ztunnel.ca import CertificateAuthority
from ztunnel.certs import CertificateManager, CertificateSource, LocalCaSource
from ztunnel.errors import ConfigError, ZtunnelError
from ztunnel.hbone.headers import ConnectRequest, format_authority, new_traceparent
from ztunnel.hbone.pool import HbonePool, PoolKey
from ztunnel.hbone.server import HboneServer
from ztunnel.hbone.tls import ContextCache
from ztunnel.identity import SpiffeId
from ztunnel.localconfig import fingerprint, load_mesh_state
from ztunnel.meshconfig.load import ConfigOptions, ConfigSet, load_config
from ztunnel.proxy.sockets import listen
from ztunnel.state import MeshState
from ztunnel.telemetry import register_build_info, register_process_metrics

log = logging.getLogger("waypoint")


class StateSource(Protocol):
    """Where the waypoint's inputs come from (the local files now; xDS like the agent's as
    it arrives): `load` returns the current mesh state and configuration, `changed` whether
    a new `load` is due."""

    def load(self) -> tuple[MeshState, ConfigSet]: ...

    def changed(self) -> bool: ...


@dataclass
class FileSource:
    mesh_path: str
    config_paths: tuple[str, ...]
    options: ConfigOptions
    _last: tuple[object, ...] = ()

    def _fingerprint(self) -> tuple[object, ...]:
        return (fingerprint(self.mesh_path), *(fingerprint(p) for p in self.config_paths))

    def load(self) -> tuple[MeshState, ConfigSet]:
        self._last = self._fingerprint()
        mesh = load_mesh_state(self.mesh_path)
        config = load_config(self.config_paths, self.options)
        for w in config.warnings:
            log.warning("%s", w)
        return mesh, config

    def changed(self) -> bool:
        return self._fingerprint() != self._last


class Waypoint:
    def __init__(
        self,
        settings: WaypointSettings,
        source: StateSource | None = None,
        certificates: CertificateSource | None = None,
    ) -> None:
        self.settings = s = settings
        self.identity = SpiffeId(s.trust_domain, s.namespace, s.account)
        self.me = WaypointIdentity(
            s.name,
            s.namespace,
            s.service_hostname,
            frozenset(ipaddress.ip_address(a) for a in s.addresses),
            s.waypoint_for,
        )
        options = ConfigOptions(s.root_namespace, s.domain, s.dr_inheritance)
        self.source = source or FileSource(
            s.local_xds_path, s.config_paths or (s.local_xds_path,), options
        )
        self.registry = CollectorRegistry()
        register_build_info(self.registry, "waypoint")
        register_process_metrics(self.registry)
        self.metrics = RequestMetrics(self.registry)
        self.certs = CertificateManager(certificates or self._ca())
        self.contexts = ContextCache()
        self.pool = HbonePool(self.certs, self.contexts, s.connect_timeout)
        self.upstreams = Upstreams(self.connect)
        self.tracer = (
            Tracer(s.otlp_endpoint, s.otlp_protocol, f"{s.name}.{s.namespace}")
            if s.otlp_endpoint
            else None
        )
        self.handler = RequestHandler(
            lambda: self.view,
            self.upstreams,
            self.metrics,
            self.tracer,
            ProxySettings(buffer_limit=s.buffer_limit),
        )
        limits = ServerLimits(s.max_header_bytes, 100, s.header_timeout, s.idle_timeout)
        self.server = WaypointServer(lambda: self.view, self.handler, limits, s.sniff_timeout)
        self.hbone = HboneServer(
            self.certs,
            self.contexts,
            s.trust_domain,
            lambda _ip: self.identity,
            self.server.handle_stream,
        )
        self.view: WaypointView
        self.ready = False
        self.last_error: str | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._stats: asyncio.AbstractServer | None = None
        self._stopped = asyncio.Event()
        self.hbone_port = 0
        self.stats_port = 0

    def _ca(self) -> CertificateSource:
        try:
            return LocalCaSource(CertificateAuthority.load(self.settings.ca_dir))
        except ZtunnelError as e:
            raise ConfigError("--ca-dir", self.settings.ca_dir, str(e)) from None

    def load(self) -> None:
        mesh, config = self.source.load()
        self.view = build_view(self.me, mesh, config)
        for d in self.view.routes.decisions:
            if d.code not in ("vs-selected",):
                log.info("config: %s", d)
        log.info(
            "waypoint %s/%s serves %d service address(es), %d workload address(es)",
            self.me.namespace,
            self.me.name,
            len(self.view.services),
            len(self.view.workloads),
        )

    async def connect(self, ep: Endpoint) -> ByteStream:
        """HBONE to the endpoint's node agent, as the waypoint's identity."""
        ids = {ep.workload.identity}
        key = PoolKey(
            self.identity, frozenset(ids), (ep.address, self.settings.peer_hbone_port), None
        )
        # The destination sees the waypoint as the source (no `forwarded` client address).
        req = ConnectRequest(
            authority=format_authority(ep.address, ep.port),
            traceparent=new_traceparent(),
        )
        stream = await self.pool.open_stream(key, req)
        return HboneByteStream(stream, ep.key)

    async def start(self) -> None:
        s = self.settings
        self.load()
        await self.certs.get(self.identity)
        sock = listen(s.hbone_address, s.hbone_port, False)
        self.hbone_port = sock.getsockname()[1]
        self.hbone.serve(sock)
        if s.stats_port or (s.stats_port == 0 and s.extra.get("stats_ephemeral")):
            self._stats = await asyncio.start_server(self._on_stats, s.stats_address, s.stats_port)
            self.stats_port = self._stats.sockets[0].getsockname()[1]
        self._spawn(self._watch(), "waypoint-state-watch")
        self.ready = True
        log.info(
            "waypoint %s up: HBONE on %s:%d as %s",
            s.name,
            s.hbone_address,
            self.hbone_port,
            self.identity,
        )

    def _spawn(self, coro: object, name: str) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[call-overload]
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reload_interval)
            if not self.source.changed():
                continue
            try:
                self.load()
                self.last_error = None
            except ConfigError as e:
                self.last_error = str(e)
                log.error("configuration reload failed, keeping the previous one: %s", e)

    async def _on_stats(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        async def handle(head: RequestHead, _body: BodyChannel) -> Response:
            if head.path_only in ("/metrics", "/stats/prometheus"):
                data = generate_latest(self.registry)
                return Response(
                    ResponseHead(
                        200,
                        [("content-type", CONTENT_TYPE_LATEST), ("content-length", str(len(data)))],
                    ),
                    BodyChannel.of(data),
                )
            if head.path_only == "/healthz/ready":
                if self.ready:
                    return Response.simple(200, "ready\n")
                return Response.simple(500, "not ready\n")
            return Response.simple(404, "not found\n")

        io = AsyncioByteStream(r, w)
        try:
            await serve_h1(io, handle, ServerLimits(8192, 50, 5.0, 10.0, 5.0))
        finally:
            io.close()

    async def drain(self, grace: float | None = None) -> None:
        grace = self.settings.drain_timeout if grace is None else grace
        self.ready = False
        self.hbone.stop_accepting()
        if self._stats is not None:
            self._stats.close()
        await asyncio.gather(
            self.hbone.drain(grace), self.pool.close(grace), return_exceptions=True
        )
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.upstreams.close()
        await self.certs.close()
        if self.tracer is not None:
            with contextlib.suppress(Exception):
                self.tracer.shutdown()
        self._stopped.set()

    async def run_until_signalled(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: self._spawn(self.drain(), "drain"))
        await self._stopped.wait()
