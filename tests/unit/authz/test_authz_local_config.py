"""The local-config `policies:` shape: parsing, the forms each field accepts, and errors that
name the exact field."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
import yaml

from ztunnel.authz import (
    Action,
    AuthorizationPolicy,
    Match,
    Scope,
    ServiceAccountMatch,
    StringMatch,
    parse_local_policies,
    policy_to_dict,
)
from ztunnel.errors import ConfigError
from ztunnel.localconfig import parse_documents

pytestmark = pytest.mark.unit

EXAMPLE = """
policies:
- name: allow-frontend
  namespace: shop
  scope: Namespace
  action: Allow
  dryRun: false
  rules:
  - - - principals: ["cluster.local/ns/web/sa/frontend", "*/sa/admin"]
        destinationPorts: [8080]
      - namespaces: [{prefix: "ops-"}]
        notSourceIps: ["10.66.0.0/16", "fd00:66::/32"]
    - - serviceAccounts: ["shop/batch", {namespace: "shop", serviceAccount: "cron"}]
  - []
- name: strict
  namespace: istio-system
  scope: GLOBAL
  action: DENY
  rules: [[[{notPrincipals: [{presence: {}}]}]]]
- name: selected
  namespace: shop
  scope: workload_selector
  action: deny
  dryRun: true
"""


def parse(items: list[Any], warnings: list[str] | None = None) -> list[AuthorizationPolicy]:
    return parse_local_policies(items, "local.yaml", "policies", warnings=warnings)


def test_example_parses_to_the_model() -> None:
    raw = yaml.safe_load(EXAMPLE)["policies"]
    warnings: list[str] = []
    allow, strict, selected = parse(raw, warnings)
    assert warnings == []
    assert (allow.key, allow.scope, allow.action, allow.dry_run) == (
        "shop/allow-frontend",
        Scope.NAMESPACE,
        Action.ALLOW,
        False,
    )
    assert allow.rules == (
        (
            (
                Match(
                    principals=(
                        StringMatch.exact("cluster.local/ns/web/sa/frontend"),
                        StringMatch.suffix("/sa/admin"),
                    ),
                    destination_ports=(8080,),
                ),
                Match(
                    namespaces=(StringMatch.prefix("ops-"),),
                    not_source_ips=(
                        ipaddress.ip_network("10.66.0.0/16"),
                        ipaddress.ip_network("fd00:66::/32"),
                    ),
                ),
            ),
            (
                Match(
                    service_accounts=(
                        ServiceAccountMatch("shop", "batch"),
                        ServiceAccountMatch("shop", "cron"),
                    )
                ),
            ),
        ),
        (),
    )
    assert (strict.key, strict.scope, strict.action) == (
        "istio-system/strict",
        Scope.GLOBAL,
        Action.DENY,
    )
    assert strict.rules == (((Match(not_principals=(StringMatch.presence(),)),),),)
    assert (selected.scope, selected.action, selected.dry_run, selected.rules) == (
        Scope.WORKLOAD_SELECTOR,
        Action.DENY,
        True,
        (),
    )


def test_through_the_local_config_loader() -> None:
    state = parse_documents([yaml.safe_load(EXAMPLE)], "local.yaml")
    assert [p.key for p in state.policies] == [
        "shop/allow-frontend",
        "istio-system/strict",
        "shop/selected",
    ]


@pytest.mark.parametrize(
    ("text", "scope"),
    [
        ("Global", Scope.GLOBAL),
        ("global", Scope.GLOBAL),
        ("NAMESPACE", Scope.NAMESPACE),
        ("WorkloadSelector", Scope.WORKLOAD_SELECTOR),
        ("WORKLOAD_SELECTOR", Scope.WORKLOAD_SELECTOR),
        ("workload-selector", Scope.WORKLOAD_SELECTOR),
    ],
)
def test_scope_in_any_case(text: str, scope: Scope) -> None:
    (p,) = parse([{"name": "p", "namespace": "n", "scope": text, "action": "Allow"}])
    assert p.scope is scope


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("*", StringMatch.presence()),
        ("spiffe*", StringMatch.prefix("spiffe")),
        ("*/sa/x", StringMatch.suffix("/sa/x")),
        ("exact", StringMatch.exact("exact")),
        ({"exact": "a*b"}, StringMatch.exact("a*b")),
        ({"Prefix": "p"}, StringMatch.prefix("p")),
        ({"SUFFIX": "s"}, StringMatch.suffix("s")),
        ({"presence": {}}, StringMatch.presence()),
        ({"presence": None}, StringMatch.presence()),
    ],
)
def test_string_match_forms(raw: Any, expected: StringMatch) -> None:
    (p,) = parse(
        [{"name": "p", "scope": "Global", "action": "Allow", "rules": [[[{"principals": [raw]}]]]}]
    )
    assert p.rules[0][0][0].principals == (expected,)
    assert p.namespace == "default"


def test_policy_to_dict_round_trips() -> None:
    raw = yaml.safe_load(EXAMPLE)["policies"]
    pols = parse(raw)
    assert parse([policy_to_dict(p) for p in pols]) == pols


def rule_with(match: Any) -> dict[str, Any]:
    return {
        "name": "p",
        "namespace": "n",
        "scope": "Namespace",
        "action": "Allow",
        "rules": [[[{"destinationPorts": [1]}]], [[{"namespaces": ["a"]}, match]]],
    }


BAD = [
    ([{"name": "p", "action": "Allow"}], "policies[0].scope", "is required"),
    (
        [{"name": "p", "scope": "Cluster", "action": "Allow"}],
        "policies[0].scope",
        "must be one of GLOBAL, NAMESPACE, WORKLOAD_SELECTOR",
    ),
    (
        [{"name": "p", "scope": "Global", "action": "Audit"}],
        "policies[0].action",
        "must be one of ALLOW, DENY",
    ),
    ([{"scope": "Global", "action": "Allow"}], "policies[0].name", "expected a string"),
    ([{"name": "a/b", "scope": "Global", "action": "Allow"}], "policies[0]", "must not contain"),
    (
        [{"name": "p", "scope": "Global", "action": "Allow", "dryRun": "yes"}],
        "policies[0].dryRun",
        "expected true or false",
    ),
    (
        [{"name": "p", "scope": "Global", "action": "Allow", "ruels": []}],
        "policies[0].ruels",
        "unknown field",
    ),
    (
        [{"name": "p", "scope": "Global", "action": "Allow", "rules": {"a": 1}}],
        "policies[0].rules",
        "expected a list",
    ),
    (
        [{"name": "p", "scope": "Global", "action": "Allow", "rules": [None]}],
        "policies[0].rules[0]",
        "a rule must be a list of clauses",
    ),
    (
        [{"name": "p", "scope": "Global", "action": "Allow", "rules": [[{"namespaces": ["a"]}]]}],
        "policies[0].rules[0][0]",
        "expected a list",
    ),
    ([rule_with(None)], "policies[0].rules[1][0][1]", "must not be null"),
    ([rule_with({"principal": ["a"]})], "policies[0].rules[1][0][1].principal", "unknown field"),
    (
        [rule_with({"sourceIps": ["10.0.0.0/8", "10.0.0/33"]})],
        "policies[0].rules[1][0][1].sourceIps[1]",
        "not an IP address or CIDR",
    ),
    (
        [rule_with({"destinationIps": ["fd00::/129"]})],
        "policies[0].rules[1][0][1].destinationIps[0]",
        "not an IP address or CIDR",
    ),
    (
        [rule_with({"destinationPorts": [0]})],
        "policies[0].rules[1][0][1].destinationPorts[0]",
        "port out of range",
    ),
    (
        [rule_with({"notDestinationPorts": [True]})],
        "policies[0].rules[1][0][1].notDestinationPorts[0]",
        "expected a port number",
    ),
    (
        [rule_with({"principals": [{"exact": "a", "prefix": "b"}]})],
        "policies[0].rules[1][0][1].principals[0]",
        "exactly one of",
    ),
    (
        [rule_with({"principals": [{"regex": "a.*"}]})],
        "policies[0].rules[1][0][1].principals[0].regex",
        "expected exact, prefix",
    ),
    (
        [rule_with({"namespaces": ["a*b"]})],
        "policies[0].rules[1][0][1].namespaces[0]",
        "'*' is only allowed",
    ),
    (
        [rule_with({"namespaces": [""]})],
        "policies[0].rules[1][0][1].namespaces[0]",
        "must not be empty",
    ),
    (
        [rule_with({"serviceAccounts": ["just-a-name"]})],
        "policies[0].rules[1][0][1].serviceAccounts[0]",
        "expected 'namespace/serviceAccount'",
    ),
    (
        [rule_with({"notServiceAccounts": [{"namespace": "a"}]})],
        "policies[0].rules[1][0][1].notServiceAccounts[0].serviceAccount",
        "expected a string",
    ),
    (
        [
            {"name": "p", "namespace": "n", "scope": "Global", "action": "Allow"},
            {"name": "p", "namespace": "n", "scope": "Namespace", "action": "Deny"},
        ],
        "policies[1].name",
        "duplicate policy n/p (first at policies[0])",
    ),
]


@pytest.mark.parametrize(("raw", "path", "reason"), BAD, ids=[b[1] + "|" + b[2] for b in BAD])
def test_errors_name_the_field(raw: list[Any], path: str, reason: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse(raw)
    assert err.value.source == "local.yaml"
    assert err.value.path == path
    assert reason in err.value.reason


def test_loader_reports_the_file_and_document() -> None:
    docs = [{"workloads": []}, {"policies": [rule_with({"sourceIps": ["x"]})]}]
    with pytest.raises(ConfigError) as err:
        parse_documents(docs, "mesh.yaml")
    assert str(err.value) == (
        "mesh.yaml: document[1].policies[0].rules[1][0][1].sourceIps[0]: "
        "not an IP address or CIDR: 'x'"
    )
