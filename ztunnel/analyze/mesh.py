"""Which pods are in the mesh (sidecar or ambient) and which waypoint a service, namespace or
workload uses, decided as Istio decides them: istio/istio pkg/config/analysis/analyzers/util
in_mesh.go (`PodInMesh`, `PodInAmbientMode`), pilot/pkg/serviceregistry/ambient/waypoints.go
(`fetchWaypointForTarget`, `fetchWaypointForService`, `fetchWaypointForWorkload`) and its
status messages (status.go), which istiod writes as the `istio.io/WaypointBound` condition."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ztunnel.analyze.context import Context, PodView
from ztunnel.analyze.messages import go_quote
from ztunnel.meshconfig.gateway import Gateway
from ztunnel.meshconfig.kube import USE_WAYPOINT, USE_WAYPOINT_NAMESPACE
from ztunnel.meshconfig.resource import ResourceMeta

PROXY_CONTAINER = "istio-proxy"
SIDECAR_STATUS = "sidecar.istio.io/status"
SIDECAR_INJECT = "sidecar.istio.io/inject"
INJECTION_LABEL = "istio-injection"
REVISION_LABEL = "istio.io/rev"
DATAPLANE_MODE = "istio.io/dataplane-mode"
REDIRECTION = "ambient.istio.io/redirection"
WAYPOINT_FOR = "istio.io/waypoint-for"
SERVICE_TRAFFIC, WORKLOAD_TRAFFIC, ALL_TRAFFIC = "service", "workload", "all"
MESH_CONTROLLER_LABEL = "gateway.istio.io/managed"
GATEWAY_CONTROLLERS = ("istio.io-mesh-controller", "istio.io-eastwest-controller")


def has_sidecar(pod: PodView) -> bool:
    """A proxy container, or the injector's status annotation (templates in files carry
    neither until injected; see `sidecar_injected`)."""
    return PROXY_CONTAINER in pod.containers or SIDECAR_STATUS in pod.annotations


def sidecar_injected(ctx: Context, pod: PodView) -> bool:
    """`util.PodInMesh`: a proxy container, else the pod's `sidecar.istio.io/inject` label or
    annotation, else the namespace's `istio-injection=enabled`."""
    if PROXY_CONTAINER in pod.containers:
        return True
    for source in (pod.labels, pod.annotations):
        if SIDECAR_INJECT in source:
            return source[SIDECAR_INJECT] == "true"
    ns = ctx.namespace_labels(pod.namespace)
    return ns is not None and ns.get(INJECTION_LABEL) == "enabled"


def ambient(ctx: Context, pod: PodView) -> bool:
    """In the ambient mesh: the CNI's redirection annotation (a running pod), or, for pods and
    templates read from files, the labels that select it (pod `istio.io/dataplane-mode=ambient`,
    or its namespace's unless the pod opts out), without a sidecar or host networking."""
    if pod.annotations.get(REDIRECTION) == "enabled":
        return True
    if pod.host_network or has_sidecar(pod):
        return False
    mode = pod.labels.get(DATAPLANE_MODE)
    if mode is not None:
        return mode == "ambient"
    return (ctx.namespace_labels(pod.namespace) or {}).get(DATAPLANE_MODE) == "ambient"


def in_mesh(ctx: Context, pod: PodView) -> bool:
    return sidecar_injected(ctx, pod) or ambient(ctx, pod)


# ---- waypoints ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WaypointRef:
    """A `istio.io/use-waypoint` label: the waypoint it names and the resource carrying it."""

    namespace: str
    name: str
    holder: ResourceMeta  # the Service, Pod, workload or Namespace with the label

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class Binding:
    """Where a service or workload ends up: a waypoint, or the reason istiod gives for none
    (`reason`, `message` as in the WaypointBound condition). Both None: no waypoint asked."""

    ref: WaypointRef | None = None
    waypoint: Gateway | None = None
    reason: str = ""
    message: str = ""
    missing: bool = False  # the named waypoint does not exist at all


def use_waypoint(
    holder: ResourceMeta, labels: Mapping[str, str], fallback_namespace: str
) -> tuple[WaypointRef | None, bool]:
    """`GetUseWaypoint`: the labelled waypoint (namespace from `use-waypoint-namespace`, else
    `fallback_namespace`), and whether the label opts out (`none`)."""
    name = labels.get(USE_WAYPOINT)
    if name is None:
        return None, False
    if name == "none":
        return None, True
    namespace = labels.get(USE_WAYPOINT_NAMESPACE, fallback_namespace)
    return WaypointRef(namespace, name, holder), False


def waypoint_ready(ctx: Context, gw: Gateway) -> bool:
    """istiod takes a Gateway as a waypoint once its status has an address. Gateways read
    from files have no status: they are taken as ready."""
    doc = ctx.document(gw.meta)
    status = doc.obj.get("status") if doc is not None and isinstance(doc.obj, dict) else None
    if not isinstance(status, dict):
        return True
    return bool(status.get("addresses"))


def traffic_type(gw: Gateway) -> str:
    """`istio.io/waypoint-for` of the Gateway (service when unset; the GatewayClass's own
    label is not read: classes are not modelled)."""
    return gw.meta.labels.get(WAYPOINT_FOR, SERVICE_TRAFFIC)


def _hbone_listener_allows(ctx: Context, gw: Gateway, namespace: str) -> bool:
    """`AllowsAttachmentFromNamespace` with the HBONE listener on 15008 (`makeAllowedRoutes`);
    without one, only the waypoint's own namespace may attach."""
    labels = ctx.namespace_labels(namespace) or {}
    for lst in gw.listeners:
        if lst.protocol == "HBONE" and lst.port == 15008:
            return lst.allows_namespace(gw.meta.namespace, namespace, labels)
    return namespace == gw.meta.namespace


def find_waypoint(ctx: Context, ref: WaypointRef) -> Gateway | None:
    """The Gateway of class `istio-waypoint` that the label names."""
    gw = ctx.cs.gateway(ref.namespace, ref.name)
    return gw if gw is not None and gw.is_waypoint else None


def _resolve(ctx: Context, ref: WaypointRef, namespace: str) -> Binding:
    gw = find_waypoint(ctx, ref)
    if gw is None:
        return Binding(ref, reason="WaypointIsNotReady", message=_not_ready(ref.key), missing=True)
    if not waypoint_ready(ctx, gw):
        return Binding(ref, reason="WaypointIsNotReady", message=_not_ready(ref.key))
    if not _hbone_listener_allows(ctx, gw, namespace):
        return Binding(
            ref,
            gw,
            "AttachmentDenied",
            f"we are not permitted to attach to waypoint {go_quote(ref.key)} "
            "(missing allowedRoutes?)",
        )
    return Binding(ref, gw)


def _not_ready(key: str) -> str:
    return f"waypoint {go_quote(key)} is not ready"


def _unsupported(key: str, traffic: str) -> str:
    return (
        f"attempting to bind to traffic type {go_quote(traffic)} which the waypoint "
        f"{go_quote(key)} does not support"
    )


def _target(ctx: Context, meta: ResourceMeta, labels: Mapping[str, str]) -> Binding:
    """`fetchWaypointForTarget`: the object's own label, else its namespace's."""
    own, opted_out = use_waypoint(meta, labels, meta.namespace)
    if opted_out:
        return Binding()
    if own is not None:
        return _resolve(ctx, own, meta.namespace)
    ns = ctx.cs.namespace(meta.namespace)
    if ns is not None:
        inherited, _ = use_waypoint(ns.meta, ns.meta.labels, meta.namespace)
        if inherited is not None:
            return _resolve(ctx, inherited, meta.namespace)
    return Binding()


def service_binding(ctx: Context, meta: ResourceMeta) -> Binding:
    """`fetchWaypointForService`: waypoints and east-west gateways have no waypoint; the
    waypoint must accept service traffic."""
    if meta.labels.get(MESH_CONTROLLER_LABEL) in GATEWAY_CONTROLLERS:
        return Binding()
    b = _target(ctx, meta, meta.labels)
    if b.waypoint is None or b.reason or b.ref is None:
        return b
    if traffic_type(b.waypoint) not in (SERVICE_TRAFFIC, ALL_TRAFFIC):
        return Binding(
            b.ref,
            b.waypoint,
            "UnsupportedTrafficType",
            _unsupported(b.ref.key, SERVICE_TRAFFIC),
        )
    return b


def workload_binding(ctx: Context, meta: ResourceMeta, labels: Mapping[str, str]) -> Binding:
    """`fetchWaypointForWorkload`: the waypoint must accept workload traffic; a binding
    inherited from the namespace that does not is simply no binding."""
    b = _target(ctx, meta, labels)
    if b.waypoint is None or b.reason or b.ref is None:
        return b
    if traffic_type(b.waypoint) in (WORKLOAD_TRAFFIC, ALL_TRAFFIC):
        return b
    if USE_WAYPOINT not in labels:
        return Binding()
    return Binding(
        b.ref,
        b.waypoint,
        "UnsupportedTrafficType",
        _unsupported(b.ref.key, WORKLOAD_TRAFFIC),
    )
