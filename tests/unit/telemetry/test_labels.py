"""Istio traffic labels computed from connection records."""

from __future__ import annotations

import ipaddress

import pytest

from ztunnel.identity import SpiffeId
from ztunnel.model import Service, Workload
from ztunnel.proxy.records import ConnectionRecord
from ztunnel.telemetry.labels import UNKNOWN, TrafficLabels, traffic_labels

pytestmark = pytest.mark.unit

WEB = SpiffeId("cluster.local", "frontend", "web")
ECHO = SpiffeId("cluster.local", "shop", "echo")


def workload(name: str, ns: str, sa: str, ip: str, **kw: str) -> Workload:
    return Workload(
        uid=f"Kubernetes//Pod/{ns}/{name}",
        name=name,
        namespace=ns,
        addresses=(ipaddress.ip_address(ip),),
        service_account=sa,
        **kw,  # type: ignore[arg-type]
    )


CLIENT = workload(
    "client-7d9f",
    "frontend",
    "web",
    "10.0.0.1",
    canonical_name="client",
    canonical_revision="v1",
    workload_name="client",
    cluster_id="east",
)
SERVER = workload(
    "echo-0", "shop", "echo", "10.0.0.2", canonical_name="echo", canonical_revision="v2"
)
SERVICE = Service("echo", "shop", "echo.shop.svc.cluster.local")


def test_label_names_are_istios_in_order() -> None:
    assert TrafficLabels.label_names() == (
        "reporter",
        "source_workload",
        "source_canonical_service",
        "source_canonical_revision",
        "source_workload_namespace",
        "source_principal",
        "source_app",
        "source_version",
        "source_cluster",
        "destination_service",
        "destination_service_namespace",
        "destination_service_name",
        "destination_workload",
        "destination_canonical_service",
        "destination_canonical_revision",
        "destination_workload_namespace",
        "destination_principal",
        "destination_app",
        "destination_version",
        "destination_cluster",
        "request_protocol",
        "response_flags",
        "connection_security_policy",
    )


def test_outbound_hbone_record_reports_source_with_everything_known() -> None:
    rec = ConnectionRecord(
        "outbound",
        ("10.0.0.1", 40000),
        ("10.96.0.10", 80),
        src_workload=CLIENT,
        src_identity=WEB,
        dst_workload=SERVER,
        dst_identity=ECHO,
        dst_service=SERVICE,
        mtls=True,
        path="hbone",
    )
    assert traffic_labels(rec)._asdict() == {
        "reporter": "source",
        "source_workload": "client",
        "source_canonical_service": "client",
        "source_canonical_revision": "v1",
        "source_workload_namespace": "frontend",
        "source_principal": "spiffe://cluster.local/ns/frontend/sa/web",
        "source_app": "client",
        "source_version": "v1",
        "source_cluster": "east",
        "destination_service": "echo.shop.svc.cluster.local",
        "destination_service_namespace": "shop",
        "destination_service_name": "echo",
        "destination_workload": "echo-0",
        "destination_canonical_service": "echo",
        "destination_canonical_revision": "v2",
        "destination_workload_namespace": "shop",
        "destination_principal": "spiffe://cluster.local/ns/shop/sa/echo",
        "destination_app": "echo",
        "destination_version": "v2",
        "destination_cluster": "Kubernetes",
        "request_protocol": "tcp",
        "response_flags": "-",
        "connection_security_policy": "mutual_tls",
    }


def test_inbound_plaintext_from_outside_the_mesh_is_unknown_where_nothing_is_known() -> None:
    rec = ConnectionRecord(
        "inbound",
        ("192.0.2.7", 5555),
        ("10.0.0.2", 8080),
        dst_workload=SERVER,
        path="plaintext",
    )
    labels = traffic_labels(rec)
    assert labels.reporter == "destination"
    for name in (
        "source_workload",
        "source_canonical_service",
        "source_canonical_revision",
        "source_workload_namespace",
        "source_principal",
        "source_app",
        "source_version",
        "source_cluster",
        "destination_service",
        "destination_service_namespace",
        "destination_service_name",
    ):
        assert getattr(labels, name) == UNKNOWN, name
    # The destination principal comes from the destination workload when no peer said so.
    assert labels.destination_principal == ECHO.uri
    assert labels.connection_security_policy == UNKNOWN


def test_inbound_source_principal_is_the_peer_identity_never_guessed_from_the_ip() -> None:
    rec = ConnectionRecord(
        "inbound",
        ("10.0.0.1", 1),
        ("10.0.0.2", 8080),
        src_workload=CLIENT,
        dst_workload=SERVER,
        mtls=True,
    )
    assert traffic_labels(rec).source_principal == UNKNOWN
    assert traffic_labels(rec).source_workload == "client"
    rec.src_identity = WEB
    assert traffic_labels(rec).source_principal == WEB.uri


def test_workload_name_falls_back_to_the_pod_name_and_revision_to_latest() -> None:
    bare = workload("pod-1", "ns", "sa", "10.0.0.9")
    rec = ConnectionRecord("outbound", ("10.0.0.9", 1), ("10.0.0.2", 2), src_workload=bare)
    labels = traffic_labels(rec)
    assert labels.source_workload == "pod-1"
    assert labels.source_canonical_service == "pod-1"
    assert labels.source_canonical_revision == "latest"


def test_response_flag_of_a_failed_record() -> None:
    rec = ConnectionRecord(
        "outbound",
        ("10.0.0.1", 1),
        ("10.0.0.2", 9),
        src_workload=CLIENT,
        src_identity=WEB,
        response_flag="CONNECT",
        error="refused",
    )
    assert traffic_labels(rec).response_flags == "CONNECT"
    rec.response_flag = ""
    assert traffic_labels(rec).response_flags == "-"
