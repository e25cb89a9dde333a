"""Kubernetes objects -> the mesh state document, as istiod derives workloads and services (pure).

Input: Pod, Service (and Namespace) objects as the API server returns them. Output: one
document in the shape of `ztunnel.localconfig` (`parse_documents([doc], ...)` makes a
`MeshState` of it), so the lab can write it as the agents' mesh file and a test istiod can
serve it. Workloads: running pods with an IP; `protocol` HBONE when the pod carries
`ambient.istio.io/redirection: enabled` (it is captured), else TCP; identity from the service
account; canonical name/revision from Istio's label precedence; the services whose selector
matches the pod's labels, with target ports resolved (named ports through the containers).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

REDIRECTION = "ambient.istio.io/redirection"
TERMINAL = ("Succeeded", "Failed")

# Istio's precedence (pkg/model labels): the first label present names the canonical service.
CANONICAL_NAME_LABELS = ("service.istio.io/canonical-name", "app.kubernetes.io/name", "app")
CANONICAL_REVISION_LABELS = (
    "service.istio.io/canonical-revision",
    "app.kubernetes.io/version",
    "version",
)


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    m = obj.get("metadata")
    return m if isinstance(m, Mapping) else {}


def _first(labels: Mapping[str, str], keys: Sequence[str], default: str) -> str:
    return next((labels[k] for k in keys if labels.get(k)), default)


def pod_ips(pod: Mapping[str, Any]) -> list[str]:
    status = pod.get("status") or {}
    ips = [str(p["ip"]) for p in status.get("podIPs") or [] if isinstance(p, dict) and p.get("ip")]
    if not ips and status.get("podIP"):
        ips = [str(status["podIP"])]
    return ips


def _selects(selector: Mapping[str, str] | None, labels: Mapping[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in (selector or {}).items())


def _target_port(port: Mapping[str, Any], pod: Mapping[str, Any]) -> int | None:
    target = port.get("targetPort", port.get("port"))
    if isinstance(target, int):
        return target
    if isinstance(target, str) and target.isdigit():
        return int(target)
    for c in (pod.get("spec") or {}).get("containers") or []:
        for p in c.get("ports") or []:
            if p.get("name") == target and isinstance(p.get("containerPort"), int):
                return int(p["containerPort"])
    return None


def hostname(svc: Mapping[str, Any], domain: str) -> str:
    m = _meta(svc)
    return f"{m.get('name')}.{m.get('namespace')}.svc.{domain}"


def mesh_document(
    pods: Iterable[Mapping[str, Any]],
    services: Iterable[Mapping[str, Any]],
    domain: str = "cluster.local",
    policies: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """The mesh state for these objects (see the module docstring)."""
    svc_list = [
        s for s in services if (s.get("spec") or {}).get("clusterIP") not in (None, "", "None")
    ]
    workloads = []
    for pod in sorted(
        pods, key=lambda p: (_meta(p).get("namespace", ""), _meta(p).get("name", ""))
    ):
        meta, spec = _meta(pod), pod.get("spec") or {}
        ips = pod_ips(pod)
        if not ips or spec.get("hostNetwork") or (pod.get("status") or {}).get("phase") in TERMINAL:
            continue
        ns, name = str(meta.get("namespace")), str(meta.get("name"))
        labels = {str(k): str(v) for k, v in (meta.get("labels") or {}).items()}
        annotations = meta.get("annotations") or {}
        svc_ports: dict[str, dict[int, int]] = {}
        for svc in svc_list:
            sm, ss = _meta(svc), svc.get("spec") or {}
            if sm.get("namespace") != ns or not _selects(ss.get("selector"), labels):
                continue
            ports = {}
            for p in ss.get("ports") or []:
                target = _target_port(p, pod)
                if isinstance(p.get("port"), int) and target is not None:
                    ports[int(p["port"])] = target
            svc_ports[f"{ns}/{hostname(svc, domain)}"] = ports
        workloads.append(
            {
                "uid": f"Kubernetes//Pod/{ns}/{name}",
                "name": name,
                "namespace": ns,
                "serviceAccount": str(spec.get("serviceAccountName") or "default"),
                "workloadIps": ips,
                "node": str(spec.get("nodeName") or ""),
                "protocol": "HBONE" if annotations.get(REDIRECTION) == "enabled" else "TCP",
                "canonicalName": _first(labels, CANONICAL_NAME_LABELS, name),
                "canonicalRevision": _first(labels, CANONICAL_REVISION_LABELS, "latest"),
                "services": svc_ports,
                "labels": labels,
            }
        )
    service_docs = []
    for svc in svc_list:
        sm, ss = _meta(svc), svc.get("spec") or {}
        ips = [str(ip) for ip in ss.get("clusterIPs") or [ss["clusterIP"]]]
        service_docs.append(
            {
                "name": str(sm.get("name")),
                "namespace": str(sm.get("namespace")),
                "hostname": hostname(svc, domain),
                "vips": ips,
                "ports": {
                    int(p["port"]): int(p["targetPort"])
                    if isinstance(p.get("targetPort"), int)
                    else int(p["port"])
                    for p in ss.get("ports") or []
                    if isinstance(p.get("port"), int)
                },
            }
        )
    return {
        "workloads": workloads,
        "services": service_docs,
        "policies": [dict(p) for p in policies],
    }
