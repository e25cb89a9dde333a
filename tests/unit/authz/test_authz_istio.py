"""Istio AuthorizationPolicy / PeerAuthentication conversion: scopes, L4 fields, fail-closed
handling of HTTP attributes, PeerAuthentication precedence, and errors naming the field."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
import yaml

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
    parse_istio_resources,
    select_policies,
)
from ztunnel.errors import ConfigError
from ztunnel.identity import SpiffeId
from ztunnel.localconfig import parse_documents
from ztunnel.model import Workload

pytestmark = pytest.mark.unit

CLIENT = SpiffeId("cluster.local", "client-ns", "client-sa")


def convert(text: str, warnings: list[str] | None = None) -> list[AuthorizationPolicy]:
    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    return parse_istio_resources(
        [(f"document[{i}]", d) for i, d in enumerate(docs)], "mesh.yaml", warnings=warnings
    )


def workload(
    namespace: str = "app",
    labels: dict[str, str] | None = None,
    pols: list[AuthorizationPolicy] | None = None,
) -> Workload:
    """A workload, naming the selector policies that select it as istiod would."""
    named = select_policies(pols or [], namespace, labels or {})
    return Workload(
        uid=f"{namespace}/w",
        name="w",
        namespace=namespace,
        addresses=(ipaddress.ip_address("10.9.0.5"),),
        authorization_policies=named,
    )


def allowed(
    pols: list[AuthorizationPolicy],
    wl: Workload,
    identity: SpiffeId | None = CLIENT,
    port: int = 8080,
    src: str = "10.1.2.3",
) -> bool:
    c = ConnectionAttrs(
        identity, ipaddress.ip_address(src), ipaddress.ip_address("10.9.0.5"), port, wl
    )
    decision = Authorizer(pols).check(c)
    assert decision == decide_naive(pols, c)
    return decision.allowed


def authz_policy(spec: str, namespace: str = "app", name: str = "p", extra_meta: str = "") -> str:
    return f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: {name}, namespace: {namespace}{extra_meta}}}
spec:
{spec}
"""


def test_source_and_operation_fields_become_matches() -> None:
    (p,) = convert(
        authz_policy("""
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/client-ns/sa/client-sa", "*/sa/admin"]
        notNamespaces: ["blocked-*"]
        ipBlocks: ["10.0.0.0/8", "fd00::/8"]
        notIpBlocks: ["10.66.0.1"]
    - source: {serviceAccounts: ["client-sa", "ops/robot"]}
    to:
    - operation: {ports: ["8080", 9090], notPorts: ["22"]}
""")
    )
    assert (p.name, p.namespace, p.scope, p.action) == ("p", "app", Scope.NAMESPACE, Action.ALLOW)
    ((to_clause, from_clause),) = p.rules
    assert to_clause == (Match(destination_ports=(8080, 9090), not_destination_ports=(22,)),)
    assert from_clause[0] == Match(
        principals=(
            StringMatch.exact("cluster.local/ns/client-ns/sa/client-sa"),
            StringMatch.suffix("/sa/admin"),
        ),
        not_namespaces=(StringMatch.prefix("blocked-"),),
        source_ips=(ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8")),
        not_source_ips=(ipaddress.ip_network("10.66.0.1/32"),),
    )
    assert from_clause[1] == Match(
        service_accounts=(
            ServiceAccountMatch("app", "client-sa"),
            ServiceAccountMatch("ops", "robot"),
        )
    )
    wl = workload()
    assert allowed([p], wl)
    assert not allowed([p], wl, port=22)
    assert not allowed([p], wl, identity=None)


def test_scope_from_namespace_and_selector() -> None:
    pols = convert(
        authz_policy("  action: DENY\n  rules: [{}]", namespace="istio-system", name="g")
        + "\n---\n"
        + authz_policy("  action: DENY\n  rules: [{}]", name="n")
        + "\n---\n"
        + authz_policy("  selector: {matchLabels: {app: db}}\n  rules: [{}]", name="s")
        + "\n---\n"
        + authz_policy(
            "  selector: {matchLabels: {tier: x}}\n  rules: [{}]",
            namespace="istio-system",
            name="rs",
        )
        + "\n---\n"
        + authz_policy(
            "  selector: {matchLabels: {}}\n  action: DENY\n  rules: [{}]", name="empty-sel"
        )
    )
    assert [(p.key, p.scope) for p in pols] == [
        ("istio-system/g", Scope.GLOBAL),
        ("app/n", Scope.NAMESPACE),
        ("app/s", Scope.WORKLOAD_SELECTOR),
        ("istio-system/rs", Scope.WORKLOAD_SELECTOR),
        ("app/empty-sel", Scope.NAMESPACE),
    ]
    assert select_policies(pols, "app", {"app": "db", "tier": "x"}) == ("app/s", "istio-system/rs")
    assert select_policies(pols, "other", {"app": "db", "tier": "x"}) == ("istio-system/rs",)
    assert select_policies(pols, "app", {"app": "web"}) == ()


def test_empty_spec_allows_nothing_and_empty_rule_allows_everything() -> None:
    deny_all = convert(authz_policy("  {}"))
    assert deny_all[0].rules == ()
    assert not allowed(deny_all, workload())
    assert allowed(deny_all, workload("elsewhere"))
    allow_all = convert(authz_policy("  rules: [{}]"))
    assert allow_all[0].rules == ((),)
    assert allowed(allow_all, workload(), identity=None)


def test_allow_rule_needing_http_is_dropped_fail_closed() -> None:
    warnings: list[str] = []
    pols = convert(
        authz_policy("""
  rules:
  - to: [{operation: {paths: ["/admin"], ports: ["8080"]}}]
  - from: [{source: {namespaces: ["client-ns"]}}]
    when: [{key: "request.headers[x-user]", values: ["bob"]}]
  - from: [{source: {remoteIpBlocks: ["10.0.0.0/8"]}}]
  - to: [{operation: {ports: ["9090"]}}]
"""),
        warnings,
    )
    (p,) = pols
    assert p.rules == (((Match(destination_ports=(9090,)),),),)
    assert not allowed(pols, workload(), port=8080)  # the /admin rule no longer allows
    assert allowed(pols, workload(), port=9090)
    assert len(warnings) == 3
    assert warnings[0].startswith("mesh.yaml: document[0].spec.rules[0]: AuthorizationPolicy app/p")
    assert "document[0].spec.rules[0].to[0].operation.paths" in warnings[0]
    assert "ALLOW rule is dropped" in warnings[0]
    assert "when[0].key=request.headers[x-user]" in warnings[1]
    assert "remoteIpBlocks" in warnings[2]


def test_allow_with_only_http_rules_denies_everything() -> None:
    pols = convert(authz_policy("  rules: [{to: [{operation: {methods: [GET]}}]}]"))
    assert pols[0].rules == ()
    assert not allowed(pols, workload())


def test_deny_rule_needing_http_keeps_its_l4_part() -> None:
    warnings: list[str] = []
    pols = convert(
        authz_policy("""
  action: DENY
  rules:
  - from: [{source: {namespaces: ["client-ns"]}}]
    to: [{operation: {methods: ["POST"], ports: ["8080"]}}]
"""),
        warnings,
    )
    assert pols[0].rules == (
        (
            (Match(destination_ports=(8080,)),),
            (Match(namespaces=(StringMatch.exact("client-ns"),)),),
        ),
    )
    wl = workload()
    assert not allowed(pols, wl)  # any method from client-ns on 8080: denied (more restrictive)
    assert allowed(pols, wl, port=9090)
    assert allowed(pols, wl, identity=SpiffeId("cluster.local", "other", "sa"))
    assert len(warnings) == 1 and "DENY rule is enforced with only its L4 conditions" in warnings[0]


def test_deny_with_only_http_attributes_denies_everything_it_covers() -> None:
    # istiod would send an empty Match here, which ztunnel skips, so the DENY never fires
    # (istio/istio#61126); we fail closed instead.
    for spec in (
        "  action: DENY\n  rules: [{to: [{operation: {methods: [GET]}}]}]",
        "  action: DENY\n  rules: [{from: [{source: {notRequestPrincipals: ['*']}}]}]",
        "  action: DENY\n  rules: [{when: [{key: 'request.auth.claims[iss]', values: [x]}]}]",
    ):
        warnings: list[str] = []
        pols = convert(authz_policy(spec), warnings)
        assert pols[0].rules == ((),), spec
        assert "no conditions, denying every connection" in warnings[0]
        assert not allowed(pols, workload()), spec


def test_deny_from_alternatives_with_an_http_only_entry_match_every_source() -> None:
    pols = convert(
        authz_policy("""
  action: DENY
  rules:
  - from:
    - source: {namespaces: ["bad"]}
    - source: {requestPrincipals: ["issuer/*"]}
    to: [{operation: {ports: ["8080"]}}]
"""),
        [],
    )
    assert pols[0].rules == (((Match(destination_ports=(8080,)),),),)
    assert not allowed(pols, workload())
    assert allowed(pols, workload(), port=9090)


def test_null_fields_are_absent() -> None:
    (p,) = convert(
        authz_policy("  rules: [{to: null, from: [{source: {principals: null, namespaces: [a]}}]}]")
    )
    assert p.rules == (((Match(namespaces=(StringMatch.exact("a"),)),),),)


def test_when_conditions_on_l4_keys() -> None:
    (p,) = convert(
        authz_policy("""
  rules:
  - when:
    - {key: source.ip, values: ["10.1.0.0/16"], notValues: ["10.1.9.9"]}
    - {key: destination.port, values: ["8080"]}
    - {key: source.namespace, values: ["client-*"]}
    - {key: source.principal, notValues: ["*/sa/banned"]}
    - {key: destination.ip, values: ["10.9.0.0/24"]}
""")
    )
    assert len(p.rules[0]) == 5
    wl = workload()
    assert allowed([p], wl)
    assert not allowed([p], wl, src="10.1.9.9")
    assert not allowed([p], wl, port=80)
    assert not allowed([p], wl, identity=SpiffeId("cluster.local", "client-ns", "banned"))
    assert not allowed([p], wl, identity=None)


def test_audit_custom_and_target_refs_are_ignored_with_a_warning() -> None:
    warnings: list[str] = []
    pols = convert(
        authz_policy("  action: AUDIT\n  rules: [{}]", name="a")
        + "\n---\n"
        + authz_policy("  action: CUSTOM\n  provider: {name: ext}\n  rules: [{}]", name="c")
        + "\n---\n"
        + authz_policy(
            "  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io,"
            " name: wp}]\n  rules: [{}]",
            name="t",
        ),
        warnings,
    )
    assert pols == []
    assert len(warnings) == 3
    assert "does not support the AUDIT action" in warnings[0]
    assert "does not support the CUSTOM action" in warnings[1]
    assert "targetRef" in warnings[2]


def test_dry_run_annotation() -> None:
    (p,) = convert(
        authz_policy(
            "  action: DENY\n  rules: [{}]", extra_meta=", annotations: {istio.io/dry-run: 'true'}"
        )
    )
    assert p.dry_run
    assert allowed([p], workload())


def peer_authn(
    mode: str | None,
    namespace: str = "istio-system",
    name: str = "default",
    labels: dict[str, str] | None = None,
    ports: dict[int, str] | None = None,
    created: str | None = None,
) -> str:
    spec: dict[str, Any] = {}
    if mode:
        spec["mtls"] = {"mode": mode}
    if labels:
        spec["selector"] = {"matchLabels": labels}
    if ports:
        spec["portLevelMtls"] = {p: {"mode": m} for p, m in ports.items()}
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if created:
        meta["creationTimestamp"] = created
    return yaml.safe_dump(
        {
            "apiVersion": "security.istio.io/v1beta1",
            "kind": "PeerAuthentication",
            "metadata": meta,
            "spec": spec,
        }
    )


def test_mesh_strict_denies_plaintext_everywhere() -> None:
    pols = convert(peer_authn("STRICT"))
    assert [(p.key, p.scope, p.action) for p in pols] == [
        ("istio-system/istio_converted_static_strict", Scope.GLOBAL, Action.DENY)
    ]
    assert pols[0].rules == (((Match(not_principals=(StringMatch.presence(),)),),),)
    for ns in ("app", "istio-system", "anything"):
        assert not allowed(pols, workload(ns), identity=None)
        assert allowed(pols, workload(ns))


def test_namespace_strict_covers_only_that_namespace() -> None:
    pols = convert(peer_authn("STRICT", namespace="app"))
    assert [(p.key, p.scope) for p in pols] == [
        ("app/istio_converted_static_strict", Scope.NAMESPACE)
    ]
    assert not allowed(pols, workload("app"), identity=None)
    assert allowed(pols, workload("other"), identity=None)


@pytest.mark.parametrize("mode", ["PERMISSIVE", "DISABLE", "UNSET", None])
def test_non_strict_modes_produce_nothing(mode: str | None) -> None:
    assert convert(peer_authn(mode) + "\n---\n" + peer_authn(mode, namespace="app")) == []


def test_namespace_permissive_overrides_mesh_strict() -> None:
    pols = convert(
        peer_authn("STRICT")
        + "\n---\n"
        + peer_authn("PERMISSIVE", namespace="legacy")
        + "\n---\n"
        + peer_authn("UNSET", namespace="inherits")
    )
    # A namespace that is wholly STRICT keeps a NAMESPACE policy; the mesh-wide part, which
    # must skip `legacy`, becomes selector-scoped and is named by the workloads it selects.
    assert [(p.key, p.scope) for p in pols] == [
        ("inherits/istio_converted_static_strict", Scope.NAMESPACE),
        ("istio-system/istio_converted_static_strict", Scope.WORKLOAD_SELECTOR),
    ]
    for ns, strict in (
        ("legacy", False),
        ("inherits", True),
        ("app", True),
        ("istio-system", True),
    ):
        wl = workload(ns, pols=pols)
        assert allowed(pols, wl, identity=None) is not strict, ns
        assert allowed(pols, wl)
    assert workload("app", pols=pols).authorization_policies == (pols[1].key,)
    assert workload("legacy", pols=pols).authorization_policies == ()


def test_workload_strict_under_permissive_namespace() -> None:
    pols = convert(
        peer_authn("PERMISSIVE", namespace="app")
        + "\n---\n"
        + peer_authn("STRICT", namespace="app", name="db", labels={"app": "db"})
    )
    assert not allowed(pols, workload("app", {"app": "db"}, pols), identity=None)
    assert allowed(pols, workload("app", {"app": "web"}, pols), identity=None)
    assert allowed(pols, workload("other", {"app": "db"}, pols), identity=None)


def test_workload_permissive_under_namespace_strict() -> None:
    pols = convert(
        peer_authn("STRICT", namespace="app")
        + "\n---\n"
        + peer_authn("PERMISSIVE", namespace="app", name="legacy", labels={"app": "legacy"})
    )
    assert not allowed(pols, workload("app", {"app": "web"}, pols), identity=None)
    assert allowed(pols, workload("app", {"app": "legacy"}, pols), identity=None)


def test_port_level_permissive_under_strict() -> None:
    pols = convert(
        peer_authn(
            "STRICT", namespace="app", name="pa", labels={"app": "db"}, ports={8080: "PERMISSIVE"}
        )
    )
    keys = [p.key for p in pols]
    assert "app/converted_peer_authentication_pa" in keys
    wl = workload("app", {"app": "db"}, pols)
    assert "app/converted_peer_authentication_pa" in wl.authorization_policies
    assert allowed(pols, wl, identity=None, port=8080)
    assert not allowed(pols, wl, identity=None, port=9090)
    assert allowed(pols, wl, port=9090)


def test_port_level_strict_under_permissive_and_inherited_mesh_strict() -> None:
    pols = convert(
        peer_authn(
            "PERMISSIVE", namespace="app", name="pa", labels={"app": "db"}, ports={9090: "STRICT"}
        )
    )
    wl = workload("app", {"app": "db"}, pols)
    assert allowed(pols, wl, identity=None, port=8080)
    assert not allowed(pols, wl, identity=None, port=9090)

    pols = convert(
        peer_authn("STRICT")
        + "\n---\n"
        + peer_authn(
            None,
            namespace="app",
            name="pa",
            labels={"app": "db"},
            ports={8080: "PERMISSIVE", 8081: "DISABLE"},
        )
    )
    wl = workload("app", {"app": "db"}, pols)
    assert allowed(pols, wl, identity=None, port=8080)
    assert allowed(pols, wl, identity=None, port=8081)
    assert not allowed(pols, wl, identity=None, port=9090)
    other = workload("app", {"app": "web"}, pols)
    assert not allowed(pols, other, identity=None, port=8080)
    assert not allowed(pols, workload("x", {}, pols), identity=None)


def test_oldest_policy_wins() -> None:
    warnings: list[str] = []
    pols = convert(
        peer_authn("STRICT", name="new", created="2024-05-01T00:00:00Z")
        + "\n---\n"
        + peer_authn("PERMISSIVE", name="old", created="2023-01-01T00:00:00Z"),
        warnings,
    )
    assert pols == []
    assert len(warnings) == 1 and "PeerAuthentication istio-system/new: ignored" in warnings[0]
    # Overlapping workload policies: the older one decides for the workloads both select.
    pols = convert(
        peer_authn(
            "STRICT",
            namespace="app",
            name="a",
            labels={"app": "db"},
            created="2024-05-01T00:00:00Z",
        )
        + "\n---\n"
        + peer_authn(
            "PERMISSIVE",
            namespace="app",
            name="b",
            labels={"tier": "data"},
            created="2023-01-01T00:00:00Z",
        )
    )
    assert allowed(pols, workload("app", {"app": "db", "tier": "data"}, pols), identity=None)
    assert not allowed(pols, workload("app", {"app": "db"}, pols), identity=None)


def test_root_namespace_selector_peer_authentication_is_ignored() -> None:
    warnings: list[str] = []
    assert convert(peer_authn("STRICT", labels={"app": "x"}), warnings) == []
    assert "ignored for ambient workloads" in warnings[0]


def test_through_the_local_config_loader() -> None:
    text = (
        """
workloads:
- {name: db, namespace: app, workloadIps: ["10.9.0.5"]}
---
"""
        + peer_authn("STRICT")
        + "\n---\n"
        + authz_policy("""
  rules:
  - from: [{source: {principals: ["cluster.local/ns/client-ns/sa/client-sa"]}}]
""")
    )
    state = parse_documents(list(yaml.safe_load_all(text)), "mesh.yaml")
    pols = list(state.policies)
    assert {p.key for p in pols} == {"app/p", "istio-system/istio_converted_static_strict"}
    (wl,) = state.workloads
    assert allowed(pols, wl)
    assert not allowed(pols, wl, identity=None)
    assert not allowed(pols, wl, identity=SpiffeId("cluster.local", "client-ns", "other"))


BAD = [
    (
        "apiVersion: security.istio.io/v2\nkind: AuthorizationPolicy\nmetadata: {name: p}\n",
        "document[0].apiVersion",
        "expected one of",
    ),
    (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {}\n",
        "document[0].metadata.name",
        "expected a string",
    ),
    (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: Bad_Name}\n",
        "document[0].metadata.name",
        "not a valid Kubernetes name",
    ),
    (
        authz_policy("  rules: [{from: [{source: {ipBlocks: ['10.0.0.0/8', '10.0.0.300/8']}}]}]"),
        "document[0].spec.rules[0].from[0].source.ipBlocks[1]",
        "not an IP address or CIDR",
    ),
    (
        authz_policy("  rules: [{from: [{source: {}}]}]"),
        "document[0].spec.rules[0].from[0].source",
        "must not be empty",
    ),
    (
        authz_policy("  rules: [{from: [{}]}]"),
        "document[0].spec.rules[0].from[0].source",
        "must not be null",
    ),
    (authz_policy("  rules: [{to: []}]"), "document[0].spec.rules[0].to", "must not be empty"),
    (
        authz_policy("  rules: [{from: [{source: {principal: [x]}}]}]"),
        "document[0].spec.rules[0].from[0].source.principal",
        "unknown field",
    ),
    (
        authz_policy("  rules: [{to: [{operation: {ports: ['http']}}]}]"),
        "document[0].spec.rules[0].to[0].operation.ports[0]",
        "not a port number",
    ),
    (
        authz_policy("  rules: [{to: [{operation: {ports: ['70000']}}]}]"),
        "document[0].spec.rules[0].to[0].operation.ports[0]",
        "port out of range",
    ),
    (
        authz_policy("  rules: [{when: [{key: source.ip}]}]"),
        "document[0].spec.rules[0].when[0]",
        "at least one of `values` or `notValues`",
    ),
    (
        authz_policy("  rules: [{when: [{key: source.color, values: [red]}]}]"),
        "document[0].spec.rules[0].when[0].key",
        "unknown attribute",
    ),
    (
        authz_policy("  rules: [{from: [{source: {principals: ['ns/*/sa/x']}}]}]"),
        "document[0].spec.rules[0].from[0].source.principals[0]",
        "'*' is only allowed",
    ),
    (
        authz_policy("  rules: [{from: [{source: {principals: ['']}}]}]"),
        "document[0].spec.rules[0].from[0].source.principals[0]",
        "must not be empty",
    ),
    (
        authz_policy("  rules: [{from: [{source: {serviceAccounts: [a], namespaces: [b]}}]}]"),
        "document[0].spec.rules[0].from[0].source",
        "cannot set serviceAccounts",
    ),
    (authz_policy("  action: REJECT"), "document[0].spec.action", "must be ALLOW, DENY"),
    (authz_policy("  action: DENY"), "document[0].spec.rules", "DENY policy without rules"),
    (authz_policy("  action: DENY\n  rules: []"), "document[0].spec.rules", "without rules"),
    (
        authz_policy("  rules: [{from: [{source: {principals: []}}]}]"),
        "document[0].spec.rules[0].from[0].source.principals",
        "must not be empty when present",
    ),
    (authz_policy("  rules: [null]"), "document[0].spec.rules[0]", "must not be null"),
    (
        authz_policy("  selector: {matchLabels: {version: 1}}"),
        "document[0].spec.selector.matchLabels.version",
        "must be strings",
    ),
    (authz_policy("  rulez: []"), "document[0].spec.rulez", "unknown field"),
    (
        peer_authn("STRICT", namespace="app", ports={8080: "PERMISSIVE"}),
        "document[0].spec.portLevelMtls",
        "cannot have port level mTLS",
    ),
    (peer_authn("SECURE"), "document[0].spec.mtls.mode", "must be one of"),
    (
        peer_authn("STRICT", namespace="app", labels={"a": "b"}, ports={0: "STRICT"}),
        "document[0].spec.portLevelMtls.0",
        "port out of range",
    ),
    (
        authz_policy("  rules: [{}]") + "\n---\n" + authz_policy("  rules: [{}]"),
        "document[1].metadata.name",
        "duplicate AuthorizationPolicy app/p",
    ),
]


@pytest.mark.parametrize(("text", "path", "reason"), BAD, ids=[b[1] + "|" + b[2] for b in BAD])
def test_malformed_resources_name_the_document_and_field(text: str, path: str, reason: str) -> None:
    with pytest.raises(ConfigError) as err:
        convert(text)
    assert err.value.source == "mesh.yaml"
    assert err.value.path == path
    assert reason in err.value.reason


def test_single_document_paths_have_no_document_prefix() -> None:
    doc = yaml.safe_load(authz_policy("  rules: [{to: [{operation: {ports: [x]}}]}]"))
    with pytest.raises(ConfigError) as err:
        parse_istio_resources([("<top>", doc)], "one.yaml")
    assert str(err.value).startswith("one.yaml: spec.rules[0].to[0].operation.ports[0]: ")
