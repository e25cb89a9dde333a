"""Why a connection is allowed or denied: a trace of every applicable policy down to the field
that failed, as text for people (`ztunnel ctl check`) and as a JSON-able dict for tools.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ztunnel.authz.policy import (
    AuthorizationPolicy,
    Clause,
    ConnectionAttrs,
    Match,
    Rule,
)

if TYPE_CHECKING:
    from ztunnel.authz.engine import Authorizer, Decision


@dataclass(frozen=True, slots=True)
class MatchTrace:
    """One Match: skipped when empty, else the reasons of each failing field (none: matched)."""

    index: int
    empty: bool
    failed: tuple[str, ...]

    @property
    def matched(self) -> bool:
        return not self.empty and not self.failed

    def to_dict(self) -> dict[str, Any]:
        return {
            "match": self.index,
            "matched": self.matched,
            "empty": self.empty,
            "failed": list(self.failed),
        }


@dataclass(frozen=True, slots=True)
class ClauseTrace:
    index: int
    matches: tuple[MatchTrace, ...]

    @property
    def matched(self) -> bool:
        return not self.matches or any(m.matched for m in self.matches)

    def to_dict(self) -> dict[str, Any]:
        return {
            "clause": self.index,
            "matched": self.matched,
            "matches": [m.to_dict() for m in self.matches],
        }


@dataclass(frozen=True, slots=True)
class RuleTrace:
    index: int
    clauses: tuple[ClauseTrace, ...]

    @property
    def matched(self) -> bool:
        return all(c.matched for c in self.clauses)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.index,
            "matched": self.matched,
            "clauses": [c.to_dict() for c in self.clauses],
        }


@dataclass(frozen=True, slots=True)
class PolicyTrace:
    policy: AuthorizationPolicy
    rules: tuple[RuleTrace, ...]

    @property
    def matched(self) -> bool:
        return any(r.matched for r in self.rules)

    def summary(self) -> str:
        """One line: which rule matched, or why none did."""
        if not self.rules:
            return "no rules: never matches"
        hit = [r.index for r in self.rules if r.matched]
        if hit:
            first = self.rules[hit[0]]
            if not first.clauses:
                return f"rule {first.index} matched (a rule with no clauses matches everything)"
            return f"rule {first.index} matched"
        return "no rule matched"

    def to_dict(self) -> dict[str, Any]:
        p = self.policy
        return {
            "policy": p.key,
            "action": p.action.value,
            "scope": p.scope.value,
            "dryRun": p.dry_run,
            "matched": self.matched,
            "summary": self.summary(),
            "rules": [r.to_dict() for r in self.rules],
        }


def _entries(match: Match, attr: str) -> str:
    return "[" + ", ".join(str(e) for e in getattr(match, attr)) + "]"


def _peer_value(family: str, conn: ConnectionAttrs) -> str | None:
    ident = conn.source_identity
    if family == "namespaces":
        return ident.namespace if ident else None
    if family == "principals":
        return ident.principal if ident else None
    if family == "service_accounts":
        return f"{ident.namespace}/{ident.service_account}" if ident else None
    if family == "source_ips":
        return str(conn.source_ip)
    if family == "destination_ips":
        return str(conn.destination_ip)
    return str(conn.destination_port)


def _describe(match: Match, attr: str, conn: ConnectionAttrs) -> str:
    family = attr.removeprefix("not_")
    value = _peer_value(family, conn)
    if attr == family:
        if value is None:
            return f"{attr}: the peer has no identity (plaintext), so {_entries(match, attr)} fails"
        return f"{attr}: {value} matches none of {_entries(match, attr)}"
    hits = [
        str(e)
        for e, ok in zip(getattr(match, attr), match.entry_matches(attr, conn), strict=True)
        if ok
    ]
    return f"{attr}: {value} matches excluded {', '.join(hits)}"


def trace_match(index: int, match: Match, conn: ConnectionAttrs) -> MatchTrace:
    if match.is_empty():
        return MatchTrace(index, True, ())
    failed = tuple(_describe(match, attr, conn) for attr in match.failing_fields(conn))
    return MatchTrace(index, False, failed)


def trace_clause(index: int, clause: Clause, conn: ConnectionAttrs) -> ClauseTrace:
    return ClauseTrace(index, tuple(trace_match(i, m, conn) for i, m in enumerate(clause)))


def trace_rule(index: int, rule: Rule, conn: ConnectionAttrs) -> RuleTrace:
    return RuleTrace(index, tuple(trace_clause(i, c, conn) for i, c in enumerate(rule)))


def trace_policy(policy: AuthorizationPolicy, conn: ConnectionAttrs) -> PolicyTrace:
    return PolicyTrace(policy, tuple(trace_rule(i, r, conn) for i, r in enumerate(policy.rules)))


@dataclass(frozen=True, slots=True)
class Explanation:
    """The decision for one connection and the trace of every policy that applied."""

    connection: ConnectionAttrs
    decision: Decision
    policies: tuple[PolicyTrace, ...]

    def to_dict(self) -> dict[str, Any]:
        c = self.connection
        return {
            "connection": {
                "sourceIdentity": c.source_identity.uri if c.source_identity else None,
                "sourceIp": str(c.source_ip),
                "destinationIp": str(c.destination_ip),
                "destinationPort": c.destination_port,
                "destinationWorkload": f"{c.destination.namespace}/{c.destination.name}",
            },
            "decision": self.decision.to_dict(),
            "policies": [p.to_dict() for p in self.policies],
        }

    def render(self) -> str:
        c, d = self.connection, self.decision
        peer = c.source_identity.uri if c.source_identity else "no identity (plaintext)"
        lines = [
            f"connection: {c.source_ip} [{peer}] -> {c.destination_ip}:{c.destination_port} "
            f"(workload {c.destination.namespace}/{c.destination.name})",
            f"verdict: {'ALLOW' if d.allowed else 'DENY'}: {d.reason.value}"
            + (f" ({d.policy})" if d.policy else ""),
        ]
        if not self.policies:
            lines.append("no policy applies to this workload")
        else:
            lines.append(f"applicable policies ({len(self.policies)}):")
        for pt in self.policies:
            p = pt.policy
            tag = " dry-run" if p.dry_run else ""
            lines.append(f"  {p.action.value:<5} {p.key} [{p.scope.value}{tag}]: {pt.summary()}")
            if pt.matched:
                continue
            for r in pt.rules:
                for cl in r.clauses:
                    if cl.matched:
                        continue
                    for m in cl.matches:
                        where = f"rule {r.index} clause {cl.index} match {m.index}"
                        if m.empty:
                            lines.append(f"      {where}: empty match (never matches)")
                        for reason in m.failed:
                            lines.append(f"      {where}: {reason}")
        if d.dry_run_allowed is not None:
            would = "ALLOW" if d.dry_run_allowed else "DENY"
            by = f" ({d.dry_run_policy})" if d.dry_run_policy else ""
            lines.append(f"with dry-run policies enforced: {would}{by}")
        if d.unknown:
            lines.append("named by the workload but unknown (skipped): " + ", ".join(d.unknown))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()


def explain(authorizer: Authorizer, conn: ConnectionAttrs) -> Explanation:
    """Decide with the engine, and trace each applicable policy with the plain model matching."""
    decision = authorizer.check(conn)
    traces = tuple(trace_policy(p, conn) for p in authorizer.applicable(conn.destination))
    return Explanation(conn, decision, traces)


__all__ = [
    "ClauseTrace",
    "Explanation",
    "MatchTrace",
    "PolicyTrace",
    "RuleTrace",
    "explain",
]
