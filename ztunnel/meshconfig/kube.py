"""Kubernetes `Service`, `Pod` and `Namespace` documents, reduced to what mesh configuration
needs: labels (waypoint binding, subsets, selectors), service ports and selectors, pod IPs; and
the workload controllers (`Deployment`, `StatefulSet`, `DaemonSet`, `ReplicaSet`) as the pods
their template would create."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ztunnel.meshconfig.resource import Fields, ResourceMeta

USE_WAYPOINT = "istio.io/use-waypoint"
USE_WAYPOINT_NAMESPACE = "istio.io/use-waypoint-namespace"


@dataclass(frozen=True, slots=True)
class KubePort:
    port: int
    name: str = ""
    protocol: str = "TCP"
    app_protocol: str = ""
    target_port: int | str | None = None


@dataclass(frozen=True, slots=True)
class KubeService:
    meta: ResourceMeta
    ports: tuple[KubePort, ...]
    selector: tuple[tuple[str, str], ...] | None
    cluster_ips: tuple[str, ...] = ()
    service_type: str = "ClusterIP"  # spec.type: ClusterIP, NodePort, LoadBalancer, ExternalName

    def hostname(self, domain: str = "cluster.local") -> str:
        return f"{self.meta.name}.{self.meta.namespace}.svc.{domain}"


@dataclass(frozen=True, slots=True)
class Pod:
    meta: ResourceMeta
    ips: tuple[str, ...] = ()
    service_account: str = "default"
    containers: tuple[str, ...] = ()  # names of spec.containers, then spec.initContainers
    host_network: bool = False


WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet")


@dataclass(frozen=True, slots=True)
class Workload:
    """A workload controller, with the labels, annotations and containers of the pods its
    template creates (what a selector, a subset or an injection check sees)."""

    meta: ResourceMeta
    pod_labels: tuple[tuple[str, str], ...] = ()
    pod_annotations: tuple[tuple[str, str], ...] = ()
    containers: tuple[str, ...] = ()
    host_network: bool = False
    service_account: str = "default"


@dataclass(frozen=True, slots=True)
class Namespace:
    meta: ResourceMeta


def waypoint_of(labels: dict[str, str] | object, namespace: str) -> tuple[str, str] | None:
    """(namespace, name) of the waypoint that `istio.io/use-waypoint` names, if any (`none`
    opts out)."""
    if not isinstance(labels, dict):
        return None
    name = labels.get(USE_WAYPOINT)
    if not name or name == "none":
        return None
    return labels.get(USE_WAYPOINT_NAMESPACE, namespace), name


def parse_service(f: Fields, meta: ResourceMeta) -> KubeService:
    spec = f.mapping(f.doc.obj.get("spec"), "spec")
    ports = []
    for i, raw in enumerate(f.seq(spec.get("ports"), "spec.ports")):
        pp = f"spec.ports[{i}]"
        p = f.mapping(raw, pp, required=True)
        tp = p.get("targetPort")
        ports.append(
            KubePort(
                f.port(p.get("port"), f"{pp}.port"),
                f.string(p.get("name"), f"{pp}.name", required=False),
                f.string(p.get("protocol", "TCP"), f"{pp}.protocol"),
                f.string(p.get("appProtocol"), f"{pp}.appProtocol", required=False),
                tp if isinstance(tp, int | str) else None,
            )
        )
    sel = spec.get("selector")
    selector = None if sel is None else tuple(sorted(f.string_map(sel, "spec.selector").items()))
    ips = f.strings(spec.get("clusterIPs"), "spec.clusterIPs") or (
        (f.string(spec["clusterIP"], "spec.clusterIP"),) if spec.get("clusterIP") else ()
    )
    return KubeService(
        meta,
        tuple(ports),
        selector,
        tuple(ip for ip in ips if ip != "None"),
        f.string(spec.get("type", "ClusterIP"), "spec.type"),
    )


def parse_pod(f: Fields, meta: ResourceMeta) -> Pod:
    spec = f.mapping(f.doc.obj.get("spec"), "spec")
    status = f.mapping(f.doc.obj.get("status"), "status")
    ips = [
        f.string(f.mapping(p, f"status.podIPs[{i}]").get("ip"), f"status.podIPs[{i}].ip")
        for i, p in enumerate(f.seq(status.get("podIPs"), "status.podIPs"))
    ]
    if not ips and status.get("podIP"):
        ips = [f.string(status["podIP"], "status.podIP")]
    sa = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
    return Pod(
        meta,
        tuple(ips),
        f.string(sa, "spec.serviceAccountName"),
        _container_names(f, spec, "spec"),
        f.boolean(spec.get("hostNetwork"), "spec.hostNetwork"),
    )


def _container_names(f: Fields, spec: Mapping[str, Any], path: str) -> tuple[str, ...]:
    names = []
    for key in ("containers", "initContainers"):
        for i, c in enumerate(f.seq(spec.get(key), f"{path}.{key}")):
            cp = f"{path}.{key}[{i}]"
            names.append(f.string(f.mapping(c, cp, required=True).get("name"), f"{cp}.name"))
    return tuple(names)


def parse_workload(f: Fields, meta: ResourceMeta) -> Workload:
    """The pod template of a Deployment, StatefulSet, DaemonSet or ReplicaSet; the rest of the
    spec (replicas, strategy, volumes...) is not mesh configuration and is not read."""
    spec = f.mapping(f.doc.obj.get("spec"), "spec")
    template = f.mapping(spec.get("template"), "spec.template")
    tmeta = f.mapping(template.get("metadata"), "spec.template.metadata")
    pod = f.mapping(template.get("spec"), "spec.template.spec")
    labels = f.string_map(tmeta.get("labels"), "spec.template.metadata.labels")
    annotations = {
        str(k): str(v)
        for k, v in f.mapping(
            tmeta.get("annotations"), "spec.template.metadata.annotations"
        ).items()
    }
    sa = pod.get("serviceAccountName") or pod.get("serviceAccount") or "default"
    return Workload(
        meta,
        tuple(sorted(labels.items())),
        tuple(sorted(annotations.items())),
        _container_names(f, pod, "spec.template.spec"),
        f.boolean(pod.get("hostNetwork"), "spec.template.spec.hostNetwork"),
        f.string(sa, "spec.template.spec.serviceAccountName"),
    )


def parse_namespace(f: Fields, meta: ResourceMeta) -> Namespace:
    return Namespace(meta)
