"""What every analyzer works with: the parsed configuration (`ConfigSet`), which kinds the
sources could provide at all, and `report`, which turns a finding about a resource into a
`Message` with istioctl's resource reference and field line."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ztunnel.analyze.messages import Message, MessageType, ResourceRef
from ztunnel.meshconfig.load import ConfigSet
from ztunnel.meshconfig.resource import ResourceError, ResourceMeta
from ztunnel.meshconfig.source import PathKey, SourceDocument

SUPPRESS_ANNOTATION = "galley.istio.io/analyze-suppress"

# Kind names for availability. The Gateway API `Gateway` is "Gateway", Istio's own is
# "IstioGateway"; "Workload" stands for Deployments, StatefulSets, DaemonSets, ReplicaSets.
ISTIO_KINDS = frozenset(
    {"VirtualService", "DestinationRule", "ServiceEntry", "IstioGateway", "AuthorizationPolicy"}
    | {"Gateway", "HTTPRoute", "ReferenceGrant"}
)
RUNTIME_KINDS = frozenset({"Service", "Pod", "Namespace", "Workload"})


@dataclass(frozen=True, slots=True)
class Analyzer:
    """One analyzer: Istio's name for it (`istioctl analyze -L`), what it checks, the kinds it
    needs (each entry: one kind, or alternatives joined by `|`), and the check itself."""

    name: str
    description: str
    inputs: tuple[str, ...]
    run: Callable[[Context], None]

    def missing(self, available: frozenset[str]) -> list[str]:
        return [i for i in self.inputs if not any(k in available for k in i.split("|"))]


@dataclass(frozen=True, slots=True)
class PodView:
    """A pod, or the pods a workload controller's template creates."""

    kind: str
    meta: ResourceMeta
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    containers: tuple[str, ...]
    host_network: bool

    @property
    def namespace(self) -> str:
        return self.meta.namespace


@dataclass
class Context:
    cs: ConfigSet
    available: frozenset[str]
    parse_errors: list[ResourceError] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    _docs: dict[tuple[str, int, int], SourceDocument] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for d in self.cs.documents:
            self._docs.setdefault((d.file, d.index, d.line), d)

    @property
    def root_namespace(self) -> str:
        return self.cs.options.root_namespace

    @property
    def domain(self) -> str:
        return self.cs.options.domain

    def has(self, kind: str) -> bool:
        return kind in self.available

    # ---- resources ----

    def document(self, meta: ResourceMeta) -> SourceDocument | None:
        o = meta.origin
        return self._docs.get((o.file, o.index, o.line))

    def ref(self, meta: ResourceMeta) -> ResourceRef:
        return ResourceRef(
            meta.kind,
            meta.namespace,
            meta.name,
            meta.origin.file,
            meta.origin.line,
            meta.annotations.get(SUPPRESS_ANNOTATION, ""),
        )

    def field_line(self, meta: ResourceMeta, path: PathKey) -> int:
        """istioctl's `util.ErrorLine`: the line of a scalar field at exactly `path` (its field
        map holds scalars only); 0 when there is none, and the document's line is used."""
        doc = self.document(meta)
        if doc is None or path not in doc.lines:
            return 0
        value: Any = doc.obj
        for part in path:
            if isinstance(value, Mapping) and isinstance(part, str) and part in value:
                value = value[part]
                continue
            if not (isinstance(value, list) and isinstance(part, int) and part < len(value)):
                return 0
            value = value[part]
        if isinstance(value, Mapping | list) or value is None:
            return 0
        return doc.lines[path]

    def report(
        self, mtype: MessageType, meta: ResourceMeta, *args: Any, at: PathKey | None = None
    ) -> None:
        line = self.field_line(meta, at) if at is not None else 0
        self.messages.append(Message(mtype, mtype.format(*args), self.ref(meta), line))

    def namespace_labels(self, name: str) -> Mapping[str, str] | None:
        ns = self.cs.namespace(name)
        return None if ns is None else ns.meta.labels

    def pods(self) -> Iterator[PodView]:
        """Pods, then the pod templates of workload controllers (files rarely hold pods)."""
        for p in self.cs.pods:
            yield PodView(
                "Pod", p.meta, p.meta.labels, p.meta.annotations, p.containers, p.host_network
            )
        for w in self.cs.workloads:
            yield PodView(
                w.meta.kind,
                w.meta,
                dict(w.pod_labels),
                dict(w.pod_annotations),
                w.containers,
                w.host_network,
            )


def selects(selector: Iterable[tuple[str, str]], labels: Mapping[str, str]) -> bool:
    """A matchLabels selector (`labels.SelectorFromSet`): every pair present; empty: all."""
    return all(labels.get(k) == v for k, v in selector)


def selector_string(selector: Iterable[tuple[str, str]]) -> str:
    """`labels.SelectorFromSet(m).String()`: `k=v` pairs sorted by key, comma separated."""
    return ",".join(f"{k}={v}" for k, v in sorted(selector))
