"""Enforcement of L4 authorization on the destination side: an `Authorizer` rebuilt for every
mesh-state snapshot, the per-connection check used by the inbound proxy, and the re-check of
live inbound connections when policies change (now-denied ones are closed, WIRE.md)."""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

from ztunnel.authz import Authorizer, ConnectionAttrs, Decision
from ztunnel.errors import ZtunnelError
from ztunnel.hbone.headers import parse_authority
from ztunnel.identity import SpiffeId
from ztunnel.model import IPAddress, TunnelProtocol
from ztunnel.proxy.context import AuthzRequest, AuthzVerdict
from ztunnel.proxy.records import ConnectionRecord, ConnectionTracker
from ztunnel.state import MeshState, WorkloadStore

log = logging.getLogger(__name__)


def _attrs(req: AuthzRequest) -> ConnectionAttrs:
    return ConnectionAttrs(req.src_identity, req.src_ip, req.dst_ip, req.dst_port, req.dst_workload)


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
                req.src_identity or req.src_ip,
                req.dst_ip,
                req.dst_port,
                "allowed" if d.dry_run_allowed else "denied",
                d.dry_run_policy or "no policy",
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
                log.info(
                    "closing %s:%d -> %s:%d: no longer allowed (%s)",
                    *rec.src,
                    *rec.dst,
                    verdict.reason,
                )
                rec.response_flag = "DENY"
                rec.close(f"denied by updated policy: {verdict.reason}")
                closed += 1
        return closed

    def _request_of(self, rec: ConnectionRecord, state: MeshState) -> AuthzRequest | None:
        dst_ip = ipaddress.ip_address(rec.dst[0])
        wl = state.workload_by_ip(dst_ip)
        if wl is None or wl.node != self.node:
            return None
        return AuthzRequest(
            rec.src_identity, ipaddress.ip_address(rec.src[0]), dst_ip, rec.dst[1], wl
        )


class CheckError(ZtunnelError):
    """`ztunnel ctl check` named something this agent cannot resolve."""


def resolve_source(
    state: MeshState, spec: str, source_ip: str | None
) -> tuple[SpiffeId | None, IPAddress, str]:
    """`--from`: a SPIFFE id, an IP, or a workload (`name` or `namespace/name`).
    Returns (identity or None for plaintext, source IP, description)."""
    ident: SpiffeId | None
    if spec.startswith("spiffe://"):
        try:
            ident = SpiffeId.parse(spec)
        except ZtunnelError as e:
            raise CheckError(str(e)) from None
        ip = _ip(source_ip or "0.0.0.0")
        return ident, ip, f"identity {ident.uri}"
    try:
        ip = ipaddress.ip_address(spec)
    except ValueError:
        ns, _, name = spec.rpartition("/")
        found = [w for w in state.workloads if w.name == name and (not ns or w.namespace == ns)]
        if not found:
            raise CheckError(f"no workload named {spec!r}") from None
        if len(found) > 1:
            names = ", ".join(f"{w.namespace}/{w.name}" for w in found)
            raise CheckError(f"{spec!r} is ambiguous: {names}") from None
        wl = found[0]
        ident = wl.identity if wl.protocol is TunnelProtocol.HBONE else None
        return (
            ident,
            _ip(source_ip) if source_ip else wl.addresses[0],
            f"workload {wl.namespace}/{wl.name}",
        )
    by_ip = state.workload_by_ip(ip)
    if by_ip is None:
        return None, ip, f"{ip} (not in the mesh: plaintext, no identity)"
    ident = by_ip.identity if by_ip.protocol is TunnelProtocol.HBONE else None
    return ident, ip, f"workload {by_ip.namespace}/{by_ip.name} at {ip}"


def _ip(value: str) -> IPAddress:
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise CheckError(f"not an IP address: {value!r}") from None


def explain_check(
    enforcer: PolicyEnforcer, source: str, target: str, source_ip: str | None = None
) -> dict[str, Any]:
    """What `ztunnel ctl check` prints: the resolved request and the explained decision."""
    state = enforcer.store.current
    ident, src_ip, described = resolve_source(state, source, source_ip)
    try:
        dst_ip, dst_port = parse_authority(target)
    except ZtunnelError:
        raise CheckError(f"--to must be ip:port, got {target!r}") from None
    wl = state.workload_by_ip(dst_ip)
    if wl is None:
        raise CheckError(f"{dst_ip} is not a workload in the mesh")
    if wl.node != enforcer.node:
        raise CheckError(
            f"{dst_ip} ({wl.namespace}/{wl.name}) runs on node {wl.node!r}, not "
            f"on {enforcer.node!r}: authorization is checked by the destination's "
            "agent, ask that one"
        )
    attrs = ConnectionAttrs(ident, src_ip, dst_ip, dst_port, wl)
    explanation = enforcer.authorizer.explain(attrs)
    return {
        "source": described,
        "source_identity": ident.uri if ident else None,
        "source_ip": str(src_ip),
        "destination": f"{wl.namespace}/{wl.name} {target}",
        "allowed": enforcer.authorizer.check(attrs).allowed,
        "explanation": explanation.to_dict(),
        "text": explanation.render(),
    }
