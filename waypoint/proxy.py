"""The request path of the waypoint: L7 authorization, route selection, CORS, redirects and
direct responses, fault injection, the weighted destination, rewrites and headers, the
upstream exchange with retries, timeouts, outlier detection and connection-pool limits,
mirroring, and the request's telemetry. One `RequestHandler` per waypoint; one call per
request, whatever the protocol it came in."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from waypoint import router
from waypoint.authz import DENIED_BODY, RequestAttrs, authorize
from waypoint.balancer import Cluster, Endpoint
from waypoint.http.errors import UpstreamError
from waypoint.http.h1 import Response
from waypoint.http.messages import (
    BodyChannel,
    BodyClosed,
    HeaderList,
    ReplayableBody,
    RequestHead,
    ResponseHead,
    header,
    set_header,
)
from waypoint.state import WaypointView
from waypoint.telemetry import RequestMetrics, RequestRecord, Tracer, log_request, trace_context
from waypoint.upstream import Exchange, Overflow, Upstreams
from ztunnel.identity import SpiffeId
from ztunnel.meshconfig.compile import Cluster as ClusterRef
from ztunnel.meshconfig.compile import MirrorTarget, RetryPolicy
from ztunnel.model import Service, Workload

log = logging.getLogger(__name__)

RESET_BEFORE_HEADERS = "upstream connect error or disconnect/reset before headers. reset reason: "
RETRY_BACKOFF_BASE = 0.025  # Envoy's defaults
RETRY_BACKOFF_MAX = 0.25
GRPC_RETRY = {
    "cancelled": "1",
    "deadline-exceeded": "4",
    "resource-exhausted": "8",
    "internal": "13",
    "unavailable": "14",
}


@dataclass(frozen=True)
class Target:
    """What the tunnel was opened for: a bound service (VIP:port) or a bound workload."""

    ip: str
    port: int
    service: Service | None
    workload: Workload | None
    app_protocol: str = ""


@dataclass(frozen=True)
class Source:
    identity: SpiffeId | None
    ip: str
    port: int
    workload: Workload | None


@dataclass
class Settings:
    buffer_limit: int = 1 << 20  # request body kept for retries and mirrors (Envoy: 1 MiB)
    sample_traces: bool = True
    mirror_timeout: float = 30.0


@dataclass
class RequestHandler:
    view: Callable[[], WaypointView]
    upstreams: Upstreams
    metrics: RequestMetrics
    tracer: Tracer | None = None
    settings: Settings = field(default_factory=Settings)
    rng: random.Random = field(default_factory=random.Random)
    clusters: dict[str, Cluster] = field(default_factory=dict)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _cluster_views: dict[str, WaypointView] = field(default_factory=dict)

    def _spawn(self, coro: object, name: str) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[call-overload]
        task.set_name(name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # ---- clusters ----

    def cluster(self, view: WaypointView, ref: ClusterRef, port: int) -> Cluster:
        name = f"{ref.host}|{ref.subset}|{port}"
        c = self.clusters.get(name)
        if c is not None and self._cluster_views.get(name) is view:
            return c  # policy and endpoints change only with the view
        policy = view.routes.policy(ref, port)
        endpoints = view.endpoints(ref, port, policy.subset_labels)
        if c is None:
            c = self.clusters[name] = Cluster(name, policy, self.rng)
        c.update(policy, endpoints)
        self._cluster_views[name] = view
        return c

    # ---- the request ----

    async def handle(
        self, head: RequestHead, body: BodyChannel, target: Target, source: Source
    ) -> Response:
        view = self.view()
        t0 = time.monotonic()
        start_ns = time.time_ns()
        grpc = (header(head.headers, "content-type") or "").startswith("application/grpc")
        rec = RequestRecord(
            head.method,
            head.path,
            head.authority,
            "grpc" if grpc else "http",
            f"{source.ip}:{source.port}",
            source.identity,
            source.workload,
            target.service,
            target.workload,
            user_agent=header(head.headers, "user-agent") or "",
        )
        trace = trace_context(header(head.headers, "traceparent"), self.settings.sample_traces)
        rec.trace_id, rec.span_id = trace.trace_id, trace.span_id
        request_id = header(head.headers, "x-request-id")
        if request_id is None:
            request_id = _uuid()
            head.headers.append(("x-request-id", request_id))
        rec.request_id = request_id
        set_header(head.headers, "traceparent", trace.traceparent)
        try:
            response = await self._route(view, head, body, target, source, rec, grpc)
        except Exception as e:
            log.exception("request %s %s failed", head.method, head.path)
            rec.error = str(e)
            response = _error(500, "internal error")
        return self._finish(response, rec, body, t0, start_ns, trace)

    def _finish(
        self,
        response: Response,
        rec: RequestRecord,
        body: BodyChannel,
        t0: float,
        start_ns: int,
        trace: object,
    ) -> Response:
        """Count the response body as it goes to the client; record telemetry at its end."""
        rec.status = response.head.status
        rec.grpc_status = header(response.head.headers, "grpc-status") or rec.grpc_status
        src = response.body

        def record() -> None:
            rec.request_bytes = body.received
            rec.duration = time.monotonic() - t0
            with contextlib.suppress(Exception):
                self.metrics.record(rec)
                log_request(rec)
                if self.tracer is not None:
                    self.tracer.export(trace, rec, start_ns, time.time_ns())  # type: ignore[arg-type]

        if src.complete:
            # The whole answer is here (every small response): counted and recorded now,
            # and handed on as it is, without a copying task.
            rec.response_bytes = src.queued
            rec.grpc_status = header(src.trailers, "grpc-status") or rec.grpc_status
            record()
            return response
        out = BodyChannel()

        async def pump() -> None:
            try:
                async for chunk in src:
                    rec.response_bytes += len(chunk)
                    await out.put(chunk)
                if not out.ended:
                    out.end(src.trailers)
                rec.grpc_status = header(src.trailers, "grpc-status") or rec.grpc_status
            except BodyClosed as e:
                rec.error = rec.error or f"response body: {e}"
                rec.flags.append("UPE" if src.failed else "DC")
                out.fail(e)
                src.fail(e)
            finally:
                record()

        self._spawn(pump(), "response-body")
        return Response(response.head, out)

    async def _route(
        self,
        view: WaypointView,
        head: RequestHead,
        body: BodyChannel,
        target: Target,
        source: Source,
        rec: RequestRecord,
        grpc: bool,
    ) -> Response:
        # 1. L7 authorization (before routing, as Envoy's RBAC filter).
        verdict = authorize(
            view.policies_for(target.service),
            RequestAttrs(
                head.method,
                head.path_only,
                head.authority,
                target.port,
                _header_map(head.headers),
                source.identity,
                source.ip,
                target.ip,
            ),
        )
        if verdict.dry_run:
            log.info(
                "dry-run policies %s would match %s %s",
                ",".join(verdict.dry_run),
                head.method,
                head.path,
            )
        if not verdict.allowed:
            rec.flags.append("RBAC")
            rec.error = f"{verdict.reason} {verdict.policy}".strip()
            return _error(403, DENIED_BODY, grpc, "7")
        # 2. Routing.
        routes = view.routes.routes_for(target.service.hostname) if target.service else None
        ctx = router.RequestContext(
            target.port,
            source.workload.labels if source.workload else {},
            source.identity.namespace if source.identity else "",
        )
        if target.service is None:
            return await self._to_workload(view, head, body, target, rec)
        if routes is None:
            rec.flags.append("NR")
            return _error(404, "no route", grpc, "12")
        entry = router.select(routes, head, ctx)
        if entry is None:
            rec.flags.append("NR")
            return _error(404, "route not found", grpc, "12")
        route = entry.route
        rec.route = str(route.origin)
        cors_headers: HeaderList = []
        if route.cors is not None:
            if router.is_preflight(head):
                allowed = router.cors_preflight(route.cors, head)
                if allowed is not None:
                    return Response.simple(200, "", allowed)
                if route.cors.unmatched_preflights == "IGNORE":
                    return Response.simple(200, "")
            cors_headers = router.cors_response_headers(route.cors, head)
        if route.redirect is not None:
            code, location = router.redirect_location(head, entry, target.port)
            return Response.simple(code, "", [("location", location)])
        if route.direct_response is not None:
            dr = route.direct_response
            return Response(
                ResponseHead(
                    dr.status,
                    [("content-length", str(len(dr.body)))]
                    + ([("content-type", "text/plain")] if dr.body else []),
                ),
                BodyChannel.of(dr.body),
            )
        # 3. Faults (Envoy's fault filter: delay, then abort).
        fault = route.fault
        if fault is not None:
            if fault.delay is not None and self.rng.uniform(0, 100) < fault.delay.percentage:
                rec.flags.append("DI")
                await asyncio.sleep(fault.delay.fixed_delay)
            if fault.abort is not None and self.rng.uniform(0, 100) < fault.abort.percentage:
                rec.flags.append("FI")
                if fault.abort.grpc_status is not None:
                    return _grpc_status(fault.abort.grpc_status, "fault filter abort")
                return _error(fault.abort.http_status or 503, "fault filter abort")
        # 4. The destination.
        chosen = router.pick_weighted(route.clusters, self.rng)
        if chosen is None:
            rec.flags.append("NR")
            return _error(500, "no destination with weight", grpc, "13")
        if chosen.cluster.invalid:
            rec.error = chosen.cluster.invalid
            return _error(500, chosen.cluster.invalid, grpc, "13")
        router.rewrite(head, entry)
        router.apply_request_ops(head, route.request_headers)
        router.apply_request_ops(head, chosen.headers.request)
        port = chosen.cluster.port or target.port
        svc = view.by_hostname.get(chosen.cluster.host)
        if svc is not None and chosen.cluster.port is None and len(svc.ports) == 1:
            port = svc.ports[0].service_port
        cluster = self.cluster(view, chosen.cluster, port)
        rec.service = svc or target.service
        replay = ReplayableBody(body, self.settings.buffer_limit)
        protocol = self._protocol(head, target, cluster)
        response, set_cookie = await self._exchange(
            cluster, head, replay, route.retry, route.timeout, protocol, source, rec, grpc
        )
        for mirror in route.mirrors:
            if self.rng.uniform(0, 100) < mirror.percentage:
                self._spawn(self._mirror(view, mirror, head, replay, port, protocol), "mirror")
        headers = response.head.headers
        router.apply_header_ops(headers, route.response_headers)
        router.apply_header_ops(headers, chosen.headers.response)
        headers.extend(cors_headers)
        if set_cookie:
            headers.append(("set-cookie", set_cookie))
        return response

    async def _to_workload(
        self,
        view: WaypointView,
        head: RequestHead,
        body: BodyChannel,
        target: Target,
        rec: RequestRecord,
    ) -> Response:
        """Traffic addressed to a bound workload: authorized, then straight to it."""
        assert target.workload is not None
        w = target.workload
        c = self.clusters.get(f"workload|{target.ip}|{target.port}")
        if c is None:
            from ztunnel.meshconfig.destinations import EffectivePolicy

            c = self.clusters[f"workload|{target.ip}|{target.port}"] = Cluster(
                f"workload|{target.ip}|{target.port}", EffectivePolicy(), self.rng
            )
        c.endpoints = [Endpoint(w, w.addresses[0], target.port)]
        replay = ReplayableBody(body, self.settings.buffer_limit)
        from ztunnel.meshconfig.compile import retry_policy

        response, _ = await self._exchange(
            c,
            head,
            replay,
            retry_policy(None),
            None,
            "h2" if head.protocol == "HTTP/2" else "h1",
            None,
            rec,
            False,
        )
        return response

    def _protocol(self, head: RequestHead, target: Target, cluster: Cluster) -> str:
        app = target.app_protocol.lower()
        if cluster.policy.connection_pool.use_client_protocol or not app:
            return "h2" if head.protocol == "HTTP/2" else "h1"
        if app in ("http2", "grpc", "h2c", "kubernetes.io/h2c", "grpc-web"):
            return "h2"
        if cluster.policy.connection_pool.h2_upgrade_policy == "UPGRADE":
            return "h2"
        return "h1"

    # ---- upstream, with retries ----

    def _hash_key(
        self, cluster: Cluster, head: RequestHead, source: Source | None
    ) -> tuple[str | None, str]:
        """(hash key, Set-Cookie to add) for consistent-hash load balancing."""
        ch = cluster.policy.load_balancer.consistent_hash
        if ch is None:
            return None, ""
        if ch.kind == "header":
            return head.get(ch.name), ""
        if ch.kind == "source_ip":
            return source.ip if source else None, ""
        if ch.kind == "query_param":
            return router._query(head).get(ch.name), ""
        value = router.cookie(head.headers, ch.name)
        if value is not None:
            return value, ""
        if ch.cookie_ttl is None:
            return None, ""
        value = secrets.token_hex(8)
        attrs = [f"{ch.name}={value}"]
        if ch.cookie_ttl:
            attrs.append(f"Max-Age={int(ch.cookie_ttl)}")
        if ch.cookie_path:
            attrs.append(f"Path={ch.cookie_path}")
        attrs.append("HttpOnly")
        return value, "; ".join(attrs)

    async def _exchange(
        self,
        cluster: Cluster,
        head: RequestHead,
        body: ReplayableBody,
        retry: RetryPolicy,
        timeout: float | None,
        protocol: str,
        source: Source | None,
        rec: RequestRecord,
        grpc: bool,
    ) -> tuple[Response, str]:
        hash_key, set_cookie = self._hash_key(cluster, head, source)
        length_h = header(head.headers, "content-length")
        length = (
            int(length_h)
            if length_h and length_h.isdigit()
            else (0 if body.source.ended and not body.source.received else None)
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout else None
        tried: set[str] = set()
        attempt = 0
        last_flag = ""
        while True:
            attempt += 1
            rec.attempts = attempt
            ep = cluster.choose(loop.time(), hash_key, frozenset(tried))
            if ep is None:
                rec.flags.append("UH")
                return _error(503, "no healthy upstream", grpc, "14"), ""
            tried.add(ep.key)
            rec.dst_workload, rec.dst_addr = ep.workload, ep.key
            cluster.started(ep)
            per_try = retry.per_try_timeout
            budget = None if deadline is None else max(0.0, deadline - loop.time())
            limit = (
                min(x for x in (per_try, budget) if x is not None)
                if (per_try or budget is not None)
                else None
            )
            kind = ""
            ex: Exchange | None = None
            try:
                async with asyncio.timeout(limit):
                    ex = await self.upstreams.exchange(
                        cluster, ep, protocol, head, body.reader(), length, lambda: body.trailers
                    )
            except Overflow as e:
                cluster.finished(ep, -1, loop.time())
                rec.flags.append("UO")
                rec.error = str(e)
                return _error(
                    503,
                    f"{RESET_BEFORE_HEADERS}overflow",
                    grpc,
                    "14",
                    [("x-envoy-overloaded", "true")],
                ), ""
            except TimeoutError:
                kind = "timeout"
            except UpstreamError as e:
                kind = e.kind
                rec.error = str(e)
            except BodyClosed as e:
                kind = "reset"
                rec.error = str(e)
            now = loop.time()
            status = 0 if ex is None else ex.head.status
            cluster.finished(ep, status if kind != "timeout" else 504, now)
            if ex is not None:
                grpc_status = ex.head.get("grpc-status")
                if not self._retriable(retry, status, grpc_status, "") or not self._can_retry(
                    retry, attempt, body, deadline, now
                ):
                    if attempt > 1 and status >= 500:
                        rec.flags.append("URX")
                    return Response(ex.head, ex.body), set_cookie
                ex.body.fail(BodyClosed("retried"))
                last_flag = ""
            else:
                last_flag = "UT" if kind == "timeout" else "UF"
                if not self._retriable(retry, 0, None, kind) or not self._can_retry(
                    retry, attempt, body, deadline, now
                ):
                    rec.flags.append(last_flag)
                    if attempt > 1:
                        rec.flags.append("URX")
                    if kind == "timeout":
                        return _error(504, "upstream request timeout", grpc, "4"), ""
                    reason = "connection failure" if kind == "connect-failure" else kind
                    return _error(
                        503,
                        f"{RESET_BEFORE_HEADERS}{reason}",
                        grpc,
                        "14",
                    ), ""
            max_retries = cluster.policy.connection_pool.max_retries
            if max_retries is not None and cluster.breaker.retries >= max_retries:
                rec.flags.append("UO")
                return _error(503, "retry overflow", grpc, "14"), ""
            cluster.breaker.retries += 1
            try:
                backoff = self.rng.uniform(
                    0, min(RETRY_BACKOFF_BASE * 2 ** (attempt - 1), RETRY_BACKOFF_MAX)
                )
                await asyncio.sleep(backoff)
            finally:
                cluster.breaker.retries -= 1
            del last_flag

    def _can_retry(
        self,
        retry: RetryPolicy,
        attempt: int,
        body: ReplayableBody,
        deadline: float | None,
        now: float,
    ) -> bool:
        return (
            attempt <= retry.attempts and body.replayable and (deadline is None or now < deadline)
        )

    def _retriable(
        self, retry: RetryPolicy, status: int, grpc_status: str | None, kind: str
    ) -> bool:
        on = retry.retry_on
        if kind:  # no response
            if kind == "connect-failure" and (
                "connect-failure" in on or "5xx" in on or "gateway-error" in on or "reset" in on
            ):
                return True
            if kind == "refused-stream" and (
                "refused-stream" in on or "5xx" in on or "reset" in on
            ):
                return True
            if kind == "timeout":
                return bool(on & {"5xx", "gateway-error", "reset"})
            return bool(on & {"5xx", "reset", "gateway-error"}) and kind == "reset"
        if "5xx" in on and status >= 500:
            return True
        if "gateway-error" in on and status in (502, 503, 504):
            return True
        if "retriable-4xx" in on and status == 409:
            return True
        if "retriable-status-codes" in on and status in retry.codes:
            return True
        return grpc_status is not None and any(GRPC_RETRY.get(k) == grpc_status for k in on)

    # ---- mirroring ----

    async def _mirror(
        self,
        view: WaypointView,
        mirror: MirrorTarget,
        head: RequestHead,
        body: ReplayableBody,
        port: int,
        protocol: str,
    ) -> None:
        """Send a copy (authority with `-shadow`) once the request body is complete; the
        response is read and dropped."""
        if not await body.drain(self.settings.mirror_timeout):
            log.debug("mirror of %s skipped: request body not replayable", head.path)
            return
        shadow = RequestHead(
            head.method,
            head.path,
            router.shadow_authority(head.authority),
            head.scheme,
            list(head.headers),
            head.protocol,
        )
        cluster = self.cluster(view, mirror.cluster, mirror.cluster.port or port)
        ep = cluster.choose(asyncio.get_running_loop().time())
        if ep is None:
            return
        data = body.data()

        async def once() -> AsyncIterator[bytes]:
            if data:
                yield data

        try:
            async with asyncio.timeout(self.settings.mirror_timeout):
                ex = await self.upstreams.exchange(
                    cluster, ep, protocol, shadow, once(), len(data), lambda: body.trailers
                )
                async for _ in ex.body:
                    pass
        except (UpstreamError, BodyClosed, TimeoutError) as e:
            log.debug("mirror to %s failed: %s", ep.key, e)


def _header_map(headers: HeaderList) -> dict[str, tuple[str, ...]]:
    out: dict[str, list[str]] = {}
    for k, v in headers:
        out.setdefault(k, []).append(v)
    return {k: tuple(v) for k, v in out.items()}


def _uuid() -> str:
    h = secrets.token_hex(16)
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-a{h[17:20]}-{h[20:]}"


def _grpc_status(code: int, message: str) -> Response:
    """A gRPC trailers-only response."""
    return Response(
        ResponseHead(
            200,
            [
                ("content-type", "application/grpc"),
                ("grpc-status", str(code)),
                ("grpc-message", message),
            ],
        ),
        BodyChannel.of(b""),
    )


def _error(
    status: int,
    text: str,
    grpc: bool = False,
    grpc_code: str = "2",
    extra: HeaderList | None = None,
) -> Response:
    if grpc:
        r = _grpc_status(int(grpc_code), text)
        r.head.headers.extend(extra or [])
        return r
    return Response.simple(status, text, extra)
