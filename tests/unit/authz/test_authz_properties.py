"""Properties over random policy sets: the indexed, compiled engine decides exactly as the naive
reference scan does; explanations agree with decisions; the local-config form round-trips."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ztunnel.authz import (
    Action,
    AuthorizationPolicy,
    Authorizer,
    ConnectionAttrs,
    Match,
    Scope,
    ServiceAccountMatch,
    StringMatch,
    decide_naive,
    parse_local_policies,
    policy_to_dict,
)
from ztunnel.authz.explain import trace_policy
from ztunnel.identity import SpiffeId
from ztunnel.model import Workload

pytestmark = pytest.mark.unit

# Small pools, so that random policies and connections often meet.
NAMESPACES = ["a", "b", "c"]
ACCOUNTS = ["x", "y"]
NAMES = ["p1", "p2", "p3", "p4"]
SOURCES = ["10.0.0.1", "10.0.1.1", "192.168.0.9", "fd00::1", "fd00:1::1"]
DESTS = ["10.9.0.5", "fd00::9:5"]
PORTS = [80, 443, 8080]
NETWORKS = [
    "10.0.0.0/8",
    "10.0.0.0/24",
    "10.0.1.1/32",
    "192.168.0.0/16",
    "0.0.0.0/0",
    "fd00::/16",
    "fd00::/64",
    "::/0",
    "fd00::9:5/128",
]

identities = st.builds(
    SpiffeId,
    st.sampled_from(["cluster.local", "other.td"]),
    st.sampled_from(NAMESPACES),
    st.sampled_from(ACCOUNTS),
)
principal_values = st.sampled_from(
    [f"cluster.local/ns/{n}/sa/{s}" for n in NAMESPACES for s in ACCOUNTS]
    + ["cluster.local/ns/a/", "other.td/", "/sa/x", "/ns/b/sa/y", "cluster"]
)
string_matches = st.one_of(
    st.builds(StringMatch.exact, st.sampled_from(NAMESPACES) | principal_values),
    st.builds(StringMatch.prefix, st.sampled_from(["a", "b", "cluster.local/ns/a/", "other"])),
    st.builds(StringMatch.suffix, st.sampled_from(["a", "c", "/sa/x", "/sa/y"])),
    st.just(StringMatch.presence()),
)
networks = st.sampled_from(NETWORKS).map(ipaddress.ip_network)
accounts = st.builds(ServiceAccountMatch, st.sampled_from(NAMESPACES), st.sampled_from(ACCOUNTS))
ports = st.sampled_from(PORTS)


def few(elements: st.SearchStrategy[object]) -> st.SearchStrategy[tuple[object, ...]]:
    # Mostly empty, so that matches have one or two present families.
    return st.one_of(
        st.just(()), st.just(()), st.lists(elements, min_size=1, max_size=3).map(tuple)
    )


matches = st.builds(
    Match,
    namespaces=few(string_matches),
    not_namespaces=few(string_matches),
    principals=few(string_matches),
    not_principals=few(string_matches),
    source_ips=few(networks),
    not_source_ips=few(networks),
    destination_ips=few(networks),
    not_destination_ips=few(networks),
    destination_ports=few(ports),
    not_destination_ports=few(ports),
    service_accounts=few(accounts),
    not_service_accounts=few(accounts),
)
clauses = st.lists(matches, max_size=3).map(tuple)
rules = st.lists(clauses, max_size=3).map(tuple)
policies = st.builds(
    AuthorizationPolicy,
    name=st.sampled_from(NAMES),
    namespace=st.sampled_from(NAMESPACES),
    scope=st.sampled_from(list(Scope)),
    action=st.sampled_from(list(Action)),
    rules=st.lists(rules, max_size=3).map(tuple),
    dry_run=st.booleans(),
)
workloads = st.builds(
    lambda ns, named: Workload(
        uid=f"{ns}/w",
        name="w",
        namespace=ns,
        addresses=(ipaddress.ip_address("10.9.0.5"),),
        authorization_policies=tuple(named),
    ),
    st.sampled_from(NAMESPACES),
    st.lists(st.sampled_from([f"{n}/{p}" for n in NAMESPACES for p in NAMES]), max_size=3),
)
connections = st.builds(
    lambda ident, src, dst, port, wl: ConnectionAttrs(
        ident, ipaddress.ip_address(src), ipaddress.ip_address(dst), port, wl
    ),
    st.none() | identities,
    st.sampled_from(SOURCES),
    st.sampled_from(DESTS),
    ports,
    workloads,
)

# No example database: tests leave nothing behind in the working tree.
SETTINGS = settings(
    max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
FEWER = settings(SETTINGS, max_examples=100)


@SETTINGS
@given(
    st.lists(policies, max_size=12),
    st.lists(connections, min_size=1, max_size=6),
    st.integers(min_value=1, max_value=3),
)
def test_indexed_engine_equals_naive_scan(
    pols: list[AuthorizationPolicy], conns: list[ConnectionAttrs], cache: int
) -> None:
    authz = Authorizer(pols, cache_size=cache)
    for c in conns * 2:  # twice: the second pass is served from the applicability cache
        assert authz.check(c) == decide_naive(pols, c)


@SETTINGS
@given(policies, connections)
def test_compiled_matching_equals_model_and_explanation(
    policy: AuthorizationPolicy, conn: ConnectionAttrs
) -> None:
    scoped = AuthorizationPolicy(
        policy.name, conn.destination.namespace, Scope.NAMESPACE, policy.action, policy.rules
    )
    decision = Authorizer([scoped]).check(conn)
    expected = scoped.matches(conn)
    assert (scoped.key in decision.matched) is expected
    assert trace_policy(scoped, conn).matched is expected


@FEWER
@given(st.lists(policies, max_size=6), connections)
def test_explanation_agrees_with_decision(
    pols: list[AuthorizationPolicy], conn: ConnectionAttrs
) -> None:
    authz = Authorizer(pols)
    ex = authz.explain(conn)
    assert ex.decision == authz.check(conn)
    traced = {t.policy.key for t in ex.policies if t.matched and not t.policy.dry_run}
    assert traced == set(ex.decision.matched)
    assert ex.render()


non_empty_strings = st.builds(
    lambda kind, value: kind(value),
    st.sampled_from([StringMatch.exact, StringMatch.prefix, StringMatch.suffix]),
    st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=8),
) | st.just(StringMatch.presence())


@FEWER
@given(policies)
def test_local_form_round_trips(policy: AuthorizationPolicy) -> None:
    assert parse_local_policies([policy_to_dict(policy)], "x.yaml", "policies") == [policy]


@FEWER
@given(st.lists(non_empty_strings, min_size=1, max_size=3))
def test_any_string_match_round_trips(values: list[StringMatch]) -> None:
    policy = AuthorizationPolicy(
        "n", "ns", Scope.GLOBAL, Action.ALLOW, (((Match(principals=tuple(values)),),),)
    )
    assert parse_local_policies([policy_to_dict(policy)], "x.yaml", "policies") == [policy]
