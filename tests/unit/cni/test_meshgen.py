"""Kubernetes objects -> mesh state, as istiod derives it; the agents' parser accepts it."""

from __future__ import annotations

from typing import Any

import pytest

from ztunnel.lab.meshgen import mesh_document
from ztunnel.localconfig import parse_documents

pytestmark = pytest.mark.unit


def pod(
    name: str,
    ip: str | None,
    labels: dict[str, str],
    ann: dict[str, str] | None = None,
    phase: str = "Running",
    **spec: Any,
) -> dict[str, Any]:
    return {
        "metadata": {"namespace": "shop", "name": name, "labels": labels, "annotations": ann or {}},
        "spec": {
            "nodeName": "n0",
            "serviceAccountName": "echo",
            "containers": [{"name": "app", "ports": [{"name": "http", "containerPort": 8080}]}],
            **spec,
        },
        "status": {"phase": phase, **({"podIP": ip, "podIPs": [{"ip": ip}]} if ip else {})},
    }


SVC = {
    "metadata": {"namespace": "shop", "name": "echo"},
    "spec": {
        "clusterIP": "10.96.0.10",
        "selector": {"app": "echo"},
        "ports": [{"port": 80, "targetPort": "http"}],
    },
}


def test_workloads_services_and_tunnel_protocol() -> None:
    pods = [
        pod(
            "a",
            "10.1.1.2",
            {"app": "echo", "version": "v2"},
            {"ambient.istio.io/redirection": "enabled"},
        ),
        pod("b", "10.1.1.3", {"app": "other"}),
        pod("pending", None, {"app": "echo"}),
        pod("done", "10.1.1.4", {"app": "echo"}, phase="Succeeded"),
        pod("host", "10.0.0.1", {"app": "echo"}, hostNetwork=True),
        pod("headless-only", "10.1.1.5", {}),
    ]
    doc = mesh_document(
        pods, [SVC, {"metadata": {"namespace": "shop", "name": "h"}, "spec": {"clusterIP": "None"}}]
    )
    wl = {w["name"]: w for w in doc["workloads"]}
    assert set(wl) == {"a", "b", "headless-only"}
    assert wl["a"]["protocol"] == "HBONE" and wl["b"]["protocol"] == "TCP"
    assert wl["a"]["services"] == {"shop/echo.shop.svc.cluster.local": {80: 8080}}
    assert wl["a"]["canonicalName"] == "echo" and wl["a"]["canonicalRevision"] == "v2"
    assert (
        wl["headless-only"]["canonicalName"] == "headless-only"
        and wl["b"]["canonicalRevision"] == "latest"
    )
    assert doc["services"] == [
        {
            "name": "echo",
            "namespace": "shop",
            "hostname": "echo.shop.svc.cluster.local",
            "vips": ["10.96.0.10"],
            "ports": {80: 80},
        }
    ]
    state = parse_documents([doc], "meshgen")
    assert len(state.workloads) == 3 and len(state.services) == 1
