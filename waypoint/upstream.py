"""Connections toward destinations, pooled per endpoint and protocol, with Envoy's circuit
breakers per cluster: at most `maxConnections` connections, then requests wait as pending
(at most `http1MaxPendingRequests`), at most `http2MaxRequests` requests in flight; an
overflow is answered 503 with the flag UO. HTTP/1.1 connections are reused for sequential
requests (up to `maxRequestsPerConnection`); HTTP/2 connections carry concurrent streams.
How a connection is opened (HBONE to the endpoint's node agent) is the `Connector`'s job."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterable, Awaitable, Callable
from dataclasses import dataclass, field

from waypoint.balancer import Cluster, Endpoint
from waypoint.http.errors import UpstreamError
from waypoint.http.h1 import H1ClientConnection
from waypoint.http.h2conn import H2Session
from waypoint.http.messages import BodyChannel, HeaderList, RequestHead, ResponseHead
from waypoint.http.streams import ByteStream
from ztunnel.meshconfig.networking import ConnectionPool

log = logging.getLogger(__name__)

Connector = Callable[[Endpoint], Awaitable[ByteStream]]


class Overflow(UpstreamError):
    def __init__(self, message: str) -> None:
        super().__init__("overflow", message)


@dataclass
class _Pool:
    h1_idle: list[H1ClientConnection] = field(default_factory=list)
    h2: list[H2Session] = field(default_factory=list)
    open: int = 0  # connections of this endpoint, idle or busy


def _may_open(cluster: Cluster, pool: _Pool, limits: ConnectionPool) -> bool:
    """Under the cluster's connection limit; and, as Envoy does, always when this endpoint
    has no connection at all (else its pending requests could never be served)."""
    return (
        limits.max_connections is None
        or cluster.breaker.connections < limits.max_connections
        or pool.open == 0
    )


@dataclass
class Exchange:
    """A request in flight upstream: the response head, its body, and how to finish."""

    head: ResponseHead
    body: BodyChannel
    endpoint: Endpoint
    finish: Callable[[], None]


class Upstreams:
    def __init__(self, connector: Connector) -> None:
        self.connector = connector
        self.pools: dict[tuple[str, str], _Pool] = {}
        self._changed: dict[str, asyncio.Event] = {}
        self.connections_opened = 0

    def _event(self, cluster: Cluster) -> asyncio.Event:
        return self._changed.setdefault(cluster.name, asyncio.Event())

    def _notify(self, cluster: Cluster) -> None:
        ev = self._event(cluster)
        ev.set()
        self._changed[cluster.name] = asyncio.Event()

    async def _open(
        self, cluster: Cluster, pool: _Pool, ep: Endpoint, limits: ConnectionPool
    ) -> ByteStream:
        # Counted from the start of the dial, so that concurrent requests see it.
        cluster.breaker.connections += 1
        pool.open += 1
        try:
            async with asyncio.timeout(limits.connect_timeout):
                stream = await self.connector(ep)
        except BaseException as e:
            cluster.breaker.connections -= 1
            pool.open -= 1
            if isinstance(e, TimeoutError):
                raise UpstreamError("connect-failure", f"connect to {ep.key} timed out") from None
            if isinstance(e, UpstreamError) or not isinstance(e, Exception):
                raise
            raise UpstreamError("connect-failure", f"connect to {ep.key} failed: {e}") from None
        self.connections_opened += 1
        return stream

    async def exchange(
        self,
        cluster: Cluster,
        ep: Endpoint,
        protocol: str,
        head: RequestHead,
        body: AsyncIterable[bytes],
        length: int | None,
        trailers: Callable[[], HeaderList],
    ) -> Exchange:
        limits = cluster.policy.connection_pool
        b = cluster.breaker
        if limits.http2_max_requests is not None and b.active >= limits.http2_max_requests:
            b.overflows += 1
            raise Overflow(f"{cluster.name}: {b.active} requests in flight (http2MaxRequests)")
        b.active += 1
        try:
            if protocol == "h2":
                return await self._h2(cluster, ep, head, body, length, trailers, limits)
            return await self._h1(cluster, ep, head, body, length, trailers, limits)
        except BaseException:
            b.active -= 1
            raise

    async def _wait_pending(self, cluster: Cluster, limits: ConnectionPool) -> None:
        b = cluster.breaker
        if (
            limits.http1_max_pending_requests is not None
            and b.pending >= limits.http1_max_pending_requests
        ):
            b.overflows += 1
            raise Overflow(
                f"{cluster.name}: {b.pending} requests pending (http1MaxPendingRequests)"
            )
        b.pending += 1
        try:
            async with asyncio.timeout(limits.connect_timeout):
                await self._event(cluster).wait()
        except TimeoutError:
            raise UpstreamError(
                "overflow", f"{cluster.name}: no connection became free in time"
            ) from None
        finally:
            b.pending -= 1

    async def _h1(
        self,
        cluster: Cluster,
        ep: Endpoint,
        head: RequestHead,
        body: AsyncIterable[bytes],
        length: int | None,
        trailers: Callable[[], HeaderList],
        limits: ConnectionPool,
    ) -> Exchange:
        pool = self.pools.setdefault((ep.key, "h1"), _Pool())
        while True:
            while pool.h1_idle:
                c = pool.h1_idle.pop()
                if c.reusable:
                    conn = c
                    break
                self._closed(cluster, c, pool)
            else:
                if _may_open(cluster, pool, limits):
                    conn = H1ClientConnection(await self._open(cluster, pool, ep, limits))
                else:
                    await self._wait_pending(cluster, limits)
                    continue
            break
        try:
            response, channel = await conn.request(head, body, length, trailers)
        except UpstreamError:
            self._closed(cluster, conn, pool)
            self._notify(cluster)
            raise

        def finish() -> None:
            cluster.breaker.active -= 1
            over = (
                limits.max_requests_per_connection is not None
                and conn.requests >= limits.max_requests_per_connection
            )
            if conn.reusable and not over:
                pool.h1_idle.append(conn)
            else:
                self._closed(cluster, conn, pool)
            self._notify(cluster)

        channel.add_done_callback(finish)
        return Exchange(response, channel, ep, finish=lambda: None)

    def _closed(self, cluster: Cluster, conn: H1ClientConnection, pool: _Pool) -> None:
        conn.close()
        cluster.breaker.connections -= 1
        pool.open -= 1

    async def _h2(
        self,
        cluster: Cluster,
        ep: Endpoint,
        head: RequestHead,
        body: AsyncIterable[bytes],
        length: int | None,
        trailers: Callable[[], HeaderList],
        limits: ConnectionPool,
    ) -> Exchange:
        pool = self.pools.setdefault((ep.key, "h2"), _Pool())
        per_conn = limits.max_requests_per_connection
        while True:
            session = next(
                (s for s in pool.h2 if s.available and (per_conn is None or s.requests < per_conn)),
                None,
            )
            if session is not None:
                break
            if _may_open(cluster, pool, limits):
                stream = await self._open(cluster, pool, ep, limits)
                session = H2Session(stream, client=True)
                await session.start()
                pool.h2.append(session)
                watcher = asyncio.ensure_future(self._watch_h2(cluster, pool, session))
                _tasks.add(watcher)
                watcher.add_done_callback(_tasks.discard)
                break
            await self._wait_pending(cluster, limits)
        response, channel, sid = await session.request(head, body, length, trailers)

        def finish() -> None:
            cluster.breaker.active -= 1
            self._notify(cluster)

        channel.add_done_callback(finish)
        del sid
        return Exchange(response, channel, ep, finish=lambda: None)

    async def _watch_h2(self, cluster: Cluster, pool: _Pool, session: H2Session) -> None:
        await session.closed.wait()
        with contextlib.suppress(ValueError):
            pool.h2.remove(session)
        cluster.breaker.connections -= 1
        pool.open -= 1
        self._notify(cluster)

    def close(self) -> None:
        for pool in self.pools.values():
            for c in pool.h1_idle:
                c.close()
            for s in pool.h2:
                s.close()
        self.pools.clear()


_tasks: set[asyncio.Task[None]] = set()
