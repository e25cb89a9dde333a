"""Enforcement of L4 authorization on the destination side: an `Authorizer` rebuilt for every
mesh-state snapshot, the per-connection check used by the inbound proxy, and the re-check of
live inbound connections when policies change (now-denied ones are closed, WIRE.md)."""

from __future__ import annotations

import ipaddress
import logging

from ztunnel.authz import Authorizer, ConnectionAttrs, Decision
from ztunnel.proxy.context import AuthzRequest, AuthzVerdict
from ztunnel.proxy.records import ConnectionRecord, ConnectionTracker
from ztunnel.state import MeshState, WorkloadStore

log = logging.getLogger(__name__)


def _attrs(req: AuthzRequest) -> ConnectionAttrs:
    return ConnectionAttrs(req.src_identity, req.src_ip, req.dst_ip, req.dst_port,
                           req.dst_workload)


class PolicyEnforcer:
    def __init__(self, store: WorkloadStore, tracker: ConnectionTracker, node: str) -> None:
        self.store = store
        self.tracker = tracker
        self.node = node
        self.authorizer = Authorizer(store.current.policies)
        store.subscribe(self._on_state)

    def decide(self, req: AuthzRequest) -> Decision:
        return self.authorizer.check(_attrs(req))

    def authorize(self, req: AuthzRequest) -> AuthzVerdict:
        d = self.decide(req)
        if d.dry_run_policy is not None or d.dry_run_applicable:
            log.info(
                "dry-run authorization for %s -> %s:%d: would be %s (%s)",
                req.src_identity or req.src_ip, req.dst_ip, req.dst_port,
                "allowed" if d.dry_run_allowed else "denied", d.dry_run_policy or "no policy",
            )
        reason = f"{d.reason.value}" + (f" by {d.policy}" if d.policy else "")
        return AuthzVerdict(d.allowed, reason)

    def _on_state(self, old: MeshState, new: MeshState) -> None:
        if old.policies == new.policies and old.workloads == new.workloads:
            return
        self.authorizer = Authorizer(new.policies)
        self.recheck(new)

    def recheck(self, state: MeshState) -> int:
        """Close live inbound connections that the current policies deny; returns how many."""
        closed = 0
        for rec in list(self.tracker.live.values()):
            if rec.direction != "inbound":
                continue
            req = self._request_of(rec, state)
            if req is None:
                continue
            verdict = self.authorize(req)
            if not verdict.allowed:
                log.info("closing %s:%d -> %s:%d: no longer allowed (%s)", *rec.src, *rec.dst,
                         verdict.reason)
                rec.response_flag = "DENY"
                rec.close(f"denied by updated policy: {verdict.reason}")
                closed += 1
        return closed

    def _request_of(self, rec: ConnectionRecord, state: MeshState) -> AuthzRequest | None:
        dst_ip = ipaddress.ip_address(rec.dst[0])
        wl = state.workload_by_ip(dst_ip)
        if wl is None or wl.node != self.node:
            return None
        return AuthzRequest(rec.src_identity, ipaddress.ip_address(rec.src[0]), dst_ip,
                            rec.dst[1], wl)
