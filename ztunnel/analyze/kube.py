"""`ztunnel analyze --kube`: the live cluster's resources, listed through the Kubernetes API
with the official `kubernetes` client (as the node controller uses it), as config-model
documents. Every kind is listed cluster-wide (references cross namespaces), page by page; a
kind whose API is not served (its CRD is not installed: 404) has no resources."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from ztunnel.meshconfig.source import SourceDocument

CLUSTER = "<cluster>"  # the `file` of resources read from the cluster: no file reference
PAGE_SIZE = 500


@dataclass(frozen=True, slots=True)
class KubeList:
    """One list call: the kind, its API group/version and resource, and the name analyzers
    know it by (the Gateway API `Gateway` is "Gateway", Istio's own "IstioGateway")."""

    kind: str
    group: str
    version: str
    plural: str
    available_as: str
    older: tuple[str, ...] = ()  # versions to try when this one is not served (older CRDs)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def path(self) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        return f"{base}/{self.plural}"


_ISTIO, _SECURITY = "networking.istio.io", "security.istio.io"
_GATEWAY = "gateway.networking.k8s.io"
_BETA = ("v1beta1",)  # Istio before 1.22 and older Gateway API CRDs serve only v1beta1
LISTS: tuple[KubeList, ...] = (
    KubeList("Namespace", "", "v1", "namespaces", "Namespace"),
    KubeList("Service", "", "v1", "services", "Service"),
    KubeList("Pod", "", "v1", "pods", "Pod"),
    KubeList("VirtualService", _ISTIO, "v1", "virtualservices", "VirtualService", _BETA),
    KubeList("DestinationRule", _ISTIO, "v1", "destinationrules", "DestinationRule", _BETA),
    KubeList("ServiceEntry", _ISTIO, "v1", "serviceentries", "ServiceEntry", _BETA),
    KubeList("Gateway", _ISTIO, "v1", "gateways", "IstioGateway", _BETA),
    KubeList(
        "AuthorizationPolicy",
        _SECURITY,
        "v1",
        "authorizationpolicies",
        "AuthorizationPolicy",
        _BETA,
    ),
    KubeList("Gateway", _GATEWAY, "v1", "gateways", "Gateway", _BETA),
    KubeList("HTTPRoute", _GATEWAY, "v1", "httproutes", "HTTPRoute", _BETA),
    KubeList("ReferenceGrant", _GATEWAY, "v1beta1", "referencegrants", "ReferenceGrant"),
)


class KubeError(Exception):
    """The cluster could not be read (unreachable, unauthorized, a bad answer)."""


class NotServed(Exception):
    """The API server does not serve this resource (404): its CRD is not installed."""


# (list, continue token) -> the decoded list body; raises NotServed or KubeError.
Fetch = Callable[[KubeList, str], Mapping[str, Any]]


@dataclass
class ClusterSnapshot:
    documents: list[SourceDocument]
    available: set[str]


def snapshot(fetch: Fetch, lists: tuple[KubeList, ...] = LISTS) -> ClusterSnapshot:
    """Every listed resource as a document (apiVersion and kind filled in: list items lack
    them), and the names of the kinds the cluster serves."""
    docs: list[SourceDocument] = []
    available: set[str] = set()
    for spec in lists:
        for version in (spec.version, *spec.older):
            try:
                docs.extend(_list_all(fetch, replace(spec, version=version), len(docs)))
            except NotServed:
                continue
            available.add(spec.available_as)
            break
    return ClusterSnapshot(docs, available)


def _list_all(fetch: Fetch, spec: KubeList, first_index: int) -> list[SourceDocument]:
    docs: list[SourceDocument] = []
    token = ""
    while True:
        body = fetch(spec, token)
        items = body.get("items")
        if not isinstance(items, list):
            raise KubeError(f"{spec.path}: the answer has no items list")
        for item in items:
            if not isinstance(item, Mapping):
                raise KubeError(f"{spec.path}: an item is not an object")
            obj = {"apiVersion": spec.api_version, "kind": spec.kind, **item}
            docs.append(SourceDocument(obj, CLUSTER, first_index + len(docs), 0))
        meta = body.get("metadata")
        token = str(meta.get("continue") or "") if isinstance(meta, Mapping) else ""
        if not token:
            return docs


class ClientFetcher:
    """`Fetch` over the official client: CoreV1Api for core kinds, CustomObjectsApi for the
    others; bodies are decoded from JSON as the API server sent them (camelCase)."""

    def __init__(self, api_client: Any, timeout: float) -> None:
        from kubernetes import client

        self.core = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.timeout = timeout

    def __call__(self, spec: KubeList, token: str) -> Mapping[str, Any]:
        from kubernetes.client.exceptions import ApiException

        kwargs: dict[str, Any] = {
            "limit": PAGE_SIZE,
            "_preload_content": False,
            "_request_timeout": self.timeout,
        }
        if token:
            kwargs["_continue"] = token
        try:
            if not spec.group:
                call = {
                    "namespaces": self.core.list_namespace,
                    "services": self.core.list_service_for_all_namespaces,
                    "pods": self.core.list_pod_for_all_namespaces,
                }[spec.plural]
                resp = call(**kwargs)  # type: ignore[operator]
            else:
                resp = self.custom.list_cluster_custom_object(
                    spec.group, spec.version, spec.plural, **kwargs
                )
            raw = resp.data
        except ApiException as e:
            if e.status == 404:
                raise NotServed(spec.path) from None
            raise KubeError(f"listing {spec.path}: {e.status} {e.reason}") from None
        except Exception as e:  # urllib3/ssl/socket errors: the cluster is out of reach
            raise KubeError(f"listing {spec.path}: {e}") from None
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise KubeError(f"listing {spec.path}: not JSON: {e}") from None
        if not isinstance(body, Mapping):
            raise KubeError(f"listing {spec.path}: not a list object")
        return body


def connect(kubeconfig: str | None, context: str | None) -> tuple[Any, str]:
    """An API client from a kubeconfig (default: $KUBECONFIG or ~/.kube/config), or the
    in-cluster service account; and the context's namespace ("" when it sets none)."""
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    try:
        try:
            api = config.new_client_from_config(  # type: ignore[no-untyped-call]
                config_file=kubeconfig, context=context
            )
        except ConfigException:
            if kubeconfig or context or os.environ.get("KUBECONFIG"):
                raise
            try:
                config.load_incluster_config()  # type: ignore[no-untyped-call]
            except ConfigException:
                raise KubeError(
                    "no kubeconfig (--kubeconfig, $KUBECONFIG or ~/.kube/config) and not "
                    "running in a cluster"
                ) from None
            return client.ApiClient(), ""
        contexts, active = config.list_kube_config_contexts(  # type: ignore[no-untyped-call]
            config_file=kubeconfig
        )
        chosen = active
        if context:
            chosen = next((c for c in contexts if c.get("name") == context), active)
        namespace = str((chosen or {}).get("context", {}).get("namespace") or "")
        return api, namespace
    except (ConfigException, OSError, ValueError) as e:
        raise KubeError(f"no usable Kubernetes configuration: {e}") from None
