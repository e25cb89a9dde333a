"""Ambient-mode analyzers: waypoint bindings and sidecars where ambient was meant.

- `istio.io/use-waypoint` on a Service, Namespace, pod or workload that names no waypoint
  (IST0101, reference type `waypoint`); a waypoint that exists but is not ready, does not let
  the namespace attach (listener `allowedRoutes`), or does not take that traffic type
  (`istio.io/waypoint-for`): IST0171 with istiod's own `istio.io/WaypointBound` condition
  (pilot/pkg/serviceregistry/ambient/waypoints.go, status.go), as istioctl shows it for a
  cluster where istiod wrote it.
- A namespace with more than one injection label (IST0123, istioctl's injection analyzer:
  `istio-injection`, `istio.io/rev` and `istio.io/dataplane-mode` together).
- Pods with a sidecar in a namespace labelled ambient (ZTN0001, this project's code: Istio has
  none): the CNI leaves such pods out of ambient capture, silently.
- A mesh VirtualService for a waypoint-bound service that the waypoint does not use because
  it is in a third namespace (ZTN0002): found by compiling the waypoint's route table with the
  shared model (`compile_routes`, decision `vs-not-applicable`), as the waypoint would.
"""

from __future__ import annotations

from ztunnel.analyze import mesh
from ztunnel.analyze import messages as msg
from ztunnel.analyze.context import Analyzer, Context, PodView
from ztunnel.meshconfig.compile import ServiceRef, compile_routes
from ztunnel.meshconfig.kube import USE_WAYPOINT, WORKLOAD_KINDS
from ztunnel.meshconfig.resource import ResourceMeta

BOUND_CONDITION = "istio.io/WaypointBound"
LABEL_LINE = ("metadata", "labels", USE_WAYPOINT)
TEMPLATE_LABEL_LINE = ("spec", "template", "metadata", "labels", USE_WAYPOINT)


def _report_binding(ctx: Context, subject: ResourceMeta, b: mesh.Binding) -> None:
    if b.ref is None or not b.reason:
        return
    if b.missing:
        holder = b.ref.holder
        at = TEMPLATE_LABEL_LINE if holder.kind in WORKLOAD_KINDS else LABEL_LINE
        ctx.report(msg.ReferencedResourceNotFound, holder, "waypoint", b.ref.key, at=at)
        return
    ctx.report(msg.NegativeConditionStatus, subject, BOUND_CONDITION, b.reason, b.message)


def waypoint_bindings(ctx: Context) -> None:
    for ns in ctx.cs.namespaces:
        ref, _ = mesh.use_waypoint(ns.meta, ns.meta.labels, ns.meta.name)
        if ref is not None and mesh.find_waypoint(ctx, ref) is None:
            ctx.report(msg.ReferencedResourceNotFound, ns.meta, "waypoint", ref.key, at=LABEL_LINE)
    for svc in ctx.cs.services:
        _report_binding(ctx, svc.meta, mesh.service_binding(ctx, svc.meta))
    for se in ctx.cs.service_entries:
        _report_binding(ctx, se.meta, mesh.service_binding(ctx, se.meta))
    for pod in ctx.pods():
        if USE_WAYPOINT in pod.labels:  # namespace-inherited bindings were reported above
            _report_binding(ctx, pod.meta, mesh.workload_binding(ctx, pod.meta, pod.labels))


def injection_labels(ctx: Context) -> None:
    """IST0123, as istioctl's injection analyzer computes the labels it lists."""
    for ns in ctx.cs.namespaces:
        if ns.meta.name == "istio-system":
            continue
        labels = ns.meta.labels
        injection = labels.get(mesh.INJECTION_LABEL)
        found = [] if injection is None else [f"{mesh.INJECTION_LABEL}={injection}"]
        for key in (mesh.REVISION_LABEL, mesh.DATAPLANE_MODE):
            if key in labels and (injection is None or injection == "enabled"):
                found.append(f"{key}={labels[key]}")
        if len(found) > 1:
            ctx.report(msg.NamespaceMultipleInjectionLabels, ns.meta, found)


def _sidecar_evidence(ctx: Context, pod: PodView) -> str:
    if mesh.PROXY_CONTAINER in pod.containers:
        return f"container {mesh.PROXY_CONTAINER}"
    if mesh.SIDECAR_STATUS in pod.annotations:
        return f"annotation {mesh.SIDECAR_STATUS}"
    if pod.kind == "Pod":
        return ""  # a running pod without either has no sidecar, whatever its labels say
    for where, source in (("label", pod.labels), ("annotation", pod.annotations)):
        if source.get(mesh.SIDECAR_INJECT) == "true":
            return f"{where} {mesh.SIDECAR_INJECT}=true"
        if mesh.SIDECAR_INJECT in source:
            return ""
    if (ctx.namespace_labels(pod.namespace) or {}).get(mesh.INJECTION_LABEL) == "enabled":
        return f"namespace label {mesh.INJECTION_LABEL}=enabled"
    return ""


def sidecars_in_ambient(ctx: Context) -> None:
    for pod in ctx.pods():
        ns_labels = ctx.namespace_labels(pod.namespace) or {}
        if ns_labels.get(mesh.DATAPLANE_MODE) != "ambient":
            continue
        if pod.labels.get(mesh.DATAPLANE_MODE) == "none" or pod.host_network:
            continue  # opted out of ambient on purpose
        evidence = _sidecar_evidence(ctx, pod)
        if not evidence:
            continue
        who = "This pod has" if pod.kind == "Pod" else f"Pods of this {pod.kind} have"
        ctx.report(msg.AmbientPodHasSidecar, pod.meta, who, evidence, pod.namespace)


def waypoint_routes(ctx: Context) -> None:
    """Compile each waypoint-bound service's routes as its waypoint would and report the
    mesh VirtualServices for it that the waypoint leaves out."""
    services = [
        ServiceRef(
            s.hostname(ctx.domain), s.meta.namespace, s.meta.name, tuple(p.port for p in s.ports)
        )
        for s in ctx.cs.services
    ]
    by_label = {(vs.meta.label, vs.meta.origin.file): vs for vs in ctx.cs.virtual_services}
    for svc, ref in zip(ctx.cs.services, services, strict=True):
        b = mesh.service_binding(ctx, svc.meta)
        if b.waypoint is None or b.reason:
            continue
        wp = b.waypoint.meta
        table = compile_routes(ctx.cs, [ref], services, wp.namespace)
        for d in table.decisions:
            vs = by_label.get((d.resource, d.file))
            if d.code != "vs-not-applicable" or vs is None:
                continue
            if vs.gateways and "mesh" not in vs.gateways:
                continue  # for ingress gateways only: not meant for the waypoint
            ctx.report(
                msg.VirtualServiceIgnoredByWaypoint,
                vs.meta,
                ref.hostname,
                f"{wp.namespace}/{wp.name}",
                svc.meta.namespace,
                wp.namespace,
                at=("metadata", "namespace"),
            )


ANALYZERS = (
    Analyzer(
        "ambient.WaypointBindingAnalyzer",
        "Checks that istio.io/use-waypoint names a ready waypoint that accepts the traffic",
        ("Gateway", "Namespace|Service|ServiceEntry|Pod|Workload"),
        waypoint_bindings,
    ),
    Analyzer(
        "ambient.WaypointRouteAnalyzer",
        "Checks that the waypoint of a service uses the mesh VirtualServices written for it",
        ("Gateway", "Service", "VirtualService"),
        waypoint_routes,
    ),
    Analyzer(
        "injection.Analyzer",
        "Checks that a namespace has at most one kind of injection label",
        ("Namespace",),
        injection_labels,
    ),
    Analyzer(
        "ambient.SidecarInAmbientNamespaceAnalyzer",
        "Checks for pods with a sidecar in namespaces labelled for ambient",
        ("Namespace", "Pod|Workload"),
        sidecars_in_ambient,
    ),
)
