"""The mesh-state file (`--local-xds`): a valid file, a directory of files, and malformed files
whose `ConfigError` names the file, the field path and the reason."""

from __future__ import annotations

import ipaddress
import textwrap
from pathlib import Path

import pytest
import yaml

from ztunnel.errors import ConfigError
from ztunnel.localconfig import fingerprint, load_mesh_state
from ztunnel.model import (
    GatewayAddress,
    NamespacedHostname,
    NetworkAddress,
    TunnelProtocol,
    WorkloadStatus,
)

pytestmark = pytest.mark.unit

ip = ipaddress.ip_address

VALID = """\
workloads:
  - uid: Kubernetes//Pod/shop/echo-1
    name: echo-1
    namespace: shop
    serviceAccount: echo
    workloadIps: [10.0.0.1, "fd00::1"]
    node: node-a
    canonicalName: echo
    canonicalRevision: v1
    services:
      shop/echo.shop.svc.cluster.local: {80: 8080}
  - name: legacy
    workloadIp: 10.0.0.2
    protocol: TCP
    status: unhealthy
    waypoint: 10.0.0.9
  - name: behind-waypoint
    namespace: shop
    workloadIps: [10.0.0.3]
    waypoint: {destination: shop/waypoint.shop.svc.cluster.local, hboneMtlsPort: 15009}
services:
  - name: echo
    namespace: shop
    hostname: echo.shop.svc.cluster.local
    vips: [10.96.0.1, "net1/10.96.0.2"]
    ports: {80: 8080}
    subjectAltNames: [spiffe://cluster.local/ns/shop/sa/echo-extra]
  - name: other
    namespace: shop
    hostname: other.shop.svc.cluster.local
    vips: [10.96.0.3]
    ports:
      - {servicePort: 443, targetPort: 8443, appProtocol: tcp}
"""


def write(tmp_path: Path, text: str, name: str = "mesh.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_valid_file(tmp_path: Path) -> None:
    state = load_mesh_state(write(tmp_path, VALID))
    assert [w.name for w in state.workloads] == ["echo-1", "legacy", "behind-waypoint"]
    echo = state.workload_by_ip("fd00::1")
    assert echo is not None and echo.name == "echo-1"
    assert echo.identity.uri == "spiffe://cluster.local/ns/shop/sa/echo"
    assert echo.protocol is TunnelProtocol.HBONE and echo.node == "node-a"
    assert echo.services == {"shop/echo.shop.svc.cluster.local": {80: 8080}}
    legacy = state.workload_by_ip("10.0.0.2")
    assert legacy is not None
    assert legacy.namespace == "default" and legacy.service_account == "default"
    assert legacy.protocol is TunnelProtocol.TCP and legacy.status is WorkloadStatus.UNHEALTHY
    assert legacy.waypoint == GatewayAddress(NetworkAddress("", ip("10.0.0.9")), 15008)
    bw = state.workload_by_ip("10.0.0.3")
    assert bw is not None and bw.waypoint == GatewayAddress(
        NamespacedHostname("shop", "waypoint.shop.svc.cluster.local"), 15009
    )
    svc = state.service_by_vip("10.96.0.2")
    assert svc is not None and svc.key == "shop/echo.shop.svc.cluster.local"
    assert svc.port(80) is not None and svc.port(80).target_port == 8080  # type: ignore[union-attr]
    assert [v.network for v in svc.vips] == ["", "net1"]
    assert state.healthy_endpoints(svc) == [echo]
    other = state.service_by_hostname("shop", "other.shop.svc.cluster.local")
    assert other is not None and other.port(443).target_port == 8443  # type: ignore[union-attr]


def test_empty_file_is_an_empty_mesh(tmp_path: Path) -> None:
    state = load_mesh_state(write(tmp_path, ""))
    assert state.workloads == () and state.services == ()


def test_several_documents_in_one_file(tmp_path: Path) -> None:
    text = (
        "workloads: [{name: a, workloadIps: [10.0.0.1]}]\n---\n"
        "workloads: [{name: b, workloadIps: [10.0.0.2]}, {name: c, workloadIps: [nope]}]\n"
    )
    with pytest.raises(ConfigError) as exc:
        load_mesh_state(write(tmp_path, text))
    assert "document[1].workloads[1].workloadIps[0]" in str(exc.value)


# ---- malformed files: the message names the file, the field path and why ----------------------

MALFORMED = [
    # (yaml, field path, words of the reason)
    (
        "workloads: [{name: a, workloadIps: [10.0.0.1]}, {name: b, workloadIps: [10.0.0.300]}]",
        "workloads[1].workloadIps[0]",
        "10.0.0.300",
    ),
    (
        "workloads: [{name: a, workloadIps: [10.0.0.1, 42]}]",
        "workloads[0].workloadIps[1]",
        "IP address",
    ),
    ("workloads: [{namespace: x, workloadIps: [10.0.0.1]}]", "workloads[0].name", "required"),
    ("workloads: [{name: a}]", "workloads[0].workloadIps", "address"),
    ("workloads: [{name: a, workloadIps: 10.0.0.1}]", "workloads[0].workloadIps", "list"),
    (
        "workloads: [{name: a, workloadIps: [10.0.0.1], protocol: QUIC}]",
        "workloads[0].protocol",
        "QUIC",
    ),
    (
        "workloads: [{name: a, workloadIps: [10.0.0.1], status: SLEEPY}]",
        "workloads[0].status",
        "HEALTHY",
    ),
    (
        "workloads: [{name: a, workloadIps: [10.0.0.1], services: {nohost: {80: 8080}}}]",
        "workloads[0].services.nohost",
        "namespace/hostname",
    ),
    (
        "workloads: [{name: a, workloadIps: [10.0.0.1], services: {a/b: {80: 70000}}}]",
        "workloads[0].services.a/b.80",
        "70000",
    ),
    (
        "workloads: [{name: a, workloadIps: [10.0.0.1], services: {a/b: {80: true}}}]",
        "workloads[0].services.a/b.80",
        "port",
    ),
    (
        "workloads: [{name: a, workloadIps: [10.0.0.1], waypoint: 'not an address'}]",
        "workloads[0].waypoint",
        "not an address",
    ),
    (
        "workloads: [{name: a, workloadIps: [10.0.0.1], waypoint: {hboneMtlsPort: 0,"
        " destination: 10.0.0.9}}]",
        "workloads[0].waypoint.hboneMtlsPort",
        "0",
    ),
    (
        "workloads: [{name: a, workloadIps: [10.0.0.1], serviceAccount: 'a/b'}]",
        "workloads[0]",
        "service account",
    ),
    (
        "workloads: [{name: a, workloadIps: [10.0.0.1], trustDomain: 'Bad Domain'}]",
        "workloads[0]",
        "trust domain",
    ),
    ("workloads: [{name: 7, workloadIps: [10.0.0.1]}]", "workloads[0].name", "string"),
    ("workloads: {name: a}", "workloads", "list"),
    (
        "services: [{name: s, hostname: s.ns.svc, vips: [300.1.1.1]}]",
        "services[0].vips[0]",
        "300.1.1.1",
    ),
    ("services: [{name: s, hostname: s.ns.svc, ports: {80: 0}}]", "services[0].ports.80", "0"),
    (
        "services: [{name: s, hostname: s.ns.svc, ports: [{targetPort: 80}]}]",
        "services[0].ports[0].servicePort",
        "port",
    ),
    (
        "services: [{name: s, hostname: s.ns.svc, subjectAltNames: [nope]}]",
        "services[0].subjectAltNames[0]",
        "SPIFFE",
    ),
    ("services: [{name: s}]", "services[0].hostname", "required"),
    (
        "services: [{name: s, hostname: h, waypoint: {destination: {namespace: ns}}}]",
        "services[0].waypoint.destination.hostname",
        "required",
    ),
    ("workloadz: []", "<top>", "workloadz"),
    ("kind: Deployment", "kind", "Deployment"),
    ("- just\n- a list", "<top>", "mapping"),
]


@pytest.mark.parametrize(("text", "path", "why"), MALFORMED, ids=[m[1] for m in MALFORMED])
def test_malformed_file_names_file_and_field(
    tmp_path: Path, text: str, path: str, why: str
) -> None:
    f = write(tmp_path, text + "\n")
    with pytest.raises(ConfigError) as exc:
        load_mesh_state(f)
    msg = str(exc.value)
    assert str(f) in msg, msg
    assert f": {path}:" in msg, msg
    assert why in msg, msg
    assert exc.value.source == str(f)
    assert exc.value.path == path


def test_duplicate_ip_names_both_workloads_and_the_field(tmp_path: Path) -> None:
    f = write(
        tmp_path,
        """\
        workloads:
          - {name: first, workloadIps: [10.0.0.1]}
          - {name: second, namespace: other, workloadIps: [10.0.0.2, 10.0.0.1]}
        """,
    )
    with pytest.raises(ConfigError) as exc:
        load_mesh_state(f)
    msg = str(exc.value)
    assert str(f) in msg and "10.0.0.1" in msg and "first" in msg and "second" in msg, msg
    assert "workloads[1].workloadIps[1]" in msg, msg


def test_duplicate_uid_is_rejected(tmp_path: Path) -> None:
    f = write(
        tmp_path,
        """\
        workloads:
          - {name: a, uid: same, workloadIps: [10.0.0.1]}
          - {name: b, uid: same, workloadIps: [10.0.0.2]}
        """,
    )
    with pytest.raises(ConfigError, match="same"):
        load_mesh_state(f)


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("workloads:\n  - name: a\n    workloadIps: [10.0.0.1, ]]\n", 3),
        ("workloads:\n  - name: a\n\tnamespace: x\n", 3),
        ("services: []\nworkloads:\n  - name: a\n    workloadIps: [10.0.0.1]\n  - {name: b\n", 6),
    ],
)
def test_bad_yaml_names_the_line(tmp_path: Path, text: str, line: int) -> None:
    f = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_mesh_state(f)
    msg = str(exc.value)
    assert str(f) in msg and f"line {line}," in msg and "YAML" in msg, msg


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_mesh_state(tmp_path / "nope.yaml")
    assert str(tmp_path / "nope.yaml") in str(exc.value)


# ---- a directory of files --------------------------------------------------------------------


def test_directory_of_files_is_merged(tmp_path: Path) -> None:
    write(
        tmp_path,
        "workloads: [{name: a, workloadIps: [10.0.0.1], services: {shop/s: {}}}]\n",
        "10-a.yaml",
    )
    write(
        tmp_path,
        "workloads: [{name: b, workloadIps: [10.0.0.2], services: {shop/s: {}}}]\n",
        "20-b.yml",
    )
    write(
        tmp_path,
        yaml.safe_dump(
            {
                "services": [
                    {"name": "s", "namespace": "shop", "hostname": "s", "vips": ["10.96.0.1"]}
                ]
            }
        ),
        "30-svc.yaml",
    )
    write(tmp_path, "this is not yaml: [", "README.txt")  # ignored: not a YAML file
    state = load_mesh_state(tmp_path)
    assert sorted(w.name for w in state.workloads) == ["a", "b"]
    svc = state.service_by_vip("10.96.0.1")
    assert svc is not None
    assert sorted(w.name for w in state.healthy_endpoints(svc)) == ["a", "b"]


def test_directory_error_names_the_bad_file(tmp_path: Path) -> None:
    write(tmp_path, "workloads: [{name: a, workloadIps: [10.0.0.1]}]\n", "a.yaml")
    bad = write(tmp_path, "workloads: [{name: b, workloadIps: [nope]}]\n", "b.yaml")
    with pytest.raises(ConfigError) as exc:
        load_mesh_state(tmp_path)
    assert exc.value.source == str(bad)
    assert "workloads[0].workloadIps[0]" in str(exc.value)


def test_directory_duplicate_ip_across_files_is_rejected(tmp_path: Path) -> None:
    write(tmp_path, "workloads: [{name: a, workloadIps: [10.0.0.1]}]\n", "a.yaml")
    write(tmp_path, "workloads: [{name: b, workloadIps: [10.0.0.1]}]\n", "b.yaml")
    with pytest.raises(ConfigError) as exc:
        load_mesh_state(tmp_path)
    msg = str(exc.value)
    assert "10.0.0.1" in msg and "b.yaml" in msg, msg


def test_fingerprint_changes_with_the_content(tmp_path: Path) -> None:
    f = write(tmp_path, "workloads: []\n")
    before = fingerprint(f)
    f.write_text("workloads: [{name: a, workloadIps: [10.0.0.1]}]\n")
    assert fingerprint(f) != before
    d_before = fingerprint(tmp_path)
    write(tmp_path, "services: []\n", "more.yaml")
    assert fingerprint(tmp_path) != d_before
