"""`ztunnel analyze --kube`: the live cluster's resources, listed through the Kubernetes API
with the official `kubernetes` client (as the node controller uses it), as config-model
documents. Every kind is listed cluster-wide (references cross namespaces), page by page; a
kind whose API is not served (its CRD is not installed: 404) has no resources."""

from __future__ import annotations

import contextlib
import json
import os
import ssl
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import yaml

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
    """The cluster's resources as documents (file CLUSTER; `line` is the 1-based position
    in the snapshot, which `where` names), and the kinds the cluster serves."""

    documents: list[SourceDocument]
    available: set[str]
    origins: list[str] = field(default_factory=list)

    def namespaces(self) -> set[str]:
        """The names of the Namespaces listed (well-formed ones)."""
        out = set()
        for d in self.documents:
            if not isinstance(d.obj, Mapping) or d.obj.get("kind") != "Namespace":
                continue
            meta = d.obj.get("metadata")
            if isinstance(meta, Mapping):
                out.add(str(meta.get("name")))
        return out

    def where(self, line: int) -> str:
        """Where a document came from, for errors about objects that cannot be named
        (`VirtualService #2 listed from /apis/networking.istio.io/v1/virtualservices`)."""
        if 0 < line <= len(self.origins):
            return self.origins[line - 1]
        return "a resource from the cluster"


def snapshot(fetch: Fetch, lists: tuple[KubeList, ...] = LISTS) -> ClusterSnapshot:
    """Every listed resource as a document (apiVersion and kind filled in: list items lack
    them), and the names of the kinds the cluster serves."""
    snap = ClusterSnapshot([], set())
    for spec in lists:
        for version in (spec.version, *spec.older):
            try:
                _list_all(fetch, replace(spec, version=version), snap)
            except NotServed:
                if not spec.group:  # every API server serves core/v1: this is not one
                    raise KubeError(
                        f"listing {spec.path}: 404 Not Found: not a Kubernetes API server?"
                    ) from None
                continue
            snap.available.add(spec.available_as)
            break
    return snap


def _list_all(fetch: Fetch, spec: KubeList, into: ClusterSnapshot) -> None:
    """Every page of one list into the snapshot. An item that is not a well-formed object
    is kept as it came: the config model reports it (naming where it was listed) and the
    rest is analyzed."""
    token = ""
    asked: set[str] = set()
    n = 0
    while True:
        if token in asked:  # a broken server would otherwise page forever
            raise KubeError(f"listing {spec.path}: the server repeats a continue token")
        asked.add(token)
        body = fetch(spec, token)
        items = body.get("items")
        if not isinstance(items, list):
            raise KubeError(f"listing {spec.path}: the answer has no items list")
        for item in items:
            n += 1
            obj: Any = item
            if isinstance(item, Mapping):
                # The list's kind, whatever an item says: the server answered for this kind.
                obj = {**item, "apiVersion": spec.api_version, "kind": spec.kind}
            position = len(into.documents) + 1
            into.documents.append(SourceDocument(obj, CLUSTER, position - 1, position))
            into.origins.append(f"{spec.kind} #{n} listed from {spec.path}")
        meta = body.get("metadata")
        token = str(meta.get("continue") or "") if isinstance(meta, Mapping) else ""
        if not token:
            return


class ClientFetcher:
    """`Fetch` over the official client: CoreV1Api for core kinds, CustomObjectsApi for the
    others; bodies are decoded from JSON as the API server sent them (camelCase)."""

    def __init__(self, api_client: Any, timeout: float) -> None:
        from kubernetes import client

        self.core = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.timeout = timeout
        self.server = urllib.parse.urlsplit(str(api_client.configuration.host)).netloc

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
            if not e.status:  # the client's wrapping of a TLS failure
                raise KubeError(f"listing {spec.path}: {unreachable(e, self.server, 0)}") from None
            raise KubeError(f"listing {spec.path}: {refused(e.status, e.reason, e.body)}") from None
        except Exception as e:  # urllib3/ssl/socket errors: the cluster is out of reach
            why = unreachable(e, self.server, self.timeout)
            raise KubeError(f"listing {spec.path}: {why}") from None
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise KubeError(
                f"listing {spec.path}: the answer is not JSON: is {self.server} a Kubernetes "
                "API server?"
            ) from None
        if not isinstance(body, Mapping):
            raise KubeError(f"listing {spec.path}: the answer is not a list object")
        return body


def refused(status: int, reason: str | None, body: Any) -> str:
    """An API error answer: the status, and the Status object's message when it says more
    (`403 Forbidden: pods is forbidden: User ... cannot list ...`)."""
    text = f"{status} {reason or ''}".strip()
    message = ""
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        doc = json.loads(body)
        if isinstance(doc, Mapping) and doc.get("kind") == "Status":
            message = str(doc.get("message") or "")
    if status == 401:
        # kubectl: "error: You must be logged in to the server (Unauthorized)"
        return f"{text}: you must be logged in to the server (check the kubeconfig's credentials)"
    if message and message != reason:
        return f"{text}: {message}"
    return text


def unreachable(e: BaseException, server: str, timeout: float) -> str:
    """Why the API server could not be asked, in kubectl's words where it has some
    ("The connection to the server ... was refused - did you specify the right host or
    port?"), without the client library's object names."""
    import urllib3.exceptions as u3

    reason: BaseException = e
    if isinstance(e, u3.MaxRetryError) and e.reason is not None:
        reason = e.reason
    cause = _innermost(reason)
    if isinstance(reason, u3.NameResolutionError):
        host = server.rsplit(":", 1)[0]
        return f"Unable to connect to the server: the name {host} could not be resolved"
    if isinstance(cause, ConnectionRefusedError):
        return (
            f"The connection to the server {server} was refused - did you specify the right "
            "host or port?"
        )
    # (urllib3's NewConnectionError is a ConnectTimeoutError: refusals are sorted out above.)
    if isinstance(reason, (u3.ReadTimeoutError, u3.ConnectTimeoutError, TimeoutError)) and not (
        isinstance(cause, OSError) and cause.strerror
    ):
        return f"the server {server} did not answer within {timeout:g} s (--timeout)"
    if isinstance(reason, u3.SSLError) or isinstance(cause, ssl.SSLError) or "SSLError" in str(e):
        detail = cause if isinstance(cause, ssl.SSLError) else reason
        return f"Unable to connect to the server {server}: TLS: {_one_line(detail)}"
    if isinstance(cause, OSError) and cause.strerror:
        return f"Unable to connect to the server {server}: {cause.strerror}"
    # (urllib3's ProtocolError("Connection aborted.", RemoteDisconnected(...)): the inner one)
    return f"Unable to connect to the server {server}: {_one_line(cause)}"


def _innermost(e: BaseException) -> BaseException:
    """The error at the bottom of a chain: causes, contexts, and exceptions carried as
    arguments (as urllib3 wraps the socket's)."""
    seen = {id(e)}
    while True:
        inner = e.__cause__ or e.__context__
        if inner is None:
            inner = next((a for a in e.args if isinstance(a, BaseException)), None)
        if inner is None or id(inner) in seen:
            return e
        seen.add(id(inner))
        e = inner


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# One more try when a connection cannot be made; a request the server took is not repeated
# (so --timeout bounds a stalled server), as client-go does not retry it either.
def _retries() -> Any:
    import urllib3

    return urllib3.Retry(total=1, connect=1, read=0, redirect=0, status=0, other=0)


def connect(kubeconfig: str | None, context: str | None) -> tuple[Any, str]:
    """An API client from a kubeconfig (default: $KUBECONFIG or ~/.kube/config), or the
    in-cluster service account; and the context's namespace ("" when it sets none). The
    kubeconfig is only read (refreshed credentials are not written back)."""
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    cfg = client.Configuration()
    if kubeconfig and not os.path.exists(kubeconfig):
        raise KubeError(f"no usable Kubernetes configuration: {kubeconfig}: no such file")
    # $KUBECONFIG and ~ as they are now: the client resolves its default once, when first
    # imported. $KUBECONFIG may name several files separated by ":", which the client
    # merges as kubectl does.
    explicit = kubeconfig or os.environ.get("KUBECONFIG") or None
    default = os.path.expanduser("~/.kube/config")
    kubeconfig = explicit or default
    try:
        try:
            config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=kubeconfig,
                context=context,
                client_configuration=cfg,
                persist_config=False,
            )
        except ConfigException:
            if explicit or context or os.path.exists(default):
                raise
            try:
                config.load_incluster_config(cfg)  # type: ignore[no-untyped-call]
            except ConfigException:
                raise KubeError(
                    "no kubeconfig (--kubeconfig, $KUBECONFIG or ~/.kube/config) and not "
                    "running in a cluster"
                ) from None
            cfg.retries = _retries()
            return client.ApiClient(cfg), ""
        cfg.retries = _retries()
        api = client.ApiClient(cfg)
        contexts, active = config.list_kube_config_contexts(  # type: ignore[no-untyped-call]
            config_file=kubeconfig
        )
        chosen = active
        if context:
            chosen = next((c for c in contexts if c.get("name") == context), active)
        namespace = str((chosen or {}).get("context", {}).get("namespace") or "")
        return api, namespace
    except (ConfigException, OSError, ValueError, yaml.YAMLError) as e:
        raise KubeError(f"no usable Kubernetes configuration: {_one_line(e)}") from None
    except (TypeError, KeyError, AttributeError, IndexError) as e:
        # The client walks the kubeconfig as dicts and lists: a wrong shape ends up here.
        where = kubeconfig
        raise KubeError(f"no usable Kubernetes configuration: {where} is malformed ({e})") from None
