"""The xDS connection to istiod over grpcio's asyncio API: TLS verified against the mesh root,
`authorization: Bearer` + `clusterid` on every stream, reconnect with jittered back-off, and
every accepted change turned into a new `MeshState` in the `WorkloadStore` (the same model and
authorization engine as the local file, so live inbound connections are re-checked).

The protocol itself is `ztunnel.xds.ads.DeltaAdsClient`; this module only moves its messages.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf import struct_pb2
from prometheus_client import Counter
from prometheus_client.registry import CollectorRegistry

from ztunnel.authz.policy import AuthorizationPolicy
from ztunnel.errors import ZtunnelError
from ztunnel.model import Service, Workload
from ztunnel.state import MeshState, WorkloadStore
from ztunnel.xds import convert
from ztunnel.xds.ads import DeltaAdsClient, Reaction
from ztunnel.xds.config import Endpoint, IstiodConfig, RootCertSource
from ztunnel.xds.gen.envoy.config.core.v3 import base_pb2
from ztunnel.xds.gen.envoy.service.discovery.v3 import discovery_pb2 as dpb
from ztunnel.xds.gen.envoy.service.discovery.v3 import discovery_pb2_grpc as dgrpc

log = logging.getLogger(__name__)

BACKOFF_START = 0.01  # istio/ztunnel src/xds/client.rs: 10 ms .. 15 s
BACKOFF_MAX = 15.0
MAX_MESSAGE = 200 * 1024 * 1024  # ztunnel's max decoding size for xDS responses
CONNECT_TIMEOUT = 10.0
KEEPALIVE_MS = 30_000  # HTTP/2 PING on the stream: notices an istiod that vanished silently
KEEPALIVE_TIMEOUT_MS = 10_000
SEND_QUEUE = 64

# Termination reasons as istio/ztunnel reports them (src/xds/metrics.rs).
CONNECTION_ERROR, ERROR, RECONNECT, COMPLETE = "ConnectionError", "Error", "Reconnect", "Complete"
# Codes after which istio/ztunnel reconnects at once: the server ended a healthy stream.
_RECONNECT_CODES = {
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}


def channel_options(endpoint: Endpoint, alt_hostname: str) -> list[tuple[str, Any]]:
    opts: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.keepalive_time_ms", KEEPALIVE_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 0),
        # Our own back-off governs reconnects; do not let the channel add its own delays.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
        ("grpc.enable_retries", 0),
    ]
    if alt_hostname:
        opts.append(("grpc.ssl_target_name_override", alt_hostname))
    return opts


def secure_channel(endpoint: Endpoint, root: RootCertSource, alt_hostname: str) -> grpc.aio.Channel:
    """A TLS channel that trusts only `root` (re-read now: a rotated root file is picked up)."""
    creds = grpc.ssl_channel_credentials(root_certificates=root.load())
    return grpc.aio.secure_channel(
        endpoint.target, creds, options=channel_options(endpoint, alt_hostname)
    )


def build_node(cfg: IstiodConfig) -> base_pb2.Node:
    node = base_pb2.Node(id=cfg.node_id)
    meta = struct_pb2.Struct()
    meta.update(dict(cfg.node_metadata))
    node.metadata.CopyFrom(meta)
    return node


def mesh_state(ads: DeltaAdsClient) -> MeshState:
    addresses = ads.resources(convert.ADDRESS_TYPE)
    workloads = [a for a in addresses if isinstance(a, Workload)]
    services = [a for a in addresses if isinstance(a, Service)]
    policies: list[AuthorizationPolicy] = ads.resources(convert.AUTHORIZATION_TYPE)
    return MeshState.build(workloads, services, policies)


class XdsMetrics:
    """istio/ztunnel's xDS metrics (src/xds/metrics.rs) under the `istio_` prefix."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.messages = Counter(
            "istio_xds_message", "Total number of messages received", ["url"], registry=registry
        )
        self.message_bytes = Counter(
            "istio_xds_message_bytes",
            "Total number of bytes received",
            ["url"],
            registry=registry,
        )
        self.terminations = Counter(
            "istio_xds_connection_terminations",
            "The total number of completed connections to xds server",
            ["reason"],
            registry=registry,
        )


class XdsClient:
    """Keeps one delta ADS stream to istiod open and feeds the store from it."""

    def __init__(
        self,
        cfg: IstiodConfig,
        store: WorkloadStore,
        registry: CollectorRegistry,
        rng: random.Random | None = None,
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        if cfg.xds is None:
            raise ZtunnelError("no xDS address configured")
        self.cfg = cfg
        self.endpoint: Endpoint = cfg.xds
        self.store = store
        self.metrics = XdsMetrics(registry)
        self._rng = rng or random.Random()
        self._now = now
        self.ads = DeltaAdsClient(
            build_node(cfg),
            {
                convert.ADDRESS_TYPE: convert.address_from_any,
                convert.AUTHORIZATION_TYPE: convert.policy_from_any,
            },
        )
        self.connected_since: dt.datetime | None = None
        self.connections = 0
        self.last_error: str | None = None
        self.last_disconnect: dt.datetime | None = None
        self.synced = asyncio.Event()
        self._stopping = False

    # ---- what the admin API and readiness read ----

    def pending(self) -> list[str]:
        if self.ads.synced:
            return []
        waiting = ", ".join(
            t.removeprefix(convert.TYPE_PREFIX) for t, st in self.ads.types.items() if not st.synced
        )
        err = f" (last error: {self.last_error})" if self.last_error else ""
        return [f"xds: waiting for the first {waiting} from istiod at {self.endpoint}{err}"]

    def status(self) -> dict[str, Any]:
        return {
            "address": str(self.endpoint),
            "node_id": self.cfg.node_id,
            "connected": self.connected_since is not None,
            "connected_since": self.connected_since.isoformat() if self.connected_since else None,
            "connections": self.connections,
            "last_disconnect": self.last_disconnect.isoformat() if self.last_disconnect else None,
            "last_error": self.last_error,
            "synced": self.ads.synced,
            "types": self.ads.status(),
        }

    # ---- the connection loop ----

    async def run(self) -> None:
        """Connect, serve, reconnect with jittered back-off; returns only when cancelled."""
        backoff = BACKOFF_START
        while not self._stopping:
            reason, healthy = await self._connect_once()
            reraise_cancellation()
            self.metrics.terminations.labels(reason).inc()
            if healthy or reason in (RECONNECT, COMPLETE):
                backoff = BACKOFF_START
            else:
                backoff = min(BACKOFF_MAX, backoff * 2)
            delay = backoff * self._rng.uniform(0.5, 1.0)
            log.log(
                logging.INFO if healthy else logging.WARNING,
                "xds stream to %s ended (%s: %s); reconnecting in %.3fs",
                self.endpoint,
                reason,
                self.last_error or "-",
                delay,
            )
            await asyncio.sleep(delay)

    async def _connect_once(self) -> tuple[str, bool]:
        """One stream's life. Returns (termination reason, whether a response arrived)."""
        got_response = False
        try:
            metadata = self.cfg.auth_metadata(self.cfg.xds_headers)
            channel = secure_channel(self.endpoint, self.cfg.xds_root, self.cfg.alt_xds_hostname)
        except ZtunnelError as e:
            self.last_error = str(e)
            return CONNECTION_ERROR, False
        outbox: asyncio.Queue[dpb.DeltaDiscoveryRequest] = asyncio.Queue(SEND_QUEUE)
        for req in self.ads.initial_requests():
            outbox.put_nowait(req)
        try:
            async with channel:
                stub = dgrpc.AggregatedDiscoveryServiceStub(channel)
                call = stub.DeltaAggregatedResources(_drain(outbox), metadata=metadata)
                self.connections += 1
                async for resp in call:
                    if not got_response:
                        got_response = True
                        self.connected_since = self._now()
                        self.last_error = None
                        log.info("xds: connected to istiod at %s", self.endpoint)
                    reaction = self._on_response(resp)
                    await outbox.put(reaction.reply)
            self.last_error = "stream closed by istiod"
            return COMPLETE, got_response
        except grpc.aio.AioRpcError as e:
            reraise_cancellation()
            code = e.code()
            self.last_error = f"{code.name}: {e.details()}"
            if not got_response and code == grpc.StatusCode.UNAVAILABLE:
                return CONNECTION_ERROR, False
            details = e.details() or ""
            if code in _RECONNECT_CODES or (
                code == grpc.StatusCode.UNAVAILABLE
                and ("transport is closing" in details or "goaway" in details.lower())
            ):
                return RECONNECT, got_response
            return ERROR, got_response
        except (OSError, ValueError, ZtunnelError) as e:
            # Whatever else breaks one stream (a channel that cannot be built, a failed write)
            # ends only that stream: the loop reconnects.
            log.exception("xds stream to %s failed", self.endpoint)
            self.last_error = f"{type(e).__name__}: {e}"
            return ERROR, got_response
        finally:
            if self.connected_since is not None:
                self.last_disconnect = self._now()
            self.connected_since = None

    def _on_response(self, resp: dpb.DeltaDiscoveryResponse) -> Reaction:
        self.metrics.messages.labels(resp.type_url).inc()
        self.metrics.message_bytes.labels(resp.type_url).inc(
            sum(len(r.resource.value) for r in resp.resources)
        )
        was_synced = self.ads.synced
        started = time.monotonic()
        reaction = self.ads.receive(resp, self._now())
        if reaction.rejected:
            log.error(
                "xds: rejected %d %s resource(s) from istiod (NACK nonce %s): %s",
                len(reaction.rejected),
                resp.type_url.removeprefix(convert.TYPE_PREFIX),
                resp.nonce,
                "; ".join(str(r) for r in reaction.rejected[:10]),
            )
        if self.ads.synced and (reaction.changed or not was_synced):
            state = mesh_state(self.ads)
            self.store.replace(state)
            log.info(
                "xds: mesh state from istiod: %d workloads, %d services, %d policies (%.1f ms)",
                len(state.workloads),
                len(state.services),
                len(state.policies),
                (time.monotonic() - started) * 1000,
            )
        if self.ads.synced:
            self.synced.set()
        return reaction

    def stop(self) -> None:
        self._stopping = True


def reraise_cancellation() -> None:
    """grpc turns the cancellation of the task awaiting a call into a CANCELLED call error;
    when that task is being cancelled, the cancellation must go on, not become a retry."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def _drain(
    queue: asyncio.Queue[dpb.DeltaDiscoveryRequest],
) -> AsyncIterator[dpb.DeltaDiscoveryRequest]:
    while True:
        yield await queue.get()
