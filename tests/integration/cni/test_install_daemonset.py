"""The installer's exit decision against the API server stand-in: uninstall only when the
DaemonSet is gone or being deleted; keep the chain when it exists or the API is away."""

from __future__ import annotations

import pytest

from cni.install import daemonset_deleted_check
from tests.integration.cni.conftest import Api
from ztunnel.lab.kubeapi import BY_PATH, Fault

pytestmark = pytest.mark.integration

DS = BY_PATH[("apps", "v1", "daemonsets")]


def test_daemonset_present_deleting_gone_and_api_away(kubeapi: Api) -> None:
    kubeapi.namespace("istio-system")
    kubeapi.store.create(
        DS,
        "istio-system",
        {
            "metadata": {"name": "ztunnel"},
            "spec": {"selector": {"matchLabels": {"app": "ztunnel"}}},
        },
    )
    check = daemonset_deleted_check(str(kubeapi.kubeconfig), "istio-system", "ztunnel")
    assert check() is False  # an upgrade or a restart: keep the chain
    kubeapi.server.inject(Fault("GET", "/daemonsets/ztunnel", status=503, count=-1))
    assert check() is False  # cannot tell: keep it (fail closed)
    kubeapi.server.clear_faults()
    kubeapi.store.patch(
        DS,
        "istio-system",
        "ztunnel",
        {"metadata": {"finalizers": ["x"]}},
        "application/merge-patch+json",
    )
    with kubeapi.store._lock:  # the API's view of a DaemonSet under foreground deletion
        kubeapi.store._objects[("daemonsets", "istio-system", "ztunnel")]["metadata"][
            "deletionTimestamp"
        ] = "2026-01-01T00:00:00Z"
    assert check() is True
    kubeapi.store.delete(DS, "istio-system", "ztunnel")
    assert check() is True
