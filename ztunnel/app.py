"""The composition root: builds the node agent from `Settings` and runs it.

Everything is created here and passed down (store, certificates, pool, tracker, proxies,
listeners); nothing below reads globals. `Agent.start()` brings it up, `Agent.drain()` takes
it down gracefully (stop accepting, GOAWAY, grace period, cancel).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import socket
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client.registry import CollectorRegistry

from ztunnel.admin import HttpEndpoints
from ztunnel.admission import Protection
from ztunnel.ca import CertificateAuthority
from ztunnel.certs import CertificateManager, CertificateSource, LocalCaSource
from ztunnel.config import Settings
from ztunnel.errors import ConfigError, ZtunnelError
from ztunnel.hbone.pool import HbonePool
from ztunnel.hbone.server import HboneServer
from ztunnel.hbone.tls import ContextCache
from ztunnel.identity import SpiffeId
from ztunnel.localconfig import fingerprint, load_mesh_state
from ztunnel.model import IPAddress, TunnelProtocol
from ztunnel.proxy.authorization import PolicyEnforcer, explain_check
from ztunnel.proxy.context import ProxyContext
from ztunnel.proxy.inbound import InboundProxy
from ztunnel.proxy.outbound import OutboundProxy
from ztunnel.proxy.records import ConnectionTracker, Observer
from ztunnel.proxy.relay import TcpEnd
from ztunnel.proxy.sockets import listen, original_destination
from ztunnel.proxy.socks5 import Socks5Server
from ztunnel.state import MeshState, WorkloadStore
from ztunnel.telemetry import Telemetry, combine
from ztunnel.telemetry.protection import ProtectionMetrics

if TYPE_CHECKING:
    from ztunnel.capture_report import CaptureSnapshot
    from ztunnel.kernel_capture import KernelCapture
    from ztunnel.workers.supervisor import WorkerPool
    from ztunnel.xds.control import ControlPlane

log = logging.getLogger("ztunnel")

# Capture modes with transparent 0.0.0.0 listeners on 15001/15006/15008. `tproxy` is `ebpf`
# without the BPF side: the node's TPROXY rules and its `ip rule fwmark` local-delivery route
# (the same mark and table as the eBPF capture) are installed by someone else, e.g. the
# benchmark (`bench/`), to compare the two capture paths.
TRANSPARENT_CAPTURES = ("ebpf", "tproxy")
# The local-delivery mark of tproxy mode: the eBPF capture's (capture.config.DEFAULT_MARK),
# repeated so that tproxy mode never imports the capture package.
TPROXY_LOCAL_MARK = 0x400


@dataclass
class Listener:
    kind: str  # outbound | inbound | hbone | socks5
    address: tuple[str, int]
    sock: socket.socket
    server: asyncio.AbstractServer | None = None


@dataclass
class AgentParts:
    """Optional pieces that later layers plug in (telemetry, authorization, capture)."""

    observer: Observer | None = None
    certificate_source: CertificateSource | None = None
    on_state: list[Callable[[MeshState, MeshState], None]] = field(default_factory=list)
    # Worker processes (ztunnel.workers): who makes the listener sockets (kind, ip, port,
    # transparent), and what else drains with the agent (given the grace period).
    listen: Callable[[str, str, int, bool], socket.socket] | None = None
    on_drain: list[Callable[[float], Awaitable[None]]] = field(default_factory=list)


def _ip(value: str) -> IPAddress:
    return ipaddress.ip_address(value)


class Agent:
    def __init__(self, settings: Settings, parts: AgentParts | None = None) -> None:
        self.settings = settings
        parts = parts or AgentParts()
        self.store = WorkloadStore()
        # Telemetry: the agent's own metrics registry (never the global one), the observer
        # that feeds it and the access log, and the admin/metrics/readiness HTTP endpoints.
        self.registry = CollectorRegistry()
        self.telemetry = Telemetry(self.registry)
        self.tracker = ConnectionTracker(combine(self.telemetry, parts.observer))
        # Limits and protections: admission control and HTTP/2 abuse limits (README).
        self.protection = Protection.from_settings(settings)
        ProtectionMetrics(self.registry, self.protection)
        self.http = HttpEndpoints(self, self.registry)
        # istiod (xDS) and/or its CA, when configured (ztunnel.xds.control).
        self.istiod: ControlPlane | None = None
        if settings.xds_address or settings.ca_address:
            from ztunnel.xds.control import ControlPlane

            self.istiod = ControlPlane(settings, self.store, self.registry)
        source = parts.certificate_source or self._certificate_source()
        self.certs = CertificateManager(source)
        self.contexts = ContextCache(settings.allow_tls12)
        self._parts = parts
        self.listeners: dict[tuple[str, str], Listener] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._prefetching: set[SpiffeId] = set()
        self._conn_tasks: set[asyncio.Task[None]] = set()
        self._stopped = asyncio.Event()
        self.draining = False
        self._drain_task: asyncio.Future[None] | None = None
        self.kernel: KernelCapture | None = None
        self.pool: HbonePool
        self.ctx: ProxyContext
        self.hbone: HboneServer
        # The agent's worker processes (ztunnel.workers), when it runs more than one.
        self.workers: WorkerPool | None = None

    def _certificate_source(self) -> CertificateSource:
        s = self.settings
        if self.istiod is not None and self.istiod.ca is not None:
            return self.istiod.ca
        try:
            ca = CertificateAuthority.load(s.ca_dir)
        except ZtunnelError as e:
            raise ConfigError("--ca-dir", s.ca_dir, str(e)) from None
        if ca.trust_domain != s.trust_domain:
            log.warning(
                "CA in %s is for trust domain %s, agent uses %s",
                s.ca_dir,
                ca.trust_domain,
                s.trust_domain,
            )
        return LocalCaSource(ca)

    # ---- state ----

    def load_state(self) -> None:
        """Initial load; a bad file raises ConfigError (the CLI exits non-zero). With istiod
        the state arrives over xDS after start (readiness waits for it)."""
        if not self.settings.local_xds_path:
            return
        state = load_mesh_state(self.settings.local_xds_path)
        self._replace_state(state)

    def _replace_state(self, state: MeshState) -> None:
        self.store.replace(state)

    async def _watch_file(self) -> None:
        path = self.settings.local_xds_path
        last = fingerprint(path)
        while True:
            await asyncio.sleep(self.settings.reload_interval)
            now = fingerprint(path)
            if now == last:
                continue
            last = now
            try:
                state = load_mesh_state(path)
            except ConfigError as e:
                self.store.record_error(str(e))
                log.error("mesh state reload failed, keeping the previous state: %s", e)
                continue
            except Exception as e:  # a parser bug must not end reloads for good
                self.store.record_error(f"{path}: {type(e).__name__}: {e}")
                log.exception("mesh state reload failed, keeping the previous state")
                continue
            self._replace_state(state)
            log.info(
                "mesh state reloaded from %s: %d workloads, %d services, %d policies",
                path,
                len(state.workloads),
                len(state.services),
                len(state.policies),
            )

    def local_identity(self, ip: IPAddress) -> SpiffeId | None:
        wl = self.ctx.local_workload(ip)
        return wl.identity if wl else None

    # ---- lifecycle ----

    async def start(self) -> None:
        s = self.settings
        if not self.store.loaded:
            self.load_state()
        transparent = s.capture in TRANSPARENT_CAPTURES
        self.pool = HbonePool(
            self.certs,
            self.contexts,
            s.connect_timeout,
            s.pool_idle_timeout,
            transparent_source=transparent,
            guard=self.protection.h2,
        )
        self.ctx = ProxyContext(
            store=self.store,
            node=s.node_name,
            pool=self.pool,
            tracker=self.tracker,
            own_ports=s.own_ports,
            hbone_port=s.hbone_port,
            connect_timeout=s.connect_timeout,
            transparent=transparent,
            bind_source_ip=s.bind_source_ip,
        )
        self.enforcer = PolicyEnforcer(self.store, self.tracker, s.node_name)
        self.ctx.authorize = self.enforcer.authorize
        # Readiness answers (500, pending) from here on, while the listeners come up.
        await self.http.start()
        self.outbound = OutboundProxy(self.ctx)
        self.inbound = InboundProxy(self.ctx)
        self.socks5 = Socks5Server(self.outbound, self._resolve_host)
        self.hbone = HboneServer(
            self.certs,
            self.contexts,
            s.trust_domain,
            self.local_identity,
            self.inbound.handle_stream,
            on_tls_failure=self.inbound.tls_failed,
            admission=self.protection.admission,
            guard=self.protection.h2,
        )
        self.store.subscribe(lambda old, new: self._sync_listeners())
        for cb in self._parts.on_state:
            self.store.subscribe(cb)
        if s.socks5_port:
            await self._add_listener("socks5", s.socks5_address, s.socks5_port, False)
        if s.capture in TRANSPARENT_CAPTURES:
            for kind, port in (
                ("outbound", s.outbound_port),
                ("inbound", s.inbound_plaintext_port),
                ("hbone", s.hbone_port),
            ):
                await self._add_listener(kind, "0.0.0.0", port, True)
        if s.capture == "ebpf":
            await self._start_capture()
        elif s.capture == "tproxy" and s.node_ip:
            # Same-node HBONE as with eBPF: dialed from the node address with the mark that
            # the installer's `ip rule` sends to local delivery.
            self.ctx.node_ip = ipaddress.ip_address(s.node_ip)
            self.ctx.local_dial_mark = TPROXY_LOCAL_MARK
        self._sync_listeners()
        if s.local_xds_path:
            self._spawn(self._watch_file(), "mesh-state-watch")
        if self.istiod is not None:
            self._spawn(self.istiod.run(), "istiod")
        self.store.subscribe(lambda old, new: self._sync_certificates())
        self._sync_certificates()
        log.info(
            "agent %s up: %d local workloads, listeners: %s",
            s.node_name,
            len(self.store.current.local_workloads(s.node_name)),
            ", ".join(
                f"{k[0]}={a.address[0]}:{a.address[1]}" for k, a in sorted(self.listeners.items())
            ),
        )

    async def _start_capture(self) -> None:
        from ztunnel.kernel_capture import KernelCapture  # pyroute2 and bpf(): only in ebpf mode

        s = self.settings
        self.kernel = KernelCapture(s, self.registry)
        self.ctx.node_ip = ipaddress.ip_address(s.node_ip)
        self.ctx.local_dial_mark = self.kernel.mark
        await self.kernel.start(
            {k: self.listeners[(k, "0.0.0.0")].sock for k in ("outbound", "inbound", "hbone")}
        )

    def capture_snapshot(self) -> CaptureSnapshot | None:
        """What the eBPF capture found on its hooks (admin, readiness); None without it."""
        return self.kernel.snapshot() if self.kernel is not None else None

    def _sync_certificates(self) -> None:
        """Issue local HBONE workloads' certificates up front so the first connection is fast
        (istio/ztunnel prefetches the same set); forget identities that left the node."""
        wanted = self._wanted_identities()
        for ident in self.certs.retain(wanted):
            log.info("forgot the certificate of %s: no local workload uses it now", ident)
        for ident in sorted(wanted - self._prefetching):
            self._prefetching.add(ident)
            self._spawn(self._prefetch(ident), f"cert-prefetch {ident}")

    async def _prefetch(self, ident: SpiffeId) -> None:
        """Issue a local workload's certificate before the first connection needs it; retry
        with backoff on failure (readiness reports it pending meanwhile)."""
        try:
            await self._prefetch_loop(ident)
        finally:
            self._prefetching.discard(ident)

    async def _prefetch_loop(self, ident: SpiffeId) -> None:
        failures = 0
        while not self.draining and ident in self._wanted_identities():
            try:
                await self.certs.get(ident)
                return
            except ZtunnelError as e:
                failures += 1
                delay = self.certs.backoff(failures)
                log.warning(
                    "certificate for %s not available (retry in %.1fs): %s", ident, delay, e
                )
                await asyncio.sleep(delay)

    def _wanted_identities(self) -> set[SpiffeId]:
        return {
            wl.identity
            for wl in self.store.current.local_workloads(self.settings.node_name)
            if wl.protocol is TunnelProtocol.HBONE
        }

    def _spawn(self, coro: Awaitable[None], name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _workload_listeners(self) -> set[tuple[str, str]]:
        """Without kernel capture: (kind, ip) for every local workload IP."""
        want: set[tuple[str, str]] = set()
        for wl in self.store.current.local_workloads(self.settings.node_name):
            for ip in wl.addresses:
                for kind in ("hbone", "inbound", "outbound"):
                    want.add((kind, str(ip)))
        return want

    def wanted_listeners(self) -> set[tuple[str, str]]:
        """Every listener the agent should have now; readiness waits for all of them."""
        s = self.settings
        want = {("socks5", s.socks5_address)} if s.socks5_port else set()
        if s.capture in TRANSPARENT_CAPTURES:
            return want | {(k, "0.0.0.0") for k in ("outbound", "inbound", "hbone")}
        return want | self._workload_listeners()

    def _sync_listeners(self) -> None:
        """Without kernel capture, listen on every local workload IP (and stop for gone ones)."""
        if self.settings.capture != "none" or self.draining:
            return
        s = self.settings
        want = self._workload_listeners()
        for key in list(self.listeners):
            if key[0] != "socks5" and key not in want:
                self._close_listener(key)
        ports = {
            "hbone": s.hbone_port,
            "inbound": s.inbound_plaintext_port,
            "outbound": s.outbound_port,
        }
        for kind, ip in sorted(want - set(self.listeners)):
            self._spawn(self._add_listener(kind, ip, ports[kind], False), f"listen {kind} {ip}")

    def _close_listener(self, key: tuple[str, str]) -> None:
        lst = self.listeners.pop(key)
        if lst.server is not None:
            lst.server.close()
        if lst.kind == "hbone" and not self.draining:
            # Its accept loop must end too, or the address stays taken (workload churn).
            self.hbone.stop_serving(lst.sock)
        with contextlib.suppress(OSError):
            lst.sock.close()

    async def _add_listener(self, kind: str, ip: str, port: int, transparent: bool) -> None:
        key = (kind, ip)
        if key in self.listeners:
            return
        try:
            if self._parts.listen is not None:
                sock = self._parts.listen(kind, ip, port, transparent)
            else:
                sock = listen(ip, port, transparent)
        except OSError as e:
            log.error("%s listener: %s", kind, e.strerror)
            if kind == "socks5" or transparent:
                raise ConfigError(f"{kind} listener", f"{ip}:{port}", str(e.strerror)) from None
            return
        lst = Listener(kind, (ip, sock.getsockname()[1]), sock)
        self.listeners[key] = lst
        if kind == "hbone":
            self.hbone.serve(sock)
            return
        handler = {
            "outbound": self._on_outbound,
            "inbound": self._on_inbound,
            "socks5": self._on_socks5,
        }[kind]
        loop = asyncio.get_running_loop()
        # backlog: create_server re-listens on the socket; keep listen()'s deep queue.
        lst.server = await loop.create_server(
            lambda: TcpEnd(on_ready=lambda end: self._on_accepted(end, handler, kind)),
            sock=sock,
            backlog=4096,
        )

    def _on_accepted(
        self, end: TcpEnd, handler: Callable[[TcpEnd], Coroutine[Any, Any, None]], kind: str
    ) -> None:
        admission = self.protection.admission
        if not admission.admit(f"{kind} connection", str(end.extra("peername"))):
            end.abort()  # shed: RST, so the application fails fast
            return
        self._spawn_connection(handler(end), kind).add_done_callback(lambda _t: admission.release())

    def _spawn_connection(self, coro: Coroutine[Any, Any, None], kind: str) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        task.set_name(f"conn-{kind}")
        self._conn_tasks.add(task)
        task.add_done_callback(self._conn_done)
        return task

    def _conn_done(self, task: asyncio.Task[None]) -> None:
        self._conn_tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("connection handler %s failed", task.get_name(), exc_info=exc)

    # ---- connection entry points ----

    @staticmethod
    def _peer(end: TcpEnd) -> tuple[IPAddress, int]:
        peer = end.extra("peername")
        return _ip(peer[0]), int(peer[1])

    @staticmethod
    def _local(end: TcpEnd) -> tuple[IPAddress, int]:
        ip, port = original_destination(end.extra("socket"))
        return _ip(ip), port

    async def _on_outbound(self, end: TcpEnd) -> None:
        await self.outbound.handle(end, self._peer(end), self._local(end))

    async def _on_inbound(self, end: TcpEnd) -> None:
        await self.inbound.handle_plaintext(end, self._peer(end), self._local(end))

    async def _on_socks5(self, end: TcpEnd) -> None:
        await self.socks5.handle(end, self._peer(end))

    def _resolve_host(self, host: str) -> IPAddress | None:
        """SOCKS5 hostnames: a service hostname (its first VIP) or a workload hostname."""
        state = self.store.current
        for svc in state.services:
            if svc.hostname == host and svc.vips:
                return svc.vips[0].address
        for wl in state.workloads:
            if wl.hostname and wl.hostname == host:
                return wl.addresses[0]
        return None

    # ---- shutdown ----

    async def drain(self, grace: float | None = None) -> None:
        """Graceful: stop accepting, GOAWAY peers, give open connections `grace` seconds."""
        if self.draining:
            return
        self.draining = True
        grace = self.settings.drain_timeout if grace is None else grace
        log.info("draining: %d open connections, grace %.1fs", len(self.tracker.live), grace)
        for key in list(self.listeners):
            self._close_listener(key)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        await asyncio.gather(
            self.hbone.drain(grace),
            self.pool.close(grace),
            *(drain(grace) for drain in self._parts.on_drain),
        )
        await self.tracker.wait_empty(deadline - loop.time())
        for rec in list(self.tracker.live.values()):
            rec.close("agent shutting down")
        me = asyncio.current_task()
        others = [t for t in (*self._tasks, *self._conn_tasks) if t is not me]
        for t in others:
            t.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        await self.certs.close()
        if self.istiod is not None:
            await self.istiod.close()
        if self.kernel is not None:
            await self.kernel.close()
        # Last: readiness kept answering 500 and metrics stayed scrapable during the drain.
        await self.http.close()
        self._stopped.set()

    async def run_until_signalled(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal)
        await self._stopped.wait()

    def _on_signal(self) -> None:
        self.request_drain()

    def explain_authorization(
        self, source: str, target: str, source_ip: str | None = None
    ) -> dict[str, Any]:
        """`ztunnel ctl check`: how the current policies decide source -> target."""
        return explain_check(self.enforcer, source, target, source_ip)

    def request_drain(self) -> None:
        """Start the graceful drain once (SIGTERM, SIGINT, the admin API's /quitquitquit);
        `run_until_signalled` returns when it is done."""
        if self._drain_task is None:
            self._drain_task = asyncio.ensure_future(self.drain())
            self._drain_task.set_name("drain")
