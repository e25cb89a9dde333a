"""Ambient selection: Istio's defaults, every rule."""

from __future__ import annotations

import pytest

from cni.selection import PodFacts, decide, pod_facts

pytestmark = pytest.mark.unit

AMB = {"istio.io/dataplane-mode": "ambient"}
NONE = {"istio.io/dataplane-mode": "none"}


def pod(
    ns: str = "shop",
    labels: dict[str, str] | None = None,
    ann: dict[str, str] | None = None,
    host: bool = False,
) -> PodFacts:
    return PodFacts(ns, "p", labels or {}, ann or {}, host)


@pytest.mark.parametrize(
    ("facts", "ns_labels", "ambient", "why"),
    [
        (pod(), AMB, True, "namespace label"),
        (pod(), {}, False, "neither"),
        (pod(), None, False, "neither"),
        (pod(labels=AMB), {}, True, "pod label"),
        (pod(labels=NONE), AMB, False, "opted out"),
        (pod(host=True), AMB, False, "host-network"),
        (pod(ann={"sidecar.istio.io/status": "{}"}), AMB, False, "sidecar"),
        (pod(labels={"app.kubernetes.io/part-of": "ztunnel-py"}), AMB, False, "mesh itself"),
        (pod(ns="istio-system", labels=AMB), AMB, False, "excluded"),
        (pod(ns="kube-system"), AMB, False, "excluded"),
        (pod(labels={"istio.io/dataplane-mode": "sidecar"}), {}, False, "neither"),
    ],
)
def test_decide(facts: PodFacts, ns_labels: dict[str, str] | None, ambient: bool, why: str) -> None:
    d = decide(facts, ns_labels)
    assert d.ambient is ambient
    assert why in d.reason


def test_configured_exclusions_replace_the_defaults() -> None:
    assert decide(pod(ns="kube-system"), AMB, ()).ambient
    assert not decide(pod(ns="batch"), AMB, ("batch",)).ambient


def test_pod_facts_from_a_malformed_object_are_empty_not_an_error() -> None:
    f = pod_facts({"metadata": "nonsense", "spec": {"hostNetwork": "yes"}})
    assert f == PodFacts("", "", {}, {}, False)
    f = pod_facts(
        {
            "metadata": {"namespace": "a", "name": "b", "labels": {"x": 1}},
            "spec": {"hostNetwork": True},
        }
    )
    assert f.labels == {"x": "1"} and f.host_network
