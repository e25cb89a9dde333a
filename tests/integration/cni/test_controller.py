"""The node enrolment controller against the API server stand-in and a real enrolment service:
labels enrol and unenrol running pods, annotations follow, API server errors and timeouts,
410 Gone, the agent going away, and a restart that converges without touching anything."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cni.controller import ControllerSettings, NodeController
from tests.integration.cni.conftest import NS, PODS, AgentHandle, Api, wait_until
from ztunnel.enrolment import request
from ztunnel.lab.kubeapi import Fault

pytestmark = pytest.mark.integration

ANN = "ambient.istio.io/redirection"
MERGE = "application/merge-patch+json"


def settings(api: Api, agent: AgentHandle, tmp_path: Path) -> ControllerSettings:
    return ControllerSettings(
        node_name="n0",
        enrolment_socket=agent.socket_path,
        kubeconfig=str(api.kubeconfig),
        pod_record_dir=str(tmp_path / "records"),
        resync_interval=0.1,
        watch_timeout=5,
        request_timeout=2,
        orphan_grace=0.5,
        backoff_initial=0.05,
        backoff_max=0.5,
    )


@pytest.fixture
def make_controller(kubeapi: Api, agent: AgentHandle, tmp_path: Path) -> Iterator[Any]:
    started: list[NodeController] = []

    def make() -> NodeController:
        c = NodeController(settings(kubeapi, agent, tmp_path))
        c.start()
        started.append(c)
        return c

    yield make
    for c in started:
        c.stop()


def cni_add(agent: AgentHandle, ns: str, name: str, ip: str, uid: str = "") -> None:
    """What ztunnel-cni does at ADD for a pod that is not ambient (yet)."""
    request(
        agent.socket_path,
        {
            "op": "add_pod",
            "namespace": ns,
            "name": name,
            "ifname": f"veth-{name}",
            "ips": [ip],
            "enrol": False,
            "uid": uid,
        },
    )


def annotation(api: Api, ns: str, name: str) -> str | None:
    ann: dict[str, str] = api.store.get(PODS, ns, name)["metadata"].get("annotations") or {}
    return ann.get(ANN)


def enrolled(agent: AgentHandle, key: str) -> bool:
    return bool(agent.pods().get(key, {}).get("enrolled"))


def kubectl(api: Api, *args: str) -> None:
    r = subprocess.run(
        ["kubectl", "--kubeconfig", str(api.kubeconfig), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr


def test_labels_enrol_and_unenrol_running_pods_and_the_annotation_follows(
    kubeapi: Api, agent: AgentHandle, make_controller: Any
) -> None:
    kubeapi.namespace("shop")
    kubeapi.namespace("legacy")
    for ns, name, ip in (
        ("shop", "a", "10.1.1.2"),
        ("shop", "b", "10.1.1.3"),
        ("legacy", "c", "10.1.1.4"),
    ):
        p = kubeapi.pod(ns, name, ip=ip)
        cni_add(agent, ns, name, ip, p["metadata"]["uid"])
    kubeapi.pod("shop", "elsewhere", node="n1", ip="10.1.2.2")
    ctl = make_controller()
    assert wait_until(lambda: ctl.passes > 0)
    assert not agent.capture.enrolled
    kubectl(kubeapi, "label", "namespace", "shop", "istio.io/dataplane-mode=ambient")
    assert wait_until(lambda: enrolled(agent, "shop/a") and enrolled(agent, "shop/b"))
    assert wait_until(
        lambda: (
            annotation(kubeapi, "shop", "a") == "enabled"
            and annotation(kubeapi, "shop", "b") == "enabled"
        )
    )
    assert agent.capture.enrolled == {"10.1.1.2", "10.1.1.3"}
    assert (
        annotation(kubeapi, "legacy", "c") is None
        and annotation(kubeapi, "shop", "elsewhere") is None
    )
    # Opt one pod out, then unlabel the namespace.
    kubectl(kubeapi, "label", "pod", "-n", "shop", "b", "istio.io/dataplane-mode=none")
    assert wait_until(
        lambda: not enrolled(agent, "shop/b") and annotation(kubeapi, "shop", "b") is None
    )
    assert enrolled(agent, "shop/a")
    kubectl(kubeapi, "label", "namespace", "shop", "istio.io/dataplane-mode-")
    assert wait_until(
        lambda: not enrolled(agent, "shop/a") and annotation(kubeapi, "shop", "a") is None
    )
    assert agent.capture.enrolled == set()
    # A pod label alone enrols, too.
    kubectl(kubeapi, "label", "pod", "-n", "legacy", "c", "istio.io/dataplane-mode=ambient")
    assert wait_until(
        lambda: enrolled(agent, "legacy/c") and annotation(kubeapi, "legacy", "c") == "enabled"
    )


def test_finished_and_deleted_pods_are_removed_from_the_agent(
    kubeapi: Api, agent: AgentHandle, make_controller: Any
) -> None:
    kubeapi.namespace("shop", {"istio.io/dataplane-mode": "ambient"})
    for name, ip in (("job", "10.1.1.5"), ("gone", "10.1.1.6")):
        p = kubeapi.pod("shop", name, ip=ip)
        cni_add(agent, "shop", name, ip, p["metadata"]["uid"])
    make_controller()
    assert wait_until(lambda: enrolled(agent, "shop/job") and enrolled(agent, "shop/gone"))
    kubeapi.store.patch(
        PODS, "shop", "job", {"status": {"phase": "Succeeded"}}, MERGE, status_only=True
    )
    kubeapi.store.delete(PODS, "shop", "gone")
    assert wait_until(lambda: set(agent.pods()) == set())
    assert agent.capture.enrolled == set() and agent.capture.attached == set()


def test_capture_health_from_the_agent_controls_the_annotation(
    kubeapi: Api, agent: AgentHandle, make_controller: Any
) -> None:
    kubeapi.namespace("shop", {"istio.io/dataplane-mode": "ambient"})
    p = kubeapi.pod("shop", "a", ip="10.1.1.2")
    cni_add(agent, "shop", "a", "10.1.1.2", p["metadata"]["uid"])
    make_controller()
    assert wait_until(lambda: annotation(kubeapi, "shop", "a") == "enabled")
    agent.capture.health["shop/a"] = {"ok": False, "detail": "a program ahead of ours"}
    assert wait_until(lambda: annotation(kubeapi, "shop", "a") is None)
    assert enrolled(agent, "shop/a")
    agent.capture.health["shop/a"] = {"ok": True, "detail": ""}
    assert wait_until(lambda: annotation(kubeapi, "shop", "a") == "enabled")


def test_api_server_errors_timeouts_and_410_are_survived(
    kubeapi: Api, agent: AgentHandle, make_controller: Any
) -> None:
    kubeapi.namespace("shop")
    p = kubeapi.pod("shop", "a", ip="10.1.1.2")
    cni_add(agent, "shop", "a", "10.1.1.2", p["metadata"]["uid"])
    kubeapi.server.inject(Fault("GET", r"^/api/v1/pods\?(?!.*watch)", status=500, count=3))
    kubeapi.server.inject(
        Fault("GET", r"^/api/v1/namespaces(\?(?!.*watch)|$)", status=0, delay=3.0, count=1)
    )
    ctl = make_controller()
    assert wait_until(lambda: ctl.passes > 0, 20)
    # 500s reach the informer; the read timeout is retried by the client library itself.
    assert ctl.pods.errors >= 3 and ctl.namespaces.synced.is_set()
    # The pods watch answers 410 Gone once: the informer lists again and keeps working.
    relists = ctl.pods.relists
    kubeapi.server.inject(Fault("GET", r"^/api/v1/pods\?.*watch=", status=410, count=1))
    ctl.pods.stop()  # drop the current watch so the next one meets the fault
    assert wait_until(lambda: ctl.pods.relists > relists, 20)
    kubeapi.store.patch(
        NS, "", "shop", {"metadata": {"labels": {"istio.io/dataplane-mode": "ambient"}}}, MERGE
    )
    assert wait_until(
        lambda: enrolled(agent, "shop/a") and annotation(kubeapi, "shop", "a") == "enabled", 20
    )


def test_agent_away_then_back_and_a_restart_converges_without_changes(
    kubeapi: Api, agent: AgentHandle, make_controller: Any
) -> None:
    kubeapi.namespace("shop")
    p = kubeapi.pod("shop", "a", ip="10.1.1.2")
    cni_add(agent, "shop", "a", "10.1.1.2", p["metadata"]["uid"])
    ctl = make_controller()
    assert wait_until(lambda: ctl.agent_available)
    agent.stop()
    kubeapi.store.patch(
        NS, "", "shop", {"metadata": {"labels": {"istio.io/dataplane-mode": "ambient"}}}, MERGE
    )
    assert wait_until(lambda: not ctl.agent_available)
    agent.start()  # same state file: the agent restarted
    assert wait_until(
        lambda: enrolled(agent, "shop/a") and annotation(kubeapi, "shop", "a") == "enabled"
    )
    ctl.stop()
    calls = len(agent.capture.calls)
    again = make_controller()
    assert wait_until(lambda: again.converged.is_set())
    assert agent.capture.calls[calls:] == []  # nothing re-enrolled, nothing detached
    assert enrolled(agent, "shop/a")
