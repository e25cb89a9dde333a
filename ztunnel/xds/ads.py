"""The delta ADS client as a state machine without I/O: responses in, ACK/NACK requests and
resource changes out, time passed in.

It follows Envoy's incremental xDS protocol (envoy api docs, "xDS REST and gRPC protocol",
incremental variant) as Istio's ztunnel uses it (istio/ztunnel src/xds/client.rs): one
wildcard subscription per type, every response answered with its nonce (ACK) or with an
`error_detail` naming the resources that failed to convert (NACK) while the good ones are
applied, removals by name, and on reconnect `initial_resource_versions` with what we hold so
istiod sends only what changed. Rejected resources are not recorded as held, so istiod re-sends
them. The held resources survive a disconnection: the agent serves the last good state.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import any_pb2

from ztunnel.errors import ZtunnelError
from ztunnel.xds.gen.envoy.config.core.v3 import base_pb2
from ztunnel.xds.gen.envoy.service.discovery.v3 import discovery_pb2 as dpb

# google.rpc.Code INVALID_ARGUMENT: what a NACK's error_detail carries.
INVALID_ARGUMENT = 3
MAX_ERROR_DETAIL = 16 * 1024  # bytes of NACK text sent back; the full list stays local

Converter = Callable[[any_pb2.Any], Any]


@dataclass(frozen=True, slots=True)
class Rejection:
    name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.name}: {self.reason}"


@dataclass
class TypeState:
    """What we hold of one resource type and how its last exchanges went."""

    type_url: str
    resources: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    synced: bool = False
    responses: int = 0
    acks: int = 0
    nacks: int = 0
    last_ack: tuple[str, dt.datetime] | None = None  # (nonce, when)
    last_nack: tuple[str, dt.datetime, str] | None = None  # (nonce, when, why)
    rejected: dict[str, str] = field(default_factory=dict)  # name -> reason, current ones

    def status(self) -> dict[str, Any]:
        return {
            "type_url": self.type_url,
            "resources": len(self.resources),
            "synced": self.synced,
            "responses": self.responses,
            "acks": self.acks,
            "nacks": self.nacks,
            "last_ack": {"nonce": self.last_ack[0], "at": self.last_ack[1].isoformat()}
            if self.last_ack
            else None,
            "last_nack": {
                "nonce": self.last_nack[0],
                "at": self.last_nack[1].isoformat(),
                "error": self.last_nack[2],
            }
            if self.last_nack
            else None,
            "rejected": dict(sorted(self.rejected.items())),
        }


@dataclass(frozen=True, slots=True)
class Reaction:
    """What one response led to: the request to send back and whether resources changed."""

    reply: dpb.DeltaDiscoveryRequest
    changed: bool
    rejected: tuple[Rejection, ...] = ()

    @property
    def acked(self) -> bool:
        return not self.reply.HasField("error_detail")


class ProtocolError(ZtunnelError):
    """istiod broke the protocol in a way that no NACK can express."""


class DeltaAdsClient:
    """Subscriptions, held resources and nonces of one agent across connections."""

    def __init__(self, node: base_pb2.Node, converters: Mapping[str, Converter]) -> None:
        self.node = node
        self.converters = dict(converters)
        self.types = {t: TypeState(t) for t in self.converters}

    def initial_requests(self) -> list[dpb.DeltaDiscoveryRequest]:
        """The first request of each type on a new stream: a wildcard subscription (no names),
        the node, and the versions of what we already hold."""
        out = []
        for type_url, st in self.types.items():
            req = dpb.DeltaDiscoveryRequest(type_url=type_url)
            req.node.CopyFrom(self.node)
            for name, version in st.versions.items():
                req.initial_resource_versions[name] = version
            out.append(req)
        return out

    @property
    def synced(self) -> bool:
        """Every type has had its first response (the first complete sync)."""
        return all(st.synced for st in self.types.values())

    def receive(self, resp: dpb.DeltaDiscoveryResponse, now: dt.datetime) -> Reaction:
        st = self.types.get(resp.type_url)
        reply = dpb.DeltaDiscoveryRequest(type_url=resp.type_url, response_nonce=resp.nonce)
        if st is None:
            reply.error_detail.code = INVALID_ARGUMENT
            reply.error_detail.message = f"type {resp.type_url!r} was not subscribed"
            return Reaction(reply, False)
        st.responses += 1
        convert = self.converters[resp.type_url]
        rejected: list[Rejection] = []
        changed = False
        for res in resp.resources:
            name = res.name
            if not name:
                rejected.append(Rejection("<unnamed>", "resource has no name"))
                continue
            try:
                if not res.HasField("resource"):
                    raise ZtunnelError("resource has no body")
                value = convert(res.resource)
            except Exception as e:  # a converter's bug must not take the stream down either
                if not isinstance(e, ZtunnelError):
                    e = ZtunnelError(f"cannot convert ({type(e).__name__}: {e})")
                rejected.append(Rejection(name, str(e)))
                st.rejected[name] = str(e)
                # Not held: an old good version stays in use, but we do not claim to hold
                # this version, so istiod re-sends it on reconnect.
                st.versions.pop(name, None)
                continue
            st.rejected.pop(name, None)
            if st.resources.get(name) != value:
                changed = True
            st.resources[name] = value
            st.versions[name] = res.version
        for name in resp.removed_resources:
            st.rejected.pop(name, None)
            st.versions.pop(name, None)
            if st.resources.pop(name, None) is not None:
                changed = True
        st.synced = True
        if rejected:
            st.nacks += 1
            message = "; ".join(str(r) for r in rejected)
            st.last_nack = (resp.nonce, now, message)
            reply.error_detail.code = INVALID_ARGUMENT
            reply.error_detail.message = _truncate(message, MAX_ERROR_DETAIL)
        else:
            st.acks += 1
            st.last_ack = (resp.nonce, now)
        return Reaction(reply, changed, tuple(rejected))

    def resources(self, type_url: str) -> list[Any]:
        """The held resources of a type, in name order (deterministic snapshots)."""
        st = self.types[type_url]
        return [st.resources[n] for n in sorted(st.resources)]

    def status(self) -> list[dict[str, Any]]:
        return [st.status() for st in self.types.values()]


def _truncate(text: str, limit: int) -> str:
    data = text.encode()
    if len(data) <= limit:
        return text
    return data[: limit - 20].decode(errors="ignore") + " ... (truncated)"


def backoff_delays(start: float, cap: float) -> Iterable[float]:
    """Doubling delays from `start` to `cap` (istio/ztunnel: 10 ms .. 15 s); callers jitter."""
    delay = start
    while True:
        yield delay
        delay = min(cap, delay * 2)
