"""What the config model reads for `ztunnel analyze` besides what the waypoint needs: the
default namespace of `-n`, every bad document collected instead of the first raised,
ServiceEntry, the networking.istio.io Gateway, workload controllers' pod templates, pod
containers, Service type and the waypoint listeners' allowedRoutes."""

from __future__ import annotations

import textwrap

import pytest

from ztunnel.meshconfig import ConfigOptions, ResourceError, parse_documents, parse_yaml
from ztunnel.meshconfig.load import ConfigSet

pytestmark = pytest.mark.unit


def load(text: str, errors: list[ResourceError] | None = None, **opts: object) -> ConfigSet:
    options = ConfigOptions(analysis_kinds=True, **opts)  # type: ignore[arg-type]
    return parse_documents(parse_yaml(textwrap.dedent(text), "in.yaml"), options, errors)


def test_resources_without_a_namespace_take_the_default_namespace() -> None:
    cs = load(
        """
        apiVersion: v1
        kind: Service
        metadata: {name: a}
        ---
        apiVersion: v1
        kind: Service
        metadata: {name: b, namespace: other}
        ---
        apiVersion: v1
        kind: Namespace
        metadata: {name: shop}
        """,
        default_namespace="shop",
    )
    assert [(s.meta.namespace, s.meta.name) for s in cs.services] == [
        ("shop", "a"),
        ("other", "b"),
    ]
    assert cs.namespaces[0].meta.namespace == ""


BAD_AND_GOOD = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: broken}
spec:
  subsets: [{name: v1}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: fine}
spec: {host: reviews}
"""


def test_bad_documents_are_collected_and_the_rest_is_parsed() -> None:
    errors: list[ResourceError] = []
    cs = load(BAD_AND_GOOD, errors)
    assert [d.meta.name for d in cs.destination_rules] == ["fine"]
    [e] = errors
    assert (e.file, e.line, e.field_path) == ("in.yaml", 5, "spec.host")
    assert e.meta is not None and e.meta.label == "DestinationRule default/broken"
    assert str(e) == "in.yaml:5: DestinationRule default/broken: spec.host: is required"


def test_without_an_error_list_the_first_bad_document_raises() -> None:
    with pytest.raises(ResourceError, match=r"spec\.host: is required"):
        load(BAD_AND_GOOD)


def test_service_entry_and_istio_gateway_are_parsed_only_for_analysis() -> None:
    text = """
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {name: ext, namespace: shop}
        spec:
          hosts: [api.example.com]
          ports: [{number: 443, name: https, protocol: HTTPS}, {number: 80, name: http}]
          exportTo: ["."]
          resolution: DNS
        ---
        apiVersion: networking.istio.io/v1
        kind: Gateway
        metadata: {name: edge, namespace: shop}
        spec:
          selector: {istio: ingressgateway}
          servers:
          - port: {number: 80, name: http, protocol: HTTP}
            hosts: ["./bookinfo.example.com"]
        ---
        apiVersion: gateway.networking.k8s.io/v1
        kind: Gateway
        metadata: {name: edge, namespace: shop}
        spec:
          gatewayClassName: istio-waypoint
          listeners: [{name: mesh, port: 15008, protocol: HBONE}]
        """
    cs = load(text)
    [se] = cs.service_entries
    assert se.hosts == ("api.example.com",)
    assert [(p.number, p.name, p.protocol) for p in se.ports] == [
        (443, "https", "HTTPS"),
        (80, "http", ""),
    ]
    assert (se.export_to, se.resolution, se.location) == ((".",), "DNS", "MESH_EXTERNAL")
    [gw] = cs.istio_gateways
    assert gw.selector == (("istio", "ingressgateway"),)
    assert gw.servers[0].hosts == ("./bookinfo.example.com",)
    assert [g.meta.name for g in cs.gateways] == ["edge"]  # same name, another API group
    plain = parse_documents(parse_yaml(textwrap.dedent(text), "in.yaml"))
    assert not plain.service_entries and not plain.istio_gateways
    assert [s.kind for s in plain.skipped] == ["ServiceEntry", "Gateway"]


@pytest.mark.parametrize(
    ("spec", "path", "reason"),
    [
        ("{}", "spec.hosts", "service entry must have at least one host"),
        ("{hosts: ['*']}", "spec.hosts[0]", "invalid host *"),
        (
            "{hosts: [a.com], ports: [{number: 80, name: a}, {number: 80, name: b}]}",
            "spec.ports[1].number",
            "service entry port 80 already defined",
        ),
        ("{hosts: [a.com], ports: [{number: 80, protocol: SCTP}]}", "spec.ports[0].protocol", ""),
        ("{hosts: [a.com], resolution: MAGIC}", "spec.resolution", "must be one of"),
    ],
)
def test_service_entry_validation_names_the_field(spec: str, path: str, reason: str) -> None:
    errors: list[ResourceError] = []
    load(
        f"""
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {{name: ext}}
        spec: {spec}
        """,
        errors,
    )
    [e] = errors
    assert e.field_path == path
    assert reason in e.reason


def test_istio_gateway_server_needs_named_port_and_hosts() -> None:
    errors: list[ResourceError] = []
    load(
        """
        apiVersion: networking.istio.io/v1
        kind: Gateway
        metadata: {name: a}
        spec:
          servers: [{port: {number: 80, protocol: HTTP}, hosts: ["*"]}]
        ---
        apiVersion: networking.istio.io/v1
        kind: Gateway
        metadata: {name: b}
        spec:
          servers: [{port: {number: 80, name: http, protocol: HTTP}}]
        """,
        errors,
    )
    assert [(e.meta.name if e.meta else "", e.field_path) for e in errors] == [
        ("a", "spec.servers[0].port.name"),
        ("b", "spec.servers[0].hosts"),
    ]


def test_workloads_pods_and_services_carry_what_analysis_matches_on() -> None:
    cs = load(
        """
        apiVersion: apps/v1
        kind: Deployment
        metadata: {name: reviews-v1, namespace: shop}
        spec:
          replicas: 2
          selector: {matchLabels: {app: reviews}}
          template:
            metadata:
              labels: {app: reviews, version: v1}
              annotations: {sidecar.istio.io/status: '{}'}
            spec:
              serviceAccountName: reviews
              containers: [{name: app, image: x}, {name: istio-proxy, image: y}]
              initContainers: [{name: istio-init, image: y}]
        ---
        apiVersion: v1
        kind: Pod
        metadata: {name: p, namespace: shop}
        spec:
          hostNetwork: true
          containers: [{name: app}]
        ---
        apiVersion: v1
        kind: Service
        metadata: {name: ext, namespace: shop}
        spec: {type: ExternalName, externalName: a.example.com}
        ---
        apiVersion: extensions/v1beta1
        kind: Deployment
        metadata: {name: old}
        """
    )
    [w] = cs.workloads
    assert w.meta.kind == "Deployment"
    assert w.pod_labels == (("app", "reviews"), ("version", "v1"))
    assert dict(w.pod_annotations) == {"sidecar.istio.io/status": "{}"}
    assert w.containers == ("app", "istio-proxy", "istio-init")
    assert w.service_account == "reviews"
    [p] = cs.pods
    assert (p.containers, p.host_network) == (("app",), True)
    assert cs.services[0].service_type == "ExternalName"
    assert [(s.kind, s.reason) for s in cs.skipped] == [
        ("Deployment", "apiVersion extensions/v1beta1 not modelled")
    ]


def test_waypoint_listener_allowed_routes() -> None:
    cs = load(
        """
        apiVersion: gateway.networking.k8s.io/v1
        kind: Gateway
        metadata: {name: waypoint, namespace: infra}
        spec:
          gatewayClassName: istio-waypoint
          listeners:
          - {name: same, port: 15008, protocol: HBONE}
          - name: all
            port: 15009
            protocol: HBONE
            allowedRoutes: {namespaces: {from: All}}
          - name: selected
            port: 15010
            protocol: HBONE
            allowedRoutes:
              namespaces:
                from: Selector
                selector: {matchLabels: {mesh: "on"}}
        """
    )
    same, every, selected = cs.gateways[0].listeners
    assert same.allows_namespace("infra", "infra", {})
    assert not same.allows_namespace("infra", "shop", {})
    assert every.allows_namespace("infra", "shop", {})
    assert selected.allows_namespace("infra", "shop", {"mesh": "on"})
    assert not selected.allows_namespace("infra", "shop", {})
    errors: list[ResourceError] = []
    load(
        """
        apiVersion: gateway.networking.k8s.io/v1
        kind: Gateway
        metadata: {name: w}
        spec:
          gatewayClassName: istio-waypoint
          listeners:
          - {name: m, port: 15008, protocol: HBONE, allowedRoutes: {namespaces: {from: Some}}}
        """,
        errors,
    )
    assert errors[0].field_path == "spec.listeners[0].allowedRoutes.namespaces.from"
