"""What the proxy handlers share: the mesh state, the HBONE pool, the connection tracker, the
authorization check, and the few settings they read. Built by the composition root."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from ztunnel.hbone.pool import HbonePool
from ztunnel.identity import SpiffeId
from ztunnel.model import IPAddress, Workload
from ztunnel.proxy.records import ConnectionTracker
from ztunnel.state import WorkloadStore


@dataclass(frozen=True, slots=True)
class AuthzRequest:
    """What the destination side knows when it decides (WIRE.md, L4 authorization)."""

    src_identity: SpiffeId | None
    src_ip: IPAddress
    dst_ip: IPAddress
    dst_port: int
    dst_workload: Workload


@dataclass(frozen=True, slots=True)
class AuthzVerdict:
    allowed: bool
    reason: str = ""


Authorize = Callable[[AuthzRequest], AuthzVerdict]


def allow_all(_req: AuthzRequest) -> AuthzVerdict:
    return AuthzVerdict(True, "no authorization configured")


@dataclass
class ProxyContext:
    store: WorkloadStore
    node: str
    pool: HbonePool
    tracker: ConnectionTracker
    own_ports: frozenset[int]
    hbone_port: int = 15008
    connect_timeout: float = 10.0
    # Transparent (IP_TRANSPARENT) sockets: upstream connections from the original client IP.
    transparent: bool = False
    # Bind outbound HBONE connections to the source workload's IP (Istio's pool key has it).
    bind_source_ip: bool = True
    authorize: Authorize = allow_all
    # Capture mode: the node's own address and the mark that routes a dial to the agent's own
    # listeners. Same-node HBONE is dialed from the node address with that mark, and the
    # inbound side then trusts the `forwarded` header for the original client address.
    node_ip: IPAddress | None = None
    local_dial_mark: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def local_workload(self, ip: IPAddress) -> Workload | None:
        wl = self.store.current.workload_by_ip(ip)
        if wl is not None and wl.node == self.node:
            return wl
        return None
