"""The L4 decision engine: policies compiled and indexed once per snapshot, one `check` per
connection.

Policies are indexed by scope (GLOBAL list, NAMESPACE lists per namespace, everything by key
for the names a workload carries), so a decision only looks at the policies that apply to the
destination workload, never at the whole store. The order and meaning of the checks follow
shared/WIRE.md ("L4 authorization semantics") and istio/ztunnel `assert_rbac` (src/state.rs).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ztunnel.authz.explain import Explanation, explain
from ztunnel.authz.policy import (
    Action,
    AuthorizationPolicy,
    ConnectionAttrs,
    IPNetwork,
    Match,
    Scope,
    StringMatch,
    StringMatchKind,
)
from ztunnel.model import Workload


class DecisionReason(enum.Enum):
    """Which step of the evaluation order decided."""

    DENY_MATCHED = "a DENY policy matched"
    NO_ALLOW_POLICIES = "no ALLOW policy applies"
    ALLOW_MATCHED = "an ALLOW policy matched"
    NO_ALLOW_MATCHED = "ALLOW policies apply but none matched"


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of authorizing one connection.

    `policy` is the key of the policy that decided (None when the verdict came from the
    absence of ALLOW policies or of a matching one). `applicable` and `matched` list enforced
    (non dry-run) policy keys, sorted. Dry-run policies never change `allowed`: `dry_run_allowed`
    is the verdict had they been enforced too (None when no dry-run policy applies).
    `unknown` names policies the workload lists but the store does not hold; they are skipped,
    as istio/ztunnel does.
    """

    allowed: bool
    reason: DecisionReason
    policy: str | None
    applicable: tuple[str, ...]
    matched: tuple[str, ...]
    dry_run_applicable: tuple[str, ...] = ()
    dry_run_matched: tuple[str, ...] = ()
    dry_run_allowed: bool | None = None
    dry_run_policy: str | None = None
    unknown: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "allowed": self.allowed,
            "reason": self.reason.value,
            "policy": self.policy,
            "applicable": list(self.applicable),
            "matched": list(self.matched),
            "dryRun": {
                "applicable": list(self.dry_run_applicable),
                "matched": list(self.dry_run_matched),
                "allowed": self.dry_run_allowed,
                "policy": self.dry_run_policy,
            },
            "unknown": list(self.unknown),
        }


def verdict(
    deny_matched: Sequence[str], any_allow: bool, allow_matched: Sequence[str]
) -> tuple[bool, DecisionReason, str | None]:
    """The evaluation order: a matching DENY denies; else no ALLOW allows; else a matching
    ALLOW allows; else deny. Inputs are keys in a stable (sorted) order."""
    if deny_matched:
        return False, DecisionReason.DENY_MATCHED, deny_matched[0]
    if not any_allow:
        return True, DecisionReason.NO_ALLOW_POLICIES, None
    if allow_matched:
        return True, DecisionReason.ALLOW_MATCHED, allow_matched[0]
    return False, DecisionReason.NO_ALLOW_MATCHED, None


# --- compiled form -------------------------------------------------------------------------


class _View:
    """The connection reduced to what matchers compare: strings, ints, and address families."""

    __slots__ = ("dst", "dst_v", "namespace", "port", "principal", "sa", "src", "src_v")

    def __init__(self, conn: ConnectionAttrs) -> None:
        ident = conn.source_identity
        self.principal = ident.principal if ident is not None else None
        self.namespace = ident.namespace if ident is not None else None
        self.sa = (ident.namespace, ident.service_account) if ident is not None else None
        self.src_v = conn.source_ip.version
        self.src = int(conn.source_ip)
        self.dst_v = conn.destination_ip.version
        self.dst = int(conn.destination_ip)
        self.port = conn.destination_port


class _Strings:
    """A list of StringMatch as one test: a set of exact values and tuples for str.startswith."""

    __slots__ = ("exact", "prefixes", "presence", "suffixes")

    def __init__(self, matches: Iterable[StringMatch]) -> None:
        exact: set[str] = set()
        prefixes: list[str] = []
        suffixes: list[str] = []
        self.presence = False
        for m in matches:
            if m.kind is StringMatchKind.EXACT:
                exact.add(m.value)
            elif m.kind is StringMatchKind.PREFIX:
                prefixes.append(m.value)
            elif m.kind is StringMatchKind.SUFFIX:
                suffixes.append(m.value)
            else:
                self.presence = True
        self.exact = frozenset(exact)
        self.prefixes = tuple(prefixes)
        self.suffixes = tuple(suffixes)

    def any(self, value: str) -> bool:
        return (
            (self.presence and value != "")
            or value in self.exact
            or (bool(self.prefixes) and value.startswith(self.prefixes))
            or (bool(self.suffixes) and value.endswith(self.suffixes))
        )


class _Networks:
    """CIDRs as (network int, mask int) per address family."""

    __slots__ = ("v4", "v6")

    def __init__(self, networks: Iterable[IPNetwork]) -> None:
        v4: list[tuple[int, int]] = []
        v6: list[tuple[int, int]] = []
        for net in networks:
            (v4 if net.version == 4 else v6).append((int(net.network_address), int(net.netmask)))
        self.v4 = tuple(v4)
        self.v6 = tuple(v6)

    def contains(self, version: int, ip: int) -> bool:
        # A plain loop: no generator object per check on the hot path.
        for net, mask in self.v4 if version == 4 else self.v6:  # noqa: SIM110
            if ip & mask == net:
                return True
        return False


class _CompiledMatch:
    """One non-empty Match; absent families are None and cost nothing."""

    __slots__ = (
        "dst_ips",
        "namespaces",
        "not_dst_ips",
        "not_namespaces",
        "not_ports",
        "not_principals",
        "not_sas",
        "not_src_ips",
        "ports",
        "principals",
        "sas",
        "src_ips",
    )

    def __init__(self, m: Match) -> None:
        self.ports = frozenset(m.destination_ports) or None
        self.not_ports = frozenset(m.not_destination_ports) or None
        self.src_ips = _Networks(m.source_ips) if m.source_ips else None
        self.not_src_ips = _Networks(m.not_source_ips) if m.not_source_ips else None
        self.dst_ips = _Networks(m.destination_ips) if m.destination_ips else None
        self.not_dst_ips = _Networks(m.not_destination_ips) if m.not_destination_ips else None
        self.principals = _Strings(m.principals) if m.principals else None
        self.not_principals = _Strings(m.not_principals) if m.not_principals else None
        self.namespaces = _Strings(m.namespaces) if m.namespaces else None
        self.not_namespaces = _Strings(m.not_namespaces) if m.not_namespaces else None
        self.sas = frozenset((s.namespace, s.service_account) for s in m.service_accounts) or None
        self.not_sas = (
            frozenset((s.namespace, s.service_account) for s in m.not_service_accounts) or None
        )

    def matches(self, v: _View) -> bool:
        if self.ports is not None and v.port not in self.ports:
            return False
        if self.not_ports is not None and v.port in self.not_ports:
            return False
        if self.src_ips is not None and not self.src_ips.contains(v.src_v, v.src):
            return False
        if self.not_src_ips is not None and self.not_src_ips.contains(v.src_v, v.src):
            return False
        if self.dst_ips is not None and not self.dst_ips.contains(v.dst_v, v.dst):
            return False
        if self.not_dst_ips is not None and self.not_dst_ips.contains(v.dst_v, v.dst):
            return False
        # Identity fields: with no identity a positive list fails and a negative one passes.
        if self.principals is not None and (
            v.principal is None or not self.principals.any(v.principal)
        ):
            return False
        if (
            self.not_principals is not None
            and v.principal is not None
            and self.not_principals.any(v.principal)
        ):
            return False
        if self.namespaces is not None and (
            v.namespace is None or not self.namespaces.any(v.namespace)
        ):
            return False
        if (
            self.not_namespaces is not None
            and v.namespace is not None
            and self.not_namespaces.any(v.namespace)
        ):
            return False
        if self.sas is not None and (v.sa is None or v.sa not in self.sas):
            return False
        return not (self.not_sas is not None and v.sa is not None and v.sa in self.not_sas)


class _CompiledPolicy:
    """A policy as nested tuples of compiled matches, with the trivial cases folded away:
    an empty Match is dropped, a clause left with no match never matches (so its rule is
    dropped), an originally empty clause always matches (so it is dropped from its rule), and
    a rule left with no clause makes the whole policy match everything."""

    __slots__ = ("always", "dry_run", "is_deny", "key", "policy", "rules")

    def __init__(self, policy: AuthorizationPolicy) -> None:
        self.policy = policy
        self.key = policy.key
        self.is_deny = policy.action is Action.DENY
        self.dry_run = policy.dry_run
        self.always = False
        rules: list[tuple[tuple[_CompiledMatch, ...], ...]] = []
        for rule in policy.rules:
            clauses: list[tuple[_CompiledMatch, ...]] = []
            never = False
            for clause in rule:
                if not clause:
                    continue
                compiled = tuple(_CompiledMatch(m) for m in clause if not m.is_empty())
                if not compiled:
                    never = True
                    break
                clauses.append(compiled)
            if never:
                continue
            if not clauses:
                self.always = True
            rules.append(tuple(clauses))
        self.rules = tuple(rules)

    def matches(self, v: _View) -> bool:
        if self.always:
            return True
        for rule in self.rules:
            for clause in rule:
                for m in clause:
                    if m.matches(v):
                        break
                else:
                    break
            else:
                return True
        return False


class _Applicable:
    """The policies that apply to one (namespace, named policies) combination, split by
    action and enforcement, each list sorted by key."""

    __slots__ = ("allow", "deny", "dry_allow", "dry_deny", "dry_keys", "keys", "unknown")

    def __init__(self, policies: Iterable[_CompiledPolicy], unknown: tuple[str, ...]) -> None:
        ordered = sorted({p.key: p for p in policies}.values(), key=lambda p: p.key)
        enforced = [p for p in ordered if not p.dry_run]
        dry = [p for p in ordered if p.dry_run]
        self.keys = tuple(p.key for p in enforced)
        self.dry_keys = tuple(p.key for p in dry)
        self.deny = tuple(p for p in enforced if p.is_deny)
        self.allow = tuple(p for p in enforced if not p.is_deny)
        self.dry_deny = tuple(p for p in dry if p.is_deny)
        self.dry_allow = tuple(p for p in dry if not p.is_deny)
        self.unknown = unknown


class Authorizer:
    """Authorizes connections against one immutable snapshot of policies.

    Build it once per policy snapshot (it compiles and indexes); `check` is then proportional
    to the number of policies that apply to the destination workload. A later policy with the
    same key replaces an earlier one, as an xDS update would.
    """

    def __init__(self, policies: Iterable[AuthorizationPolicy], *, cache_size: int = 4096) -> None:
        self._by_key: dict[str, _CompiledPolicy] = {}
        for p in policies:
            self._by_key[p.key] = _CompiledPolicy(p)
        self._global: list[_CompiledPolicy] = []
        self._by_namespace: dict[str, list[_CompiledPolicy]] = {}
        for cp in self._by_key.values():
            if cp.policy.scope is Scope.GLOBAL:
                self._global.append(cp)
            elif cp.policy.scope is Scope.NAMESPACE:
                self._by_namespace.setdefault(cp.policy.namespace, []).append(cp)
        self._cache: dict[tuple[str, tuple[str, ...]], _Applicable] = {}
        self._cache_size = cache_size

    def __len__(self) -> int:
        return len(self._by_key)

    def __contains__(self, key: object) -> bool:
        return key in self._by_key

    def get(self, key: str) -> AuthorizationPolicy | None:
        cp = self._by_key.get(key)
        return cp.policy if cp is not None else None

    @property
    def policies(self) -> tuple[AuthorizationPolicy, ...]:
        return tuple(cp.policy for cp in self._by_key.values())

    def _resolve(self, workload: Workload) -> _Applicable:
        cache_key = (workload.namespace, workload.authorization_policies)
        found = self._cache.get(cache_key)
        if found is not None:
            return found
        named: list[_CompiledPolicy] = []
        unknown: list[str] = []
        for name in workload.authorization_policies:
            cp = self._by_key.get(name)
            if cp is None:
                unknown.append(name)
            else:
                # As istio/ztunnel does: a named policy applies whatever its scope.
                named.append(cp)
        app = _Applicable(
            [*self._by_namespace.get(workload.namespace, ()), *self._global, *named],
            tuple(sorted(set(unknown))),
        )
        if len(self._cache) >= self._cache_size:
            self._cache.clear()
        self._cache[cache_key] = app
        return app

    def applicable(self, workload: Workload) -> tuple[AuthorizationPolicy, ...]:
        """The policies (enforced and dry-run) that apply to a workload, sorted by key."""
        app = self._resolve(workload)
        return tuple(
            cp.policy
            for cp in sorted(
                (*app.deny, *app.allow, *app.dry_deny, *app.dry_allow), key=lambda p: p.key
            )
        )

    def check(self, conn: ConnectionAttrs) -> Decision:
        app = self._resolve(conn.destination)
        v = _View(conn)
        deny_m = [p.key for p in app.deny if p.matches(v)]
        allow_m = [p.key for p in app.allow if p.matches(v)]
        allowed, reason, policy = verdict(deny_m, bool(app.allow), allow_m)
        matched = tuple(sorted((*deny_m, *allow_m)))
        if not app.dry_keys:
            return Decision(allowed, reason, policy, app.keys, matched, unknown=app.unknown)
        dry_deny_m = [p.key for p in app.dry_deny if p.matches(v)]
        dry_allow_m = [p.key for p in app.dry_allow if p.matches(v)]
        dry_allowed, _, dry_policy = verdict(
            sorted((*deny_m, *dry_deny_m)),
            bool(app.allow or app.dry_allow),
            sorted((*allow_m, *dry_allow_m)),
        )
        return Decision(
            allowed,
            reason,
            policy,
            app.keys,
            matched,
            dry_run_applicable=app.dry_keys,
            dry_run_matched=tuple(sorted((*dry_deny_m, *dry_allow_m))),
            dry_run_allowed=dry_allowed,
            dry_run_policy=dry_policy,
            unknown=app.unknown,
        )

    def explain(self, conn: ConnectionAttrs) -> Explanation:
        """`check`, plus why each applicable policy did or did not match."""
        return explain(self, conn)


def decide_naive(policies: Iterable[AuthorizationPolicy], conn: ConnectionAttrs) -> Decision:
    """The reference evaluator: scans every policy and uses the plain model matching.

    Slow by design; the property tests compare `Authorizer.check` with it, and the benchmark
    uses it as the baseline.
    """
    by_key: dict[str, AuthorizationPolicy] = {}
    for p in policies:
        by_key[p.key] = p
    wl = conn.destination
    named = set(wl.authorization_policies)
    applicable = sorted(
        (
            p
            for p in by_key.values()
            if p.scope is Scope.GLOBAL
            or (p.scope is Scope.NAMESPACE and p.namespace == wl.namespace)
            or p.key in named
        ),
        key=lambda p: p.key,
    )
    enforced = [p for p in applicable if not p.dry_run]
    dry = [p for p in applicable if p.dry_run]
    matched = [p for p in enforced if p.matches(conn)]
    deny_m = [p.key for p in matched if p.action is Action.DENY]
    allow_m = [p.key for p in matched if p.action is Action.ALLOW]
    any_allow = any(p.action is Action.ALLOW for p in enforced)
    allowed, reason, policy = verdict(deny_m, any_allow, allow_m)
    unknown = tuple(sorted(named - by_key.keys()))
    keys = tuple(p.key for p in enforced)
    if not dry:
        return Decision(
            allowed, reason, policy, keys, tuple(p.key for p in matched), unknown=unknown
        )
    dry_matched = [p for p in dry if p.matches(conn)]
    all_matched = sorted([*matched, *dry_matched], key=lambda p: p.key)
    dry_allowed, _, dry_policy = verdict(
        [p.key for p in all_matched if p.action is Action.DENY],
        any(p.action is Action.ALLOW for p in applicable),
        [p.key for p in all_matched if p.action is Action.ALLOW],
    )
    return Decision(
        allowed,
        reason,
        policy,
        keys,
        tuple(p.key for p in matched),
        dry_run_applicable=tuple(p.key for p in dry),
        dry_run_matched=tuple(p.key for p in dry_matched),
        dry_run_allowed=dry_allowed,
        dry_run_policy=dry_policy,
        unknown=unknown,
    )
