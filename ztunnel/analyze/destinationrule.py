"""DestinationRule analyzers, as istioctl's `destinationrule.SubsetSelectPodAnalyzer`
(istio/istio pkg/config/analysis/analyzers/destinationrule/subset.go): a rule's host must be a
service of the mesh (IST0174), and each subset must select at least one pod (IST0173).

Pods are those read from the cluster or the files, and the pods that Deployments,
StatefulSets, DaemonSets and ReplicaSets in the files would create (istioctl sees only running
pods). Pod labels are not augmented with the topology labels istiod adds (region, zone,
hostname): subsets that select on those are not matched here."""

from __future__ import annotations

from ztunnel.analyze import messages as msg
from ztunnel.analyze import registry
from ztunnel.analyze.context import Analyzer, Context, selects


def subsets_select_pods(ctx: Context) -> None:
    services = registry.build(ctx)
    pods = [p.labels for p in ctx.pods()]
    for dr in ctx.cs.destination_rules:
        if not dr.host:
            continue  # a host-less rule (inheritance) names no service
        entry = registry.lookup(services, dr.meta.namespace, dr.export_to, dr.host, ctx.domain)
        if entry is None:
            ctx.report(msg.UnknownDestinationRuleHost, dr.meta, dr.host)
            continue
        for subset in dr.subsets:
            selector = {**dict(entry.selector), **dict(subset.labels)}
            if not any(selects(selector.items(), labels) for labels in pods):
                ctx.report(msg.DestinationRuleSubsetNotSelectPods, dr.meta, subset.name)


ANALYZERS = (
    Analyzer(
        "destinationrule.SubsetSelectPodAnalyzer",
        "Checks if pods are selected by subsets in destination rules.",
        ("DestinationRule", "Pod|Workload", "Service", "ServiceEntry"),
        subsets_select_pods,
    ),
)
