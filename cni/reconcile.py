"""What the node controller must do (pure): Kubernetes' view and the agent's view in, actions out.

Inputs are plain records (pods of this node, namespace labels, the agent's `list` answer, the
CNI plugin's pod records); `plan()` returns the enrolment requests and annotation patches that
move the node towards: every running ambient pod enrolled and annotated
`ambient.istio.io/redirection: enabled` (only while its capture is healthy), every other pod
unenrolled and not annotated, and pods that are gone or finished removed from the agent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cni import selection

TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})


@dataclass(frozen=True)
class PodView:
    namespace: str
    name: str
    uid: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    host_network: bool = False
    phase: str = "Pending"
    ips: tuple[str, ...] = ()
    deleting: bool = False

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def facts(self) -> selection.PodFacts:
        return selection.PodFacts(
            self.namespace, self.name, self.labels, self.annotations, self.host_network
        )

    @classmethod
    def from_object(cls, obj: Mapping[str, Any]) -> PodView:
        meta = obj.get("metadata") or {}
        spec = obj.get("spec") or {}
        status = obj.get("status") or {}
        ips = tuple(
            str(p.get("ip"))
            for p in status.get("podIPs") or []
            if isinstance(p, dict) and p.get("ip")
        ) or ((str(status["podIP"]),) if status.get("podIP") else ())
        return cls(
            namespace=str(meta.get("namespace", "")),
            name=str(meta.get("name", "")),
            uid=str(meta.get("uid", "")),
            labels=dict(meta.get("labels") or {}),
            annotations=dict(meta.get("annotations") or {}),
            host_network=spec.get("hostNetwork") is True,
            phase=str(status.get("phase") or "Pending"),
            ips=ips,
            deleting=bool(meta.get("deletionTimestamp")),
        )


@dataclass(frozen=True)
class AgentRequest:
    """One request to the enrolment socket (`ztunnel/enrolment.py`)."""

    key: str
    body: dict[str, Any]
    why: str


@dataclass(frozen=True)
class Annotate:
    """Set (value) or remove (None) the redirection annotation of a pod."""

    namespace: str
    name: str
    value: str | None


@dataclass(frozen=True)
class PodStatus:
    """How a pod stands, for people (lab summary, logs)."""

    key: str
    ambient: bool
    reason: str
    enrolled: bool
    annotated: bool
    capture_ok: bool | None = None
    detail: str = ""


@dataclass
class Plan:
    requests: list[AgentRequest] = field(default_factory=list)
    annotations: list[Annotate] = field(default_factory=list)
    status: dict[str, PodStatus] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def capture_ok(rec: Mapping[str, Any]) -> bool:
    """Issue 15's per-pod capture health: absent = ok."""
    cap = rec.get("capture")
    return not (isinstance(cap, dict) and cap.get("ok") is False)


def _enrol_body(pod: PodView, source: Mapping[str, Any]) -> dict[str, Any] | None:
    ips = source.get("ips") or list(pod.ips)
    ifname = source.get("ifname") or source.get("host_ifname") or ""
    netns, pod_ifname = source.get("netns", ""), source.get("pod_ifname", "")
    if not ips or not (ifname or (netns and pod_ifname)):
        return None
    body: dict[str, Any] = {
        "op": "add_pod",
        "namespace": pod.namespace,
        "name": pod.name,
        "ifname": ifname,
        "ips": list(ips),
        "enrol": True,
    }
    if pod.uid:
        body["uid"] = pod.uid
    if not ifname:
        body.update(netns=netns, pod_ifname=pod_ifname)
    return body


def plan(
    pods: Mapping[str, PodView],
    namespaces: Mapping[str, Mapping[str, str]],
    agent: Mapping[str, Mapping[str, Any]],
    cni_records: Sequence[Mapping[str, Any]],
    excluded_namespaces: Sequence[str],
    gone: frozenset[str] = frozenset(),
) -> Plan:
    """`pods` by "ns/name" (this node's, from a synced cache); `agent` = the agent's `list`;
    `gone` = agent keys whose pods are known to be deleted (removed now)."""
    out = Plan()
    records = {
        (str(r.get("namespace")), str(r.get("name")), str(r.get("uid", ""))): r for r in cni_records
    }
    for key, pod in sorted(pods.items()):
        rec = agent.get(key)
        ns_labels = namespaces.get(pod.namespace)
        decision = selection.decide(pod.facts, ns_labels, excluded_namespaces)
        terminal = pod.phase in TERMINAL_PHASES
        same_pod = rec is not None and rec.get("uid") in (None, "", pod.uid)
        enrolled = bool(rec and rec.get("enrolled") and same_pod)
        healthy = bool(rec) and capture_ok(rec or {})
        want = decision.ambient and not terminal
        detail = ""
        if terminal and rec is not None:
            out.requests.append(
                AgentRequest(
                    key,
                    {"op": "remove_pod", "namespace": pod.namespace, "name": pod.name},
                    f"pod {pod.phase}",
                )
            )
            enrolled = False
        elif want and not enrolled:
            source: Mapping[str, Any] | None = rec if same_pod else None
            if source is None:
                source = records.get((pod.namespace, pod.name, pod.uid))
            body = _enrol_body(pod, source) if source is not None else None
            if body is None:
                detail = (
                    "no CNI record of its interface on this node"
                    " (started before ztunnel-cni was installed? restart it)"
                )
                out.notes.append(f"{key}: ambient but cannot be enrolled: {detail}")
            else:
                out.requests.append(AgentRequest(key, body, decision.reason))
        elif not want and enrolled:
            out.requests.append(
                AgentRequest(
                    key,
                    {"op": "unenrol", "namespace": pod.namespace, "name": pod.name},
                    decision.reason,
                )
            )
            enrolled = False
        annotated = (
            pod.annotations.get(selection.REDIRECTION_ANNOTATION) == selection.REDIRECTION_ENABLED
        )
        should = want and enrolled and healthy
        if should and not annotated:
            out.annotations.append(Annotate(pod.namespace, pod.name, selection.REDIRECTION_ENABLED))
        elif not should and selection.REDIRECTION_ANNOTATION in pod.annotations:
            out.annotations.append(Annotate(pod.namespace, pod.name, None))
        if want and enrolled and not healthy:
            cap = (rec or {}).get("capture") or {}
            detail = f"capture unhealthy: {cap.get('detail', '')}"
        out.status[key] = PodStatus(
            key,
            decision.ambient,
            decision.reason,
            enrolled,
            should,
            healthy if rec else None,
            detail,
        )
    for key in sorted(set(agent) - set(pods)):
        if key in gone:
            ns, _, name = key.partition("/")
            out.requests.append(
                AgentRequest(
                    key, {"op": "remove_pod", "namespace": ns, "name": name}, "pod deleted"
                )
            )
    return out
