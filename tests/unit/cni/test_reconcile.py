"""The node controller's plan: Kubernetes' view + the agent's view -> requests and patches."""

from __future__ import annotations

from typing import Any

import pytest

from cni.reconcile import AgentRequest, Annotate, PodView, plan

pytestmark = pytest.mark.unit

ANN = "ambient.istio.io/redirection"
AMB = {"istio.io/dataplane-mode": "ambient"}
EXCL = ("kube-system",)


def pod(
    name: str = "p",
    ns: str = "shop",
    labels: dict[str, str] | None = None,
    ann: dict[str, str] | None = None,
    phase: str = "Running",
    uid: str = "u1",
) -> PodView:
    return PodView(ns, name, uid, labels or {}, ann or {}, False, phase, ("10.1.1.2",))


def rec(enrolled: bool, **extra: Any) -> dict[str, Any]:
    return {"ifname": "veth1", "ips": ["10.1.1.2"], "enrolled": enrolled, "uid": "u1", **extra}


def ops(p: Any) -> list[tuple[str, str]]:
    return [(r.body["op"], r.key) for r in p.requests]


def test_labelled_namespace_enrols_a_running_pod_from_the_agents_record() -> None:
    p = plan({"shop/p": pod()}, {"shop": AMB}, {"shop/p": rec(False)}, [], EXCL)
    assert p.requests == [
        AgentRequest(
            "shop/p",
            {
                "op": "add_pod",
                "namespace": "shop",
                "name": "p",
                "ifname": "veth1",
                "ips": ["10.1.1.2"],
                "enrol": True,
                "uid": "u1",
            },
            "namespace label istio.io/dataplane-mode=ambient",
        )
    ]
    assert p.annotations == []  # only once the agent reports it enrolled


def test_enrolled_pod_gets_the_annotation_and_then_nothing_more() -> None:
    p = plan({"shop/p": pod()}, {"shop": AMB}, {"shop/p": rec(True)}, [], EXCL)
    assert p.requests == [] and p.annotations == [Annotate("shop", "p", "enabled")]
    p = plan({"shop/p": pod(ann={ANN: "enabled"})}, {"shop": AMB}, {"shop/p": rec(True)}, [], EXCL)
    assert p.requests == [] and p.annotations == []
    assert p.status["shop/p"].enrolled and p.status["shop/p"].annotated


def test_unhealthy_capture_removes_the_annotation_but_keeps_the_enrolment() -> None:
    bad = rec(True, capture={"ok": False, "detail": "program detached"})
    p = plan({"shop/p": pod(ann={ANN: "enabled"})}, {"shop": AMB}, {"shop/p": bad}, [], EXCL)
    assert p.requests == [] and p.annotations == [Annotate("shop", "p", None)]
    assert "program detached" in p.status["shop/p"].detail
    ok = rec(True, capture={"ok": True, "detail": ""})
    assert plan({"shop/p": pod()}, {"shop": AMB}, {"shop/p": ok}, [], EXCL).annotations == [
        Annotate("shop", "p", "enabled")
    ]


@pytest.mark.parametrize(
    ("labels", "ns_labels"),
    [({"istio.io/dataplane-mode": "none"}, AMB), ({}, {}), ({}, {"other": "x"})],
)
def test_opted_out_or_unlabelled_pods_are_unenrolled_and_unannotated(
    labels: dict[str, str], ns_labels: dict[str, str]
) -> None:
    p = plan(
        {"shop/p": pod(labels=labels, ann={ANN: "enabled"})},
        {"shop": ns_labels},
        {"shop/p": rec(True)},
        [],
        EXCL,
    )
    assert ops(p) == [("unenrol", "shop/p")]
    assert p.annotations == [Annotate("shop", "p", None)]


def test_pod_unknown_to_the_agent_is_enrolled_from_the_cni_record() -> None:
    cni = [
        {
            "namespace": "shop",
            "name": "p",
            "uid": "u1",
            "host_ifname": "",
            "netns": "/run/netns/x",
            "pod_ifname": "eth0",
            "ips": ["10.1.1.2"],
        }
    ]
    p = plan({"shop/p": pod()}, {"shop": AMB}, {}, cni, EXCL)
    assert p.requests[0].body == {
        "op": "add_pod",
        "namespace": "shop",
        "name": "p",
        "ifname": "",
        "ips": ["10.1.1.2"],
        "enrol": True,
        "uid": "u1",
        "netns": "/run/netns/x",
        "pod_ifname": "eth0",
    }


def test_pod_without_any_record_is_reported_not_guessed() -> None:
    p = plan({"shop/p": pod()}, {"shop": AMB}, {}, [], EXCL)
    assert p.requests == [] and "no CNI record" in p.notes[0]
    # A record of a previous pod with the same name (other uid) is not used.
    old = [
        {
            "namespace": "shop",
            "name": "p",
            "uid": "old",
            "host_ifname": "veth9",
            "ips": ["10.1.1.9"],
        }
    ]
    assert plan({"shop/p": pod()}, {"shop": AMB}, {}, old, EXCL).requests == []


def test_agent_record_of_a_previous_pod_with_the_same_name_is_not_trusted() -> None:
    cni = [
        {"namespace": "shop", "name": "p", "uid": "u2", "host_ifname": "veth2", "ips": ["10.1.1.3"]}
    ]
    p = plan({"shop/p": pod(uid="u2")}, {"shop": AMB}, {"shop/p": rec(True)}, cni, EXCL)
    assert p.requests[0].body["ifname"] == "veth2" and p.requests[0].body["ips"] == ["10.1.1.3"]


@pytest.mark.parametrize("phase", ["Succeeded", "Failed"])
def test_terminal_pods_are_removed(phase: str) -> None:
    p = plan(
        {"shop/p": pod(phase=phase, ann={ANN: "enabled"})},
        {"shop": AMB},
        {"shop/p": rec(True)},
        [],
        EXCL,
    )
    assert ops(p) == [("remove_pod", "shop/p")]
    assert p.annotations == [Annotate("shop", "p", None)]


def test_deleted_pods_are_removed_only_when_known_gone() -> None:
    agent = {"shop/gone": rec(True), "shop/new": rec(True)}
    p = plan({}, {"shop": AMB}, agent, [], EXCL, gone=frozenset({"shop/gone"}))
    assert ops(p) == [("remove_pod", "shop/gone")]


def test_excluded_namespace_never_enrolled() -> None:
    p = plan(
        {"kube-system/p": pod(ns="kube-system")},
        {"kube-system": AMB},
        {"kube-system/p": rec(False)},
        [],
        EXCL,
    )
    assert p.requests == [] and p.annotations == []


def test_pod_view_from_an_api_object() -> None:
    v = PodView.from_object(
        {
            "metadata": {"namespace": "a", "name": "b", "uid": "u", "deletionTimestamp": "t"},
            "spec": {"hostNetwork": True},
            "status": {"phase": "Running", "podIPs": [{"ip": "10.0.0.1"}, {"ip": "fd00::1"}]},
        }
    )
    assert v.ips == ("10.0.0.1", "fd00::1") and v.host_network and v.deleting and v.key == "a/b"
    assert PodView.from_object({"metadata": {}, "status": {"podIP": "10.0.0.2"}}).ips == (
        "10.0.0.2",
    )
