"""Kubernetes `Service`, `Pod` and `Namespace` documents, reduced to what mesh configuration
needs: labels (waypoint binding, subsets, selectors), service ports and selectors, pod IPs."""

from __future__ import annotations

from dataclasses import dataclass

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

    def hostname(self, domain: str = "cluster.local") -> str:
        return f"{self.meta.name}.{self.meta.namespace}.svc.{domain}"


@dataclass(frozen=True, slots=True)
class Pod:
    meta: ResourceMeta
    ips: tuple[str, ...] = ()
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
    return KubeService(meta, tuple(ports), selector, tuple(ip for ip in ips if ip != "None"))


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
    return Pod(meta, tuple(ips), f.string(sa, "spec.serviceAccountName"))


def parse_namespace(f: Fields, meta: ResourceMeta) -> Namespace:
    return Namespace(meta)
