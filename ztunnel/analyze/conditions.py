"""Negative status conditions written by controllers (istiod, Gateway API implementations),
as istioctl's `conditions.ConditionAnalyzer` reports them (istio/istio pkg/config/analysis/
analyzers/conditions/conditions.go): IST0171 for each condition whose status is the negative
one for its type. Resources read from files have a status only when they were saved from a
cluster (`kubectl get -o yaml`)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from ztunnel.analyze import messages as msg
from ztunnel.analyze.context import Analyzer, Context
from ztunnel.meshconfig.resource import ResourceMeta

_ROUTE = {"Accepted": "False", "Programmed": "False", "ResolvedRefs": "False"}
NEGATIVE: dict[str, dict[str, str]] = {
    "Service": {"istio.io/WaypointBound": "False"},
    "ServiceEntry": {"istio.io/WaypointBound": "False"},
    "AuthorizationPolicy": {"ZtunnelAccepted": "False", "WaypointAccepted": "False"},
    "Gateway": _ROUTE,
    "HTTPRoute": _ROUTE,
}


def _conditions(status: Any, kind: str) -> Iterator[Mapping[str, Any]]:
    """status.conditions, or for routes the conditions of every status.parents entry."""
    if not isinstance(status, Mapping):
        return
    lists = [status.get("conditions")]
    if kind == "HTTPRoute":
        parents = status.get("parents")
        lists = (
            [p.get("conditions") for p in parents if isinstance(p, Mapping)]
            if isinstance(parents, list)
            else []
        )
    for items in lists:
        if isinstance(items, list):
            yield from (c for c in items if isinstance(c, Mapping))


def negative_conditions(ctx: Context) -> None:
    metas: list[ResourceMeta] = [
        *(s.meta for s in ctx.cs.services),
        *(s.meta for s in ctx.cs.service_entries),
        *(a.meta for a in ctx.cs.authorization_policies),
        *(g.meta for g in ctx.cs.gateways),
        *(r.meta for r in ctx.cs.http_routes),
    ]
    for meta in metas:
        doc = ctx.document(meta)
        if doc is None or not isinstance(doc.obj, Mapping):
            continue
        negative = NEGATIVE[meta.kind]
        for c in _conditions(doc.obj.get("status"), meta.kind):
            ctype, status = str(c.get("type", "")), str(c.get("status", ""))
            reason, message = str(c.get("reason", "")), str(c.get("message", ""))
            # A WaypointAccepted "PartiallyInvalid" is reported although its status is True.
            partial = (
                meta.kind == "AuthorizationPolicy"
                and ctype == "WaypointAccepted"
                and reason == "PartiallyInvalid"
            )
            if negative.get(ctype) == status or partial:
                ctx.report(msg.NegativeConditionStatus, meta, ctype, reason, message)


ANALYZERS = (
    Analyzer(
        "conditions.ConditionAnalyzer",
        "Checks for negative status conditions on resources",
        (),
        negative_conditions,
    ),
)
