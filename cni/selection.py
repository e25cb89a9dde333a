"""Which pods are in the ambient mesh: labels and annotations in, a decision out (pure).

Istio's defaults: a pod is ambient if its namespace has `istio.io/dataplane-mode=ambient` and
the pod does not opt out with `istio.io/dataplane-mode=none`, or if the pod itself has
`istio.io/dataplane-mode=ambient`. Never: host-network pods, pods with a sidecar
(`sidecar.istio.io/status`), the project's own pods, excluded namespaces. Standard library
only and Python 3.9 syntax: the CNI plugin imports this on the host.
"""

from collections.abc import Mapping, Sequence
from typing import NamedTuple, Optional

DATAPLANE_MODE = "istio.io/dataplane-mode"
MODE_AMBIENT = "ambient"
MODE_NONE = "none"
SIDECAR_STATUS = "sidecar.istio.io/status"
REDIRECTION_ANNOTATION = "ambient.istio.io/redirection"
REDIRECTION_ENABLED = "enabled"
# The project's own pods (the node agent / CNI DaemonSet) carry this label; they are never
# captured, so an agent that is starting can never wait for itself.
COMPONENT_LABEL = "app.kubernetes.io/part-of"
COMPONENT_VALUE = "ztunnel-py"
DEFAULT_EXCLUDED_NAMESPACES: tuple[str, ...] = ("kube-system", "istio-system")


class PodFacts(NamedTuple):
    """What selection needs to know about a pod (from the API server)."""

    namespace: str
    name: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    host_network: bool = False


class Decision(NamedTuple):
    ambient: bool
    reason: str


def is_excluded_namespace(namespace: str, excluded: Sequence[str]) -> bool:
    return namespace in excluded


def decide(
    pod: PodFacts,
    namespace_labels: Optional[Mapping[str, str]],
    excluded_namespaces: Sequence[str] = DEFAULT_EXCLUDED_NAMESPACES,
) -> Decision:
    """Is this pod ambient? `namespace_labels` None means the namespace is unknown (no labels)."""
    if is_excluded_namespace(pod.namespace, excluded_namespaces):
        return Decision(False, f"namespace {pod.namespace} is excluded")
    if pod.host_network:
        return Decision(False, "host-network pod")
    if pod.labels.get(COMPONENT_LABEL) == COMPONENT_VALUE:
        return Decision(False, "a pod of the mesh itself")
    if SIDECAR_STATUS in pod.annotations:
        return Decision(False, "pod has a sidecar")
    pod_mode = pod.labels.get(DATAPLANE_MODE)
    if pod_mode == MODE_NONE:
        return Decision(False, f"pod opted out ({DATAPLANE_MODE}={MODE_NONE})")
    if pod_mode == MODE_AMBIENT:
        return Decision(True, f"pod label {DATAPLANE_MODE}={MODE_AMBIENT}")
    ns_mode = (namespace_labels or {}).get(DATAPLANE_MODE)
    if ns_mode == MODE_AMBIENT:
        return Decision(True, f"namespace label {DATAPLANE_MODE}={MODE_AMBIENT}")
    return Decision(False, "neither pod nor namespace is labelled ambient")


def pod_facts(obj: Mapping[str, object]) -> PodFacts:
    """PodFacts from a Pod object as the API server sends it (a JSON dict)."""
    meta = obj.get("metadata")
    spec = obj.get("spec")
    meta = meta if isinstance(meta, dict) else {}
    spec = spec if isinstance(spec, dict) else {}
    return PodFacts(
        namespace=str(meta.get("namespace") or ""),
        name=str(meta.get("name") or ""),
        labels=_str_map(meta.get("labels")),
        annotations=_str_map(meta.get("annotations")),
        host_network=spec.get("hostNetwork") is True,
    )


def labels_of(obj: Mapping[str, object]) -> Mapping[str, str]:
    meta = obj.get("metadata")
    return _str_map(meta.get("labels") if isinstance(meta, dict) else None)


def _str_map(value: object) -> Mapping[str, str]:
    if not isinstance(value, dict):
        return {}
    return {str(k): str(v) for k, v in value.items()}
