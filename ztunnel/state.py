"""The mesh state as one immutable, indexed snapshot, and the store that swaps snapshots.

Readers take `store.current` once per decision, so a reload never shows them half a state.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ztunnel.model import IPAddress, Service, Workload, WorkloadStatus


@dataclass(frozen=True)
class MeshState:
    """Workloads, services and policies, indexed by the keys the data path looks up."""

    workloads: tuple[Workload, ...] = ()
    services: tuple[Service, ...] = ()
    policies: tuple[Any, ...] = ()
    by_uid: dict[str, Workload] = field(default_factory=dict, compare=False, repr=False)
    by_ip: dict[IPAddress, Workload] = field(default_factory=dict, compare=False, repr=False)
    by_key: dict[str, Service] = field(default_factory=dict, compare=False, repr=False)
    by_vip: dict[IPAddress, Service] = field(default_factory=dict, compare=False, repr=False)
    endpoints: dict[str, tuple[Workload, ...]] = field(
        default_factory=dict, compare=False, repr=False
    )

    @classmethod
    def build(
        cls,
        workloads: Iterable[Workload] = (),
        services: Iterable[Service] = (),
        policies: Iterable[Any] = (),
    ) -> MeshState:
        wl = tuple(workloads)
        sv = tuple(services)
        state = cls(wl, sv, tuple(policies))
        for w in wl:
            state.by_uid[w.uid] = w
            for ip in w.addresses:
                state.by_ip[ip] = w
        eps: dict[str, list[Workload]] = {}
        for w in wl:
            for key in w.services:
                eps.setdefault(key, []).append(w)
        for s in sv:
            state.by_key[s.key] = s
            for vip in s.vips:
                state.by_vip[vip.address] = s
        state.endpoints.update({k: tuple(v) for k, v in eps.items()})
        return state

    def workload_by_ip(self, ip: IPAddress | str) -> Workload | None:
        return self.by_ip.get(ipaddress.ip_address(ip) if isinstance(ip, str) else ip)

    def service_by_vip(self, ip: IPAddress | str) -> Service | None:
        return self.by_vip.get(ipaddress.ip_address(ip) if isinstance(ip, str) else ip)

    def service_by_hostname(self, namespace: str, hostname: str) -> Service | None:
        return self.by_key.get(f"{namespace}/{hostname}")

    def local_workloads(self, node: str) -> list[Workload]:
        return [w for w in self.workloads if w.node == node]

    def healthy_endpoints(self, service: Service) -> list[Workload]:
        return [
            w for w in self.endpoints.get(service.key, ()) if w.status is WorkloadStatus.HEALTHY
        ]

    def pick_endpoint(self, service: Service, rng: random.Random | None = None) -> Workload | None:
        """A random healthy endpoint of the service, or None when it has none."""
        candidates = self.healthy_endpoints(service)
        if not candidates:
            return None
        return (rng or random).choice(candidates)


Listener = Callable[[MeshState, MeshState], None]


class WorkloadStore:
    """Holds the current `MeshState`; tells subscribers (old, new) when it is replaced."""

    def __init__(self, initial: MeshState | None = None) -> None:
        self._state = initial or MeshState()
        self._listeners: list[Listener] = []
        self.loaded = initial is not None
        self.last_error: str | None = None

    @property
    def current(self) -> MeshState:
        return self._state

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def replace(self, state: MeshState) -> None:
        old, self._state = self._state, state
        self.loaded = True
        self.last_error = None
        for listener in list(self._listeners):
            listener(old, state)

    def record_error(self, message: str) -> None:
        """A reload failed: keep the current state, remember why (shown by readiness/admin)."""
        self.last_error = message
