"""Endpoint choice without I/O, per cluster (service + subset + port), with Envoy's semantics
as Istio configures it: ROUND_ROBIN, RANDOM, LEAST_REQUEST (power of two choices), and
consistent hashing on a ring (header, cookie, source IP, query parameter); outlier detection
(consecutive 5xx / gateway errors eject a host for baseEjectionTime x times ejected, within
maxEjectionPercent, released at the interval sweeps); circuit-breaker counters. Time is
passed in."""

from __future__ import annotations

import bisect
import functools
import hashlib
import random
from dataclasses import dataclass, field

from ztunnel.meshconfig.destinations import EffectivePolicy
from ztunnel.meshconfig.networking import OutlierDetection
from ztunnel.model import IPAddress, Workload

MAX_EJECTION_TIME = 300.0  # Envoy's max_ejection_time default
GATEWAY_ERRORS = frozenset({502, 503, 504})


@dataclass(frozen=True)
class Endpoint:
    workload: Workload
    address: IPAddress
    port: int

    @functools.cached_property
    def key(self) -> str:  # read several times per request; formatting an address is slow
        return f"{self.address}:{self.port}"


def hash64(data: str) -> int:
    return int.from_bytes(hashlib.blake2b(data.encode(), digest_size=8).digest(), "big")


@dataclass
class _HostHealth:
    consecutive_5xx: int = 0
    consecutive_gateway: int = 0
    ejected_until: float = 0.0
    times_ejected: int = 0


@dataclass
class OutlierDetector:
    config: OutlierDetection
    hosts: dict[str, _HostHealth] = field(default_factory=dict)
    last_sweep: float = 0.0
    ejections_total: int = 0

    def ejected(self, key: str, now: float) -> bool:
        h = self.hosts.get(key)
        return h is not None and h.ejected_until > now

    def sweep(self, now: float) -> None:
        """At every `interval`: release hosts whose ejection ran out; a host that stayed
        healthy for an interval has its ejection multiplier lowered (Envoy)."""
        if now - self.last_sweep < self.config.interval:
            return
        self.last_sweep = now
        for h in self.hosts.values():
            if h.ejected_until and h.ejected_until <= now:
                h.ejected_until = 0.0
            elif not h.ejected_until and h.times_ejected and not h.consecutive_5xx:
                h.times_ejected -= 1

    def record(self, key: str, status: int, total_hosts: int, now: float) -> bool:
        """One response (status 0: connect failure/reset); True when it ejected the host."""
        cfg = self.config
        h = self.hosts.setdefault(key, _HostHealth())
        failed = status == 0 or status >= 500
        gateway = status == 0 or status in GATEWAY_ERRORS
        h.consecutive_5xx = h.consecutive_5xx + 1 if failed else 0
        h.consecutive_gateway = h.consecutive_gateway + 1 if gateway else 0
        trip = (cfg.consecutive_5xx_errors and h.consecutive_5xx >= cfg.consecutive_5xx_errors) or (
            cfg.consecutive_gateway_errors
            and h.consecutive_gateway >= cfg.consecutive_gateway_errors
        )
        if not trip or h.ejected_until > now:
            return False
        ejected = sum(1 for x in self.hosts.values() if x.ejected_until > now)
        # Envoy: eject only while (ejected + 1) / hosts stays within maxEjectionPercent.
        if total_hosts <= 0 or 100.0 * (ejected + 1) / total_hosts > cfg.max_ejection_percent:
            return False
        h.times_ejected += 1
        h.ejected_until = now + min(
            cfg.base_ejection_time * h.times_ejected, max(MAX_EJECTION_TIME, cfg.base_ejection_time)
        )
        h.consecutive_5xx = h.consecutive_gateway = 0
        self.ejections_total += 1
        return True


@dataclass
class Breaker:
    """Envoy's circuit-breaker counters for one cluster (None limits: unlimited)."""

    connections: int = 0
    pending: int = 0
    active: int = 0
    retries: int = 0
    overflows: int = 0


class Cluster:
    """The live state of one cluster: endpoints, balancer state, outliers, breakers."""

    def __init__(self, name: str, policy: EffectivePolicy, rng: random.Random) -> None:
        self.name = name
        self.policy = policy
        self.rng = rng
        self.endpoints: list[Endpoint] = []
        self.active: dict[str, int] = {}
        self._rr = 0
        self._ring: tuple[tuple[int, ...], tuple[Endpoint, ...]] | None = None
        self._ring_key: tuple[str, ...] = ()
        od = policy.outlier_detection
        self.outliers = OutlierDetector(od) if od is not None else None
        self.breaker = Breaker()

    def update(self, policy: EffectivePolicy, endpoints: list[Endpoint]) -> None:
        if policy != self.policy:
            self.policy = policy
            od = policy.outlier_detection
            if od is None:
                self.outliers = None
            elif self.outliers is None or self.outliers.config != od:
                self.outliers = OutlierDetector(od)
        self.endpoints = endpoints

    def healthy(self, now: float) -> list[Endpoint]:
        if self.outliers is None:
            return list(self.endpoints)
        self.outliers.sweep(now)
        ok = [e for e in self.endpoints if not self.outliers.ejected(e.key, now)]
        # Istio's minHealthPercent (Envoy's panic threshold): below it, use every host.
        floor = self.outliers.config.min_health_percent
        if floor and self.endpoints and 100.0 * len(ok) / len(self.endpoints) < floor:
            return list(self.endpoints)
        return ok

    def choose(
        self, now: float, hash_key: str | None = None, exclude: frozenset[str] = frozenset()
    ) -> Endpoint | None:
        hosts = self.healthy(now)
        if exclude and len(hosts) > len(exclude):
            hosts = [h for h in hosts if h.key not in exclude] or hosts
        if not hosts:
            return None
        lb = self.policy.load_balancer
        if lb.consistent_hash is not None:
            if hash_key is None:
                return self.rng.choice(hosts)
            return self._ring_pick(hosts, hash64(hash_key))
        if lb.simple == "ROUND_ROBIN":
            self._rr = (self._rr + 1) % len(hosts)
            return hosts[self._rr]
        if lb.simple == "RANDOM" or len(hosts) == 1:
            return self.rng.choice(hosts)
        a, b = self.rng.sample(hosts, 2)
        return a if self.active.get(a.key, 0) <= self.active.get(b.key, 0) else b

    def _ring_pick(self, hosts: list[Endpoint], h: int) -> Endpoint:
        key = tuple(e.key for e in hosts)
        if self._ring is None or key != self._ring_key:
            assert self.policy.load_balancer.consistent_hash is not None
            size = max(self.policy.load_balancer.consistent_hash.ring_size, len(hosts))
            per = max(1, size // len(hosts))
            points = sorted((hash64(f"{e.key}_{i}"), e) for e in hosts for i in range(per))
            self._ring = (tuple(p for p, _ in points), tuple(e for _, e in points))
            self._ring_key = key
        hashes, owners = self._ring
        i = bisect.bisect_left(hashes, h) % len(hashes)
        return owners[i]

    def started(self, ep: Endpoint) -> None:
        self.active[ep.key] = self.active.get(ep.key, 0) + 1

    def finished(self, ep: Endpoint, status: int, now: float) -> bool:
        """Record the outcome (status 0 = connect failure or reset); True when the host was
        ejected by it."""
        self.active[ep.key] = max(0, self.active.get(ep.key, 0) - 1)
        if self.outliers is None:
            return False
        return self.outliers.record(ep.key, status, len(self.endpoints), now)
