"""The decision engine against shared/WIRE.md "L4 authorization semantics": a table of every
Match field family and its negation, then scopes, evaluation order, dry-run and explanations."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import pytest

from ztunnel.authz import (
    Action,
    AuthorizationPolicy,
    Authorizer,
    ConnectionAttrs,
    DecisionReason,
    Match,
    Scope,
    StringMatch,
    decide_naive,
    parse_local_policies,
)
from ztunnel.identity import SpiffeId
from ztunnel.model import Workload

pytestmark = pytest.mark.unit

CLIENT = SpiffeId("cluster.local", "client-ns", "client-sa")
SERVER = Workload(
    uid="server",
    name="server",
    namespace="server-ns",
    addresses=(ipaddress.ip_address("10.9.0.5"), ipaddress.ip_address("fd00::9:5")),
)


def conn(
    identity: SpiffeId | None = CLIENT,
    src: str = "10.1.2.3",
    dst: str = "10.9.0.5",
    port: int = 8080,
    workload: Workload = SERVER,
) -> ConnectionAttrs:
    return ConnectionAttrs(
        identity, ipaddress.ip_address(src), ipaddress.ip_address(dst), port, workload
    )


def policies(*items: dict[str, Any]) -> list[AuthorizationPolicy]:
    """Policies written in the local-config shape, which is also under test."""
    return parse_local_policies(list(items), "test.yaml", "policies")


def one_match(match: dict[str, Any], action: str = "Allow", **extra: Any) -> dict[str, Any]:
    return {
        "name": f"{action.lower()}-it",
        "namespace": "server-ns",
        "scope": "Namespace",
        "action": action,
        "rules": [[[match]]],
        **extra,
    }


def decide(pols: list[AuthorizationPolicy], c: ConnectionAttrs) -> Any:
    decision = Authorizer(pols).check(c)
    assert decision == decide_naive(pols, c)  # the index never changes the answer
    return decision


V6: dict[str, Any] = {"src": "fd00::1:2", "dst": "fd00::9:5"}
PLAIN: dict[str, Any] = {"identity": None}

# (match in local-config form, connection overrides, does the match match?)
MATRIX: list[tuple[dict[str, Any], dict[str, Any], bool]] = [
    # namespaces: the peer identity's namespace, StringMatch forms
    ({"namespaces": ["client-ns"]}, {}, True),
    ({"namespaces": ["other-ns"]}, {}, False),
    ({"namespaces": ["client-*"]}, {}, True),
    ({"namespaces": ["*-ns"]}, {}, True),
    ({"namespaces": ["*"]}, {}, True),
    ({"namespaces": [{"exact": "client-ns"}]}, {}, True),
    ({"namespaces": [{"prefix": "other"}]}, {}, False),
    ({"namespaces": ["other-ns", "client-ns"]}, {}, True),
    ({"namespaces": ["*"]}, PLAIN, False),
    ({"notNamespaces": ["client-ns"]}, {}, False),
    ({"notNamespaces": ["other-ns"]}, {}, True),
    ({"notNamespaces": ["*"]}, PLAIN, True),
    ({"namespaces": ["client-*"], "notNamespaces": ["client-ns"]}, {}, False),
    # principals: compared without spiffe://
    ({"principals": ["cluster.local/ns/client-ns/sa/client-sa"]}, {}, True),
    ({"principals": ["spiffe://cluster.local/ns/client-ns/sa/client-sa"]}, {}, False),
    ({"principals": ["cluster.local/ns/client-ns/*"]}, {}, True),
    ({"principals": ["*/sa/client-sa"]}, {}, True),
    ({"principals": ["*/sa/other"]}, {}, False),
    ({"principals": [{"presence": {}}]}, {}, True),
    ({"principals": [{"suffix": "client-sa"}]}, PLAIN, False),
    ({"notPrincipals": ["*"]}, {}, False),
    ({"notPrincipals": ["*"]}, PLAIN, True),
    ({"notPrincipals": ["cluster.local/ns/other/sa/x"]}, {}, True),
    # service accounts: namespace + account, any trust domain
    ({"serviceAccounts": ["client-ns/client-sa"]}, {}, True),
    ({"serviceAccounts": [{"namespace": "client-ns", "serviceAccount": "x"}]}, {}, False),
    (
        {"serviceAccounts": ["client-ns/client-sa"]},
        {"identity": SpiffeId("other.td", "client-ns", "client-sa")},
        True,
    ),
    ({"serviceAccounts": ["client-ns/client-sa"]}, PLAIN, False),
    ({"notServiceAccounts": ["client-ns/client-sa"]}, {}, False),
    ({"notServiceAccounts": ["client-ns/client-sa"]}, PLAIN, True),
    # source IPs, IPv4 and IPv6, CIDRs and bare addresses
    ({"sourceIps": ["10.1.0.0/16"]}, {}, True),
    ({"sourceIps": ["10.1.2.3"]}, {}, True),
    ({"sourceIps": ["10.2.0.0/16"]}, {}, False),
    ({"sourceIps": ["0.0.0.0/0"]}, V6, False),
    ({"sourceIps": ["fd00::/64"]}, V6, True),
    ({"sourceIps": ["fd00::1:2"]}, V6, True),
    ({"sourceIps": ["fd01::/16"]}, V6, False),
    ({"sourceIps": ["10.0.0.0/8", "fd00::/8"]}, V6, True),
    ({"notSourceIps": ["10.1.0.0/16"]}, {}, False),
    ({"notSourceIps": ["10.1.0.0/16"]}, V6, True),
    ({"notSourceIps": ["::/0"]}, V6, False),
    # destination IPs
    ({"destinationIps": ["10.9.0.0/24"]}, {}, True),
    ({"destinationIps": ["10.8.0.0/24"]}, {}, False),
    ({"destinationIps": ["fd00::9:0/112"]}, V6, True),
    ({"notDestinationIps": ["10.9.0.5"]}, {}, False),
    ({"notDestinationIps": ["10.9.0.5"]}, V6, True),
    # destination ports
    ({"destinationPorts": [8080]}, {}, True),
    ({"destinationPorts": [80, 8080]}, {}, True),
    ({"destinationPorts": [80]}, {}, False),
    ({"notDestinationPorts": [8080]}, {}, False),
    ({"notDestinationPorts": [80]}, {}, True),
    # every present family must pass
    ({"namespaces": ["client-ns"], "destinationPorts": [80]}, {}, False),
    (
        {"namespaces": ["client-ns"], "destinationPorts": [8080], "sourceIps": ["10.0.0.0/8"]},
        {},
        True,
    ),
    ({"principals": ["*"], "sourceIps": ["10.0.0.0/8"]}, PLAIN, False),
    ({"notPrincipals": ["*"], "destinationPorts": [8080]}, PLAIN, True),
]


def _case_id(case: tuple[dict[str, Any], dict[str, Any], bool]) -> str:
    match, overrides, expected = case
    where = ",".join(f"{k}={v}" for k, v in overrides.items()) or "mtls-v4"
    return f"{json.dumps(match, separators=(',', ':'))}|{where}|{'hit' if expected else 'miss'}"


@pytest.mark.parametrize("case", MATRIX, ids=[_case_id(c) for c in MATRIX])
def test_match_field_matrix(case: tuple[dict[str, Any], dict[str, Any], bool]) -> None:
    match, overrides, expected = case
    c = conn(**overrides)
    allow = decide(policies(one_match(match, "Allow")), c)
    assert allow.allowed is expected
    assert allow.reason is (
        DecisionReason.ALLOW_MATCHED if expected else DecisionReason.NO_ALLOW_MATCHED
    )
    deny = decide(policies(one_match(match, "Deny")), c)
    assert deny.allowed is not expected
    assert deny.policy == ("server-ns/deny-it" if expected else None)


def test_empty_match_is_skipped_and_never_matches() -> None:
    d = decide(policies(one_match({})), conn())
    assert not d.allowed and d.reason is DecisionReason.NO_ALLOW_MATCHED
    # ...even next to a clause that would match, and a DENY with it never fires.
    p = one_match({})
    p["rules"] = [[[{}], [{"destinationPorts": [8080]}]]]
    assert not decide(policies(p), conn()).allowed
    assert decide(policies(one_match({}, "Deny")), conn()).allowed


def test_clause_with_an_empty_match_still_matches_through_the_other() -> None:
    p = one_match({})
    p["rules"] = [[[{}, {"destinationPorts": [8080]}]]]
    assert decide(policies(p), conn()).allowed


def test_rule_without_clauses_and_empty_clause_match_everything() -> None:
    rule_sets: list[list[Any]] = [[[]], [[[]]], [[[], [{"destinationPorts": [8080]}]]]]
    for rules in rule_sets:
        p = one_match({}, "Deny")
        p["rules"] = rules
        d = decide(policies(p), conn(identity=None, port=8080))
        assert not d.allowed and d.policy == "server-ns/deny-it", rules


def test_policy_without_rules_never_matches() -> None:
    allow_nothing = one_match({})
    allow_nothing["rules"] = []
    d = decide(policies(allow_nothing), conn())
    assert not d.allowed and d.reason is DecisionReason.NO_ALLOW_MATCHED
    deny_nothing = one_match({}, "Deny")
    del deny_nothing["rules"]
    d = decide(policies(deny_nothing), conn())
    assert d.allowed and d.reason is DecisionReason.NO_ALLOW_POLICIES


def test_rules_are_or_and_clauses_are_and() -> None:
    p = one_match({})
    p["rules"] = [
        [[{"destinationPorts": [80]}], [{"namespaces": ["client-ns"]}]],  # AND: port fails
        [[{"namespaces": ["other"]}, {"principals": ["*/sa/client-sa"]}]],  # OR inside clause
    ]
    assert decide(policies(p), conn()).allowed
    assert not decide(policies(p), conn(identity=None)).allowed
    p["rules"] = p["rules"][:1]
    assert not decide(policies(p), conn()).allowed
    assert decide(policies(p), conn(port=80)).allowed


def test_deny_wins_over_allow_and_is_reported() -> None:
    pols = policies(
        one_match({"namespaces": ["client-ns"]}, "Allow"),
        one_match({"destinationPorts": [8080]}, "Deny"),
    )
    d = decide(pols, conn())
    assert not d.allowed
    assert d.reason is DecisionReason.DENY_MATCHED
    assert d.policy == "server-ns/deny-it"
    assert d.matched == ("server-ns/allow-it", "server-ns/deny-it")
    assert d.applicable == ("server-ns/allow-it", "server-ns/deny-it")


def test_no_allow_policy_allows_and_unmatched_allow_denies() -> None:
    d = decide(policies(one_match({"destinationPorts": [9]}, "Deny")), conn())
    assert d.allowed and d.reason is DecisionReason.NO_ALLOW_POLICIES and d.policy is None
    d = decide(policies(one_match({"destinationPorts": [9]}, "Allow")), conn())
    assert not d.allowed and d.reason is DecisionReason.NO_ALLOW_MATCHED
    d = decide([], conn())
    assert d.allowed and d.applicable == ()


def scoped(
    name: str, namespace: str, scope: Scope, action: Action = Action.ALLOW
) -> AuthorizationPolicy:
    """A policy that matches only port 1 (so it applies but does not match port 8080)."""
    return AuthorizationPolicy(
        name, namespace, scope, action, (((Match(destination_ports=(1,)),),),)
    )


def test_scopes_decide_which_policies_apply() -> None:
    pols = [
        scoped("mine", "server-ns", Scope.NAMESPACE),
        scoped("theirs", "other-ns", Scope.NAMESPACE),
        scoped("everyone", "istio-system", Scope.GLOBAL),
        scoped("selected", "server-ns", Scope.WORKLOAD_SELECTOR),
        scoped("not-selected", "server-ns", Scope.WORKLOAD_SELECTOR),
    ]
    named = Workload(
        uid="s2",
        name="s2",
        namespace="server-ns",
        addresses=SERVER.addresses,
        authorization_policies=("server-ns/selected", "server-ns/gone"),
    )
    d = decide(pols, conn(workload=named))
    assert d.applicable == ("istio-system/everyone", "server-ns/mine", "server-ns/selected")
    assert d.unknown == ("server-ns/gone",)
    assert not d.allowed
    d = decide(pols, conn())
    assert d.applicable == ("istio-system/everyone", "server-ns/mine")
    elsewhere = Workload(uid="e", name="e", namespace="third", addresses=SERVER.addresses)
    assert decide(pols, conn(workload=elsewhere)).applicable == ("istio-system/everyone",)
    # A GLOBAL policy reaches every namespace.
    assert not decide(pols, conn(workload=elsewhere)).allowed


def test_named_policy_applies_whatever_its_scope_once() -> None:
    pols = [
        scoped("theirs", "other-ns", Scope.NAMESPACE, Action.DENY),
        scoped("mine", "server-ns", Scope.NAMESPACE),
    ]
    wl = Workload(
        uid="s",
        name="s",
        namespace="server-ns",
        addresses=SERVER.addresses,
        authorization_policies=("other-ns/theirs", "server-ns/mine"),
    )
    d = decide(pols, conn(workload=wl, port=1))
    assert d.applicable == ("other-ns/theirs", "server-ns/mine")
    assert not d.allowed and d.policy == "other-ns/theirs"


def test_dry_run_is_reported_never_enforced() -> None:
    dry_deny = one_match({"destinationPorts": [8080]}, "Deny", dryRun=True)
    d = decide(policies(dry_deny), conn())
    assert d.allowed and d.reason is DecisionReason.NO_ALLOW_POLICIES
    assert d.applicable == () and d.matched == ()
    assert d.dry_run_applicable == ("server-ns/deny-it",)
    assert d.dry_run_matched == ("server-ns/deny-it",)
    assert d.dry_run_allowed is False and d.dry_run_policy == "server-ns/deny-it"

    dry_allow = one_match({"destinationPorts": [9]}, "Allow", dryRun=True)
    d = decide(policies(dry_allow), conn())
    assert d.allowed and d.dry_run_allowed is False and d.dry_run_matched == ()

    enforced_deny = one_match({"destinationPorts": [8080]}, "Deny")
    dry_allow_hit = one_match({"destinationPorts": [8080]}, "Allow", dryRun=True)
    d = decide(policies(enforced_deny, dry_allow_hit), conn())
    assert not d.allowed and d.dry_run_allowed is False
    assert d.dry_run_policy == "server-ns/deny-it"

    d = decide(policies(one_match({"destinationPorts": [8080]})), conn())
    assert d.dry_run_allowed is None and d.dry_run_applicable == ()


def test_strict_mtls_expressed_as_deny_without_principal() -> None:
    strict = one_match({"notPrincipals": [{"presence": {}}]}, "Deny")
    assert not decide(policies(strict), conn(identity=None)).allowed
    assert not decide(policies(strict), conn(identity=None, **V6)).allowed
    assert decide(policies(strict), conn()).allowed


def test_later_policy_with_same_key_replaces_earlier() -> None:
    first = scoped("p", "server-ns", Scope.NAMESPACE, Action.DENY)
    second = AuthorizationPolicy("p", "server-ns", Scope.NAMESPACE, Action.ALLOW, ((),))
    authz = Authorizer([first, second])
    assert len(authz) == 1 and authz.get("server-ns/p") == second
    assert authz.check(conn(port=1)).allowed


def test_cache_eviction_keeps_answers_right() -> None:
    pols = [scoped("a", "n1", Scope.NAMESPACE), scoped("b", "n2", Scope.NAMESPACE, Action.DENY)]
    authz = Authorizer(pols, cache_size=1)
    w1 = Workload(uid="1", name="1", namespace="n1", addresses=SERVER.addresses)
    w2 = Workload(uid="2", name="2", namespace="n2", addresses=SERVER.addresses)
    for _ in range(3):
        for wl, port in ((w1, 1), (w2, 1), (w1, 2), (w2, 2)):
            c = conn(workload=wl, port=port)
            assert authz.check(c) == decide_naive(pols, c)


def test_explain_says_why() -> None:
    pols = policies(
        one_match({"principals": ["cluster.local/ns/admin/*"]}, "Allow"),
        one_match(
            {"notSourceIps": ["10.0.0.0/8"], "destinationPorts": [8080]},
            "Deny",
            name="deny-outside",
        ),
        one_match({"destinationPorts": [8080]}, "Deny", name="would-deny", dryRun=True),
    )
    authz = Authorizer(pols)
    c = conn()
    ex = authz.explain(c)
    assert ex.decision == authz.check(c)
    assert not ex.decision.allowed and ex.decision.reason is DecisionReason.NO_ALLOW_MATCHED
    text = ex.render()
    assert "verdict: DENY" in text
    assert (
        "principals: cluster.local/ns/client-ns/sa/client-sa matches none of "
        "[cluster.local/ns/admin/*]"
    ) in text
    assert "not_source_ips: 10.1.2.3 matches excluded 10.0.0.0/8" in text
    assert "with dry-run policies enforced: DENY (server-ns/would-deny)" in text
    doc = json.loads(json.dumps(ex.to_dict()))
    assert doc["decision"]["allowed"] is False
    assert [p["policy"] for p in doc["policies"]] == [
        "server-ns/allow-it",
        "server-ns/deny-outside",
        "server-ns/would-deny",
    ]
    assert [p["matched"] for p in doc["policies"]] == [False, False, True]

    plain = authz.explain(conn(identity=None))
    assert "the peer has no identity (plaintext)" in plain.render()


def test_explain_with_nothing_applicable() -> None:
    ex = Authorizer([]).explain(conn())
    assert ex.decision.allowed
    assert "no policy applies to this workload" in str(ex)


def test_string_match_patterns_follow_istio() -> None:
    assert StringMatch.from_pattern("*") == StringMatch.presence()
    assert StringMatch.from_pattern("a*") == StringMatch.prefix("a")
    assert StringMatch.from_pattern("*a") == StringMatch.suffix("a")
    assert StringMatch.from_pattern("a") == StringMatch.exact("a")
    assert not StringMatch.presence().matches("")
    assert [str(m) for m in (StringMatch.prefix("a"), StringMatch.suffix("b"))] == ["a*", "*b"]
