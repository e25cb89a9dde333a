"""What the Kubernetes API stand-in serves, pure: the built-in resources, those that
CustomResourceDefinitions add (any group, any versions, as the API server derives them from
a CRD), and the documents clients discover them with (legacy discovery and OpenAPI v3)."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]
CRD_GROUP = "apiextensions.k8s.io"


@dataclass(frozen=True)
class Resource:
    """One kind of object the stand-in serves, at one version."""

    group: str  # "" for core
    version: str
    plural: str
    singular: str
    kind: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    has_status: bool = False
    custom: bool = False  # defined by a CustomResourceDefinition
    categories: tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def group_resource(self) -> str:
        """How API errors name it: `pods`, `daemonsets.apps`, `gateways.networking.istio.io`."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def group_kind(self) -> str:
        """How validation errors name it: `Pod`, `VirtualService.networking.istio.io`."""
        return f"{self.kind}.{self.group}" if self.group else self.kind

    @property
    def key(self) -> str:
        """Where its objects are stored: one place for all versions of a custom resource
        (the CRD's name), the plural for built-ins."""
        return f"{self.plural}.{self.group}" if self.custom else self.plural


RESOURCES = (
    Resource("", "v1", "namespaces", "namespace", "Namespace", False, ("ns",), True),
    Resource("", "v1", "nodes", "node", "Node", False, ("no",), True),
    Resource("", "v1", "pods", "pod", "Pod", True, ("po",), True),
    Resource("", "v1", "services", "service", "Service", True, ("svc",), True),
    Resource("apps", "v1", "daemonsets", "daemonset", "DaemonSet", True, ("ds",), True),
    Resource(
        CRD_GROUP,
        "v1",
        "customresourcedefinitions",
        "customresourcedefinition",
        "CustomResourceDefinition",
        False,
        ("crd", "crds"),
        True,
    ),
)
BY_PATH = {(r.group, r.version, r.plural): r for r in RESOURCES}


# ---- versions ------------------------------------------------------------------------------

_KUBE_VERSION = re.compile(r"^v([1-9][0-9]*)(?:(alpha|beta)([1-9][0-9]*))?$")


def version_priority(version: str) -> tuple[int, int, int, str]:
    """A sort key putting versions in Kubernetes' discovery order: GA before beta before
    alpha, higher numbers first, then anything else alphabetically (apimachinery
    version.CompareKubeAwareVersionStrings)."""
    m = _KUBE_VERSION.match(version)
    if not m:
        return (3, 0, 0, version)
    stage = {None: 0, "beta": 1, "alpha": 2}[m.group(2)]
    return (stage, -int(m.group(1)), -int(m.group(3) or 0), "")


# ---- CustomResourceDefinitions -------------------------------------------------------------

_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)+$")
_KIND = re.compile(r"^[A-Z][A-Za-z0-9]*$")


class InvalidDefinition(ValueError):
    """A CustomResourceDefinition the API refuses (422 Invalid), naming the field."""


def resources_from_crd(crd: Mapping[str, Any], builtin_groups: Iterable[str]) -> list[Resource]:
    """The resources a CRD serves, one per served version (apiextensions validation, the
    parts that decide what is served: group, names, scope, versions)."""
    spec = crd.get("spec")
    if not isinstance(spec, Mapping):
        raise InvalidDefinition("spec: Required value")
    group = spec.get("group")
    if not isinstance(group, str) or not _DNS_SUBDOMAIN.match(group):
        raise InvalidDefinition(
            "spec.group: Invalid value: should be a domain with at least one dot"
        )
    if group in set(builtin_groups):
        raise InvalidDefinition(f"spec.group: Invalid value: {group!r} is served by the API server")
    names = spec.get("names")
    if not isinstance(names, Mapping):
        raise InvalidDefinition("spec.names: Required value")
    plural, kind = names.get("plural"), names.get("kind")
    if not isinstance(plural, str) or not _DNS_LABEL.match(plural):
        raise InvalidDefinition(
            "spec.names.plural: Invalid value: a lowercase DNS label is required"
        )
    if not isinstance(kind, str) or not _KIND.match(kind):
        raise InvalidDefinition("spec.names.kind: Invalid value: a CamelCase kind is required")
    singular = names.get("singular") or kind.lower()
    if not isinstance(singular, str) or not _DNS_LABEL.match(singular):
        raise InvalidDefinition(
            "spec.names.singular: Invalid value: a lowercase DNS label is required"
        )
    short_names = _names_list(names, "shortNames")
    categories = _names_list(names, "categories")
    name = (crd.get("metadata") or {}).get("name")
    if name != f"{plural}.{group}":
        raise InvalidDefinition(
            f'metadata.name: Invalid value: {name!r}: must be spec.names.plural+"."+spec.group'
        )
    scope = spec.get("scope")
    if scope not in ("Namespaced", "Cluster"):
        raise InvalidDefinition(
            'spec.scope: Unsupported value: supported values: "Cluster", "Namespaced"'
        )
    versions = spec.get("versions")
    if not isinstance(versions, list) or not versions:
        raise InvalidDefinition("spec.versions: Required value")
    out: list[Resource] = []
    storage, seen = 0, set()
    for i, v in enumerate(versions):
        if not isinstance(v, Mapping):
            raise InvalidDefinition(f"spec.versions[{i}]: an object is required")
        vname = v.get("name")
        if not isinstance(vname, str) or not _DNS_LABEL.match(vname) or vname in seen:
            raise InvalidDefinition(f"spec.versions[{i}].name: Invalid value: {vname!r}")
        seen.add(vname)
        for flag in ("served", "storage"):
            if not isinstance(v.get(flag), bool):
                raise InvalidDefinition(f"spec.versions[{i}].{flag}: Required value (a boolean)")
        schema = v.get("schema")
        if not isinstance(schema, Mapping) or not isinstance(
            schema.get("openAPIV3Schema"), Mapping
        ):
            # apiextensions/v1: every version carries a structural schema (not enforced here).
            raise InvalidDefinition(
                f"spec.versions[{i}].schema.openAPIV3Schema: Required value: schemas are required"
            )
        storage += v["storage"]
        if v["served"]:
            subresources = v.get("subresources") or {}
            out.append(
                Resource(
                    group,
                    vname,
                    plural,
                    singular,
                    kind,
                    scope == "Namespaced",
                    short_names,
                    isinstance(subresources, Mapping) and "status" in subresources,
                    custom=True,
                    categories=categories,
                )
            )
    if storage != 1:
        raise InvalidDefinition("spec.versions: Invalid value: exactly one version must be storage")
    return out


def _names_list(names: Mapping[str, Any], field: str) -> tuple[str, ...]:
    value = names.get(field) or []
    if not isinstance(value, list) or not all(
        isinstance(x, str) and _DNS_LABEL.match(x) for x in value
    ):
        raise InvalidDefinition(f"spec.names.{field}: Invalid value: lowercase DNS labels required")
    return tuple(value)


def crd_status(crd: Mapping[str, Any]) -> dict[str, Any]:
    """The status the API server writes once a valid CRD is served (`kubectl wait
    --for condition=established` waits for it)."""
    spec = crd["spec"]
    names = dict(spec["names"])
    names.setdefault("singular", names["kind"].lower())
    names.setdefault("listKind", f"{names['kind']}List")
    conditions = [
        {
            "type": t,
            "status": "True",
            "reason": reason,
            "message": message,
            "lastTransitionTime": (crd.get("metadata") or {}).get("creationTimestamp", ""),
        }
        for t, reason, message in (
            ("NamesAccepted", "NoConflicts", "no conflicts found"),
            ("Established", "InitialNamesAccepted", "the initial names have been accepted"),
        )
    ]
    stored = [v["name"] for v in spec["versions"] if v.get("storage")]
    return {"acceptedNames": names, "conditions": conditions, "storedVersions": stored}


# ---- the registry --------------------------------------------------------------------------


class Registry:
    """The resources served now: the built-ins and, per CRD name, what that CRD defines.
    Not locked: the object store changes it under its own lock."""

    def __init__(self, builtins: tuple[Resource, ...] = RESOURCES) -> None:
        self.builtins = builtins
        self._custom: dict[str, tuple[Resource, ...]] = {}

    def all(self) -> list[Resource]:
        return [*self.builtins, *(r for rs in self._custom.values() for r in rs)]

    def find(self, group: str, version: str, plural: str) -> Resource | None:
        return next(
            (r for r in self.all() if (r.group, r.version, r.plural) == (group, version, plural)),
            None,
        )

    def builtin_groups(self) -> set[str]:
        return {r.group for r in self.builtins}

    def define(self, crd_name: str, resources: Iterable[Resource]) -> None:
        self._custom[crd_name] = tuple(resources)

    def defined(self, crd_name: str) -> tuple[Resource, ...]:
        return self._custom.get(crd_name, ())

    def undefine(self, crd_name: str) -> None:
        self._custom.pop(crd_name, None)

    def group_versions(self) -> dict[str, list[str]]:
        """group -> its served versions, the preferred first ("" is the core group)."""
        out: dict[str, set[str]] = {}
        for r in self.all():
            out.setdefault(r.group, set()).add(r.version)
        return {g: sorted(vs, key=version_priority) for g, vs in sorted(out.items())}


# ---- discovery documents (legacy, as kubectl falls back to them) -----------------------------


def api_group(group: str, versions: list[str]) -> dict[str, Any]:
    gvs = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
    return {
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": group,
        "versions": gvs,
        "preferredVersion": gvs[0],
    }


def api_group_list(registry: Registry) -> dict[str, Any]:
    groups = [api_group(g, vs) for g, vs in registry.group_versions().items() if g]
    for g in groups:
        del g["kind"], g["apiVersion"]
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}


def api_resource_list(registry: Registry, group: str, version: str) -> dict[str, Any]:
    resources: list[dict[str, Any]] = []
    for r in registry.all():
        if (r.group, r.version) != (group, version):
            continue
        entry: dict[str, Any] = {
            "name": r.plural,
            "singularName": r.singular,
            "namespaced": r.namespaced,
            "kind": r.kind,
            "verbs": VERBS,
            "shortNames": list(r.short_names),
        }
        if r.categories:
            entry["categories"] = list(r.categories)
        resources.append(entry)
        if r.has_status:
            resources.append(
                {
                    "name": f"{r.plural}/status",
                    "singularName": "",
                    "namespaced": r.namespaced,
                    "kind": r.kind,
                    "verbs": ["get", "patch", "update"],
                }
            )
    gv = f"{group}/{version}" if group else version
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": gv,
        "resources": resources,
    }


# ---- OpenAPI v3 -----------------------------------------------------------------------------
# kubectl (apply/create/replace with the default --validate=strict) asks /openapi/v3 whether
# the server takes the `fieldValidation` parameter on PATCH for the kind (cli-runtime's
# query-param verifier); without an answer it wants /openapi/v2 schemas for client-side
# validation. The documents below describe the paths and parameters truthfully and carry no
# schemas: kubectl then builds strategic merge patches from its own types, as it does for
# servers without OpenAPI schemas.

_PATCH_TYPES = (
    "application/json-patch+json",
    "application/merge-patch+json",
    "application/strategic-merge-patch+json",
)


OPENAPI_INFO = {"title": "Kubernetes API stand-in", "version": "v1.32.0"}


def openapi_gv_path(group: str, version: str) -> str:
    return f"apis/{group}/{version}" if group else f"api/{version}"


def openapi_document(registry: Registry, group: str, version: str) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    query = [
        {"name": n, "in": "query", "schema": {"type": "string"}, "uniqueItems": True}
        for n in ("dryRun", "fieldManager", "fieldValidation")
    ]
    ok = {"200": {"description": "OK", "content": {"application/json": {"schema": {}}}}}
    for r in registry.all():
        if (r.group, r.version) != (group, version):
            continue
        gvk = {"group": r.group, "version": r.version, "kind": r.kind}
        base = "/" + openapi_gv_path(group, version)
        if r.namespaced:
            base += "/namespaces/{namespace}"
        item = f"{base}/{r.plural}/{{name}}"
        patch_types = _PATCH_TYPES if not r.custom else _PATCH_TYPES[:2]
        content = {t: {"schema": {"type": "object"}} for t in patch_types}
        body = {"content": content, "required": True}
        ops: dict[str, dict[str, Any]] = {
            "get": {"operationId": f"read{r.kind}", "responses": ok},
            "put": {"operationId": f"replace{r.kind}", "parameters": query, "responses": ok},
            "patch": {
                "operationId": f"patch{r.kind}",
                "parameters": query,
                "requestBody": body,
                "responses": ok,
            },
            "delete": {"operationId": f"delete{r.kind}", "responses": ok},
        }
        for op in ops.values():
            op["x-kubernetes-group-version-kind"] = gvk
        paths[item] = ops
        paths[f"{base}/{r.plural}"] = {
            "get": {
                "operationId": f"list{r.kind}",
                "responses": ok,
                "x-kubernetes-group-version-kind": gvk,
            },
            "post": {
                "operationId": f"create{r.kind}",
                "parameters": query,
                "responses": ok,
                "x-kubernetes-group-version-kind": gvk,
            },
        }
    return {
        "openapi": "3.0.0",
        "info": OPENAPI_INFO,
        "paths": paths,
        "components": {"schemas": {}},
    }


def openapi_root(registry: Registry) -> dict[str, Any]:
    paths = {}
    for group, versions in registry.group_versions().items():
        for v in versions:
            doc = json.dumps(openapi_document(registry, group, v), sort_keys=True).encode()
            digest = hashlib.sha512(doc).hexdigest()[:64].upper()
            path = openapi_gv_path(group, v)
            paths[path] = {"serverRelativeURL": f"/openapi/v3/{path}?hash={digest}"}
    return {"paths": paths}
