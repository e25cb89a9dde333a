"""A stand-in for the Kubernetes API server, for tests and the lab (no real one runs here).

It is NOT Kubernetes: one process, objects in memory, no admission, no controllers. It
implements what our components and `kubectl label/annotate/get -o json/delete` use, with the
real API's wire behaviour: HTTPS with bearer-token auth; legacy discovery (`/api`, `/apis`,
`/api/v1`, `/apis/apps/v1`, `/version`); core/v1 namespaces, nodes, pods (+ `pods/status`),
services and apps/v1 daemonsets, and CustomResourceDefinitions with the custom resources they
define (`kuberesources`); get/list/watch with resourceVersion (watch replays from a
bounded event log, 410 Gone "Expired" when the version is older than the log, BOOKMARK events
when asked), label selectors (`=`, `==`, `!=`, `in`, `notin`, exists, `!key`) and field
selectors (`metadata.name`, `metadata.namespace`, `spec.nodeName`, `status.phase`); create,
PUT with optimistic concurrency (409), JSON merge patch and strategic merge patch (`kubepatch`),
delete (graceful for bound pods when asked), paginated lists (`limit`/`continue`).
Faults can be injected (status, delay, count per method/path) to test clients' error paths.

Run it: `python -m ztunnel.lab.kubeapi --listen 127.0.0.1:6443 --token T --dir D` writes
`D/ca.pem` and `D/kubeconfig` (for kubectl and our components) and serves until SIGTERM.
In-process: `KubeApiServer(...)`, `.start()`, `.store` (the same objects, for test set-up).
"""

from __future__ import annotations

import argparse
import base64
import builtins
import collections
import contextlib
import copy
import datetime
import hmac
import ipaddress
import json
import logging
import re
import signal
import socket
import ssl
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ztunnel.errors import ZtunnelError
from ztunnel.lab.kubepatch import PatchError, merge_patch, strategic_merge_patch
from ztunnel.lab.kuberesources import (
    BY_PATH,
    CRD_GROUP,
    OPENAPI_INFO,
    RESOURCES,
    VERBS,
    InvalidDefinition,
    Registry,
    Resource,
    api_group,
    api_group_list,
    api_resource_list,
    crd_status,
    openapi_document,
    openapi_gv_path,
    openapi_root,
    resources_from_crd,
)

log = logging.getLogger(__name__)

MAX_BODY = 3 * 1024 * 1024  # the real API server's request size limit
MAX_CONNECTIONS = 256
HANDSHAKE_TIMEOUT = 10.0
IDLE_TIMEOUT = 120.0
DEFAULT_EVENT_LOG = 1000
DEFAULT_WATCH_TIMEOUT = 1800.0
SERVER_VERSION = {
    "major": "1",
    "minor": "32",
    "gitVersion": "v1.32.0-ztunnel-standin",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2025-01-01T00:00:00Z",
    "goVersion": "none",
    "compiler": "none",
    "platform": "linux/amd64",
}


class ApiError(ZtunnelError):
    """A request the API refuses; carries the HTTP status and the Status reason."""

    def __init__(
        self, code: int, reason: str, message: str, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details

    def status(self) -> dict[str, Any]:
        out = status_object(self.code, self.reason, self.message)
        if self.details:
            out["details"] = self.details
        return out

    # The API server's errors about one object (apimachinery api/errors: NewNotFound,
    # NewAlreadyExists, NewInvalid), with the Status details kubectl prints them from.
    @classmethod
    def not_found(cls, res: Resource, name: str) -> ApiError:
        details = {"name": name, "group": res.group, "kind": res.plural}
        return cls(404, "NotFound", f'{res.group_resource} "{name}" not found', details)

    @classmethod
    def already_exists(cls, res: Resource, name: str) -> ApiError:
        details = {"name": name, "group": res.group, "kind": res.plural}
        return cls(409, "AlreadyExists", f'{res.group_resource} "{name}" already exists', details)

    @classmethod
    def invalid(cls, res: Resource, name: Any, field: str, problem: str) -> ApiError:
        """422 Invalid: `problem` as field.ErrorList words it (`Invalid value: "x": ...`,
        `Required value: ...`)."""
        shown = name if isinstance(name, str) else ""
        cause = {"reason": _cause_reason(problem), "message": problem, "field": field}
        details = {"name": shown, "group": res.group, "kind": res.kind, "causes": [cause]}
        message = f'{res.group_kind} "{shown}" is invalid: {field}: {problem}'
        return cls(422, "Invalid", message, details)


def _cause_reason(problem: str) -> str:
    for words, reason in (
        ("Required value", "FieldValueRequired"),
        ("Unsupported", "FieldValueNotSupported"),
    ):
        if problem.startswith(words):
            return reason
    return "FieldValueInvalid"


def status_object(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


# ---- selectors (pure) ----------------------------------------------------------------------


@dataclass(frozen=True)
class Requirement:
    key: str
    op: str  # "=", "!=", "in", "notin", "exists", "!exists"
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        if self.op == "exists":
            return present
        if self.op == "!exists":
            return not present
        if self.op in ("=", "in"):
            return present and value in self.values
        return not present or value not in self.values  # "!=", "notin"


_LABEL_KEY = re.compile(
    r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$")
_SET_EXPR = re.compile(r"^\s*(\S+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def _split_selector(text: str) -> list[str]:
    """Splits at commas outside parentheses (`a in (x,y),b=c`)."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def parse_label_selector(text: str) -> list[Requirement]:
    """Kubernetes label selector syntax (apimachinery labels.Parse); ApiError 400 if bad."""
    reqs = []
    for part in _split_selector(text):
        m = _SET_EXPR.match(part)
        if m:
            values = frozenset(v.strip() for v in m.group(3).split(",") if v.strip())
            reqs.append(Requirement(m.group(1), m.group(2), values))
        elif "!=" in part:
            k, v = part.split("!=", 1)
            reqs.append(Requirement(k.strip(), "!=", frozenset({v.strip()})))
        elif "==" in part or "=" in part:
            k, v = part.split("==", 1) if "==" in part else part.split("=", 1)
            reqs.append(Requirement(k.strip(), "=", frozenset({v.strip()})))
        elif part.startswith("!"):
            reqs.append(Requirement(part[1:].strip(), "!exists"))
        else:
            reqs.append(Requirement(part, "exists"))
        if not _LABEL_KEY.match(reqs[-1].key):
            raise ApiError(
                400,
                "BadRequest",
                f"unable to parse requirement: invalid label key {reqs[-1].key!r}",
            )
        for v in reqs[-1].values:
            if not _LABEL_VALUE.match(v):
                raise ApiError(
                    400, "BadRequest", f"unable to parse requirement: invalid label value {v!r}"
                )
    return reqs


FIELD_PATHS = {
    "metadata.name": ("metadata", "name"),
    "metadata.namespace": ("metadata", "namespace"),
    "spec.nodeName": ("spec", "nodeName"),
    "status.phase": ("status", "phase"),
}


def parse_field_selector(text: str) -> list[tuple[str, str, str]]:
    out = []
    for part in _split_selector(text):
        op = "!=" if "!=" in part else "="
        k, v = (
            part.split("!=", 1)
            if op == "!="
            else part.replace("==", "=").split("=", 1)
            if "=" in part
            else (part, None)
        )
        if v is None:
            raise ApiError(400, "BadRequest", f"invalid field selector: {part!r}")
        k = k.strip()
        if k not in FIELD_PATHS:
            raise ApiError(400, "BadRequest", f"field label not supported: {k}")
        out.append((k, op, v.strip()))
    return out


@dataclass(frozen=True)
class Selector:
    labels: tuple[Requirement, ...] = ()
    fields: tuple[tuple[str, str, str], ...] = ()

    @classmethod
    def parse(cls, label_selector: str = "", field_selector: str = "") -> Selector:
        return cls(
            tuple(parse_label_selector(label_selector)), tuple(parse_field_selector(field_selector))
        )

    def matches(self, obj: Mapping[str, Any]) -> bool:
        meta = obj.get("metadata") or {}
        labels = meta.get("labels") or {}
        if not all(r.matches(labels) for r in self.labels):
            return False
        for key, op, want in self.fields:
            a, b = FIELD_PATHS[key]
            have = str((obj.get(a) or {}).get(b) or "")
            if (have == want) != (op == "="):
                return False
        return True


# ---- the object store ----------------------------------------------------------------------


@dataclass
class Event:
    rv: int
    resource: Resource
    type: str  # ADDED | MODIFIED | DELETED
    obj: dict[str, Any]
    old: dict[str, Any] | None


@dataclass
class Fault:
    """An injected failure: requests whose method and path (with its query) match get `status` (or wait
    `delay` seconds first, then proceed, when status is 0); `count` times (-1 = always)."""

    method: str
    path_regex: str
    status: int = 500
    delay: float = 0.0
    count: int = 1
    message: str = "injected fault"

    def matches(self, method: str, path: str) -> bool:
        return (self.method in ("*", method)) and re.search(self.path_regex, path) is not None


def served(res: Resource, obj: Mapping[str, Any]) -> dict[str, Any]:
    """A stored object as the API serves it at `res`'s version (custom resources are stored
    once for all versions; with the CRD conversion "None" only the apiVersion changes)."""
    out = copy.deepcopy(dict(obj))
    out["apiVersion"] = res.api_version
    return out


def _encode_continue(rv: int, last_key: str) -> str:
    # apiserver's format: base64url of {"v", "rv", "start"}, start = the next key to read.
    doc = {"v": "meta.k8s.io/v1", "rv": rv, "start": last_key + "\x00"}
    return base64.urlsafe_b64encode(json.dumps(doc).encode()).decode().rstrip("=")


def _decode_continue(token: str) -> tuple[int, str]:
    try:
        doc = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        rv, start = doc["rv"], doc["start"]
        if (
            doc.get("v") != "meta.k8s.io/v1"
            or not isinstance(rv, int)
            or not isinstance(start, str)
        ):
            raise ValueError("unknown format")
    except (ValueError, TypeError, KeyError, UnicodeDecodeError) as e:
        raise ApiError(400, "BadRequest", f"continue key is not valid: {e}") from None
    return rv, start


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ObjectStore:
    """Objects, resource versions and the watch event log; thread-safe."""

    def __init__(
        self, event_log: int = DEFAULT_EVENT_LOG, graceful_pod_deletion: bool = False
    ) -> None:
        self._lock = threading.Condition()
        self._objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self._log: collections.deque[Event] = collections.deque(maxlen=event_log)
        self._rv = 0
        self.graceful_pod_deletion = graceful_pod_deletion
        self.closed = False
        # What is served: the built-ins and what CustomResourceDefinitions define (changed
        # under the lock, as CRDs are written).
        self.registry = Registry()

    # -- helpers
    @staticmethod
    def _key(res: Resource, namespace: str, name: str) -> tuple[str, str, str]:
        return (res.key, namespace if res.namespaced else "", name)

    def find(self, group: str, version: str, plural: str) -> Resource | None:
        """The resource served at that path, None when nothing is (404)."""
        with self._lock:
            return self.registry.find(group, version, plural)

    def resources(self) -> list[Resource]:
        with self._lock:
            return self.registry.all()

    @property
    def resource_version(self) -> int:
        with self._lock:
            return self._rv

    def oldest_watchable(self) -> int:
        """The oldest resourceVersion a watch can start from (older ones get 410 Gone)."""
        with self._lock:
            return self._log[0].rv - 1 if len(self._log) == self._log.maxlen else 0

    def _emit(
        self, res: Resource, type_: str, obj: dict[str, Any], old: dict[str, Any] | None
    ) -> None:
        self._log.append(Event(self._rv, res, type_, copy.deepcopy(obj), old))
        self._lock.notify_all()

    def _bump(self, obj: dict[str, Any]) -> None:
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)

    def _require_namespace(self, res: Resource, namespace: str) -> None:
        if res.namespaced:
            if not namespace:
                raise ApiError(400, "BadRequest", "a namespace is required")
            if ("namespaces", "", namespace) not in self._objects:
                raise ApiError(404, "NotFound", f'namespaces "{namespace}" not found')

    # -- verbs
    def create(self, res: Resource, namespace: str, obj: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(obj, Mapping):
            raise ApiError(400, "BadRequest", "the body must be a JSON object")
        new = copy.deepcopy(dict(obj))
        meta = new.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise ApiError(400, "BadRequest", "metadata must be an object")
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = str(meta["generateName"]) + uuid.uuid4().hex[:5]
        name = meta.get("name")
        if not name:
            raise ApiError.invalid(
                res, name, "metadata.name", "Required value: name or generateName is required"
            )
        if not isinstance(name, str) or not re.match(
            r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$", name
        ):
            raise ApiError.invalid(
                res,
                name,
                "metadata.name",
                f"Invalid value: {json.dumps(name)}: a lowercase RFC 1123 subdomain must consist "
                "of lower case alphanumeric characters, '-' or '.', and must start and end "
                "with an alphanumeric character",
            )
        if res.namespaced:
            if meta.get("namespace") not in (None, "", namespace):
                raise ApiError(
                    400,
                    "BadRequest",
                    "the namespace of the object does not match the namespace of the request",
                )
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        for k in ("labels", "annotations"):
            v = meta.get(k)
            if v is not None and (
                not isinstance(v, dict) or not all(isinstance(x, str) for x in v.values())
            ):
                raise ApiError.invalid(
                    res, name, f"metadata.{k}", "Invalid value: must map strings to strings"
                )
        if res.kind == "Pod":
            containers = (new.get("spec") or {}).get("containers")
            if (
                not isinstance(containers, list)
                or not containers
                or not all(isinstance(c, dict) and c.get("name") for c in containers)
            ):
                raise ApiError(
                    422,
                    "Invalid",
                    "Pod spec.containers: Required value (a list of named containers)",
                )
            new.setdefault("status", {}).setdefault("phase", "Pending")
        if res.kind == "Namespace":
            new.setdefault("status", {})["phase"] = "Active"
        new["kind"], new["apiVersion"] = res.kind, res.api_version
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now()
        meta["generation"] = 1
        for k in ("deletionTimestamp", "resourceVersion"):
            meta.pop(k, None)
        with self._lock:
            self._require_namespace(res, namespace)
            key = self._key(res, namespace, name)
            if key in self._objects:
                raise ApiError.already_exists(res, name)
            defines = self._admit_definition(res, new)
            self._bump(new)
            self._objects[key] = new
            if defines is not None:
                self.registry.define(name, defines)
            self._emit(res, "ADDED", new, None)
            return copy.deepcopy(new)

    def _admit_definition(self, res: Resource, obj: dict[str, Any]) -> list[Resource] | None:
        """For a CustomResourceDefinition: what it will serve (ApiError 422 when the API
        would refuse it) and the status the API server gives it; None for other kinds."""
        if (res.group, res.kind) != (CRD_GROUP, "CustomResourceDefinition"):
            return None
        try:
            defines = resources_from_crd(obj, self.registry.builtin_groups())
        except InvalidDefinition as e:
            field, _, problem = str(e).partition(": ")
            raise ApiError.invalid(res, obj["metadata"].get("name"), field, problem) from None
        obj["status"] = crd_status(obj)
        return defines

    def get(self, res: Resource, namespace: str, name: str) -> dict[str, Any]:
        with self._lock:
            obj = self._objects.get(self._key(res, namespace, name))
            if obj is None:
                raise ApiError.not_found(res, name)
            return served(res, obj)

    def list(
        self, res: Resource, namespace: str = "", selector: Selector = Selector()
    ) -> tuple[list[dict[str, Any]], int]:
        with self._lock:
            items = [
                served(res, o)
                for (key, ns, _), o in sorted(self._objects.items())
                if key == res.key and (not namespace or ns == namespace) and selector.matches(o)
            ]
            return items, self._rv

    def list_page(
        self,
        res: Resource,
        namespace: str,
        selector: Selector,
        limit: int,
        token: str = "",
    ) -> tuple[builtins.list[dict[str, Any]], int, str, int | None]:
        """One page of a paginated list ("limit" and "continue", API concepts/pagination):
        (items, resourceVersion, continue token, remaining item count). Every page is
        served from the state at the first page's resourceVersion, rebuilt from the event
        log; a token older than the log is 410 Expired, as a compacted etcd answers."""
        start = ""
        with self._lock:
            if token:
                rv, start = _decode_continue(token)
                if rv < self.oldest_watchable() or rv > self._rv:
                    raise ApiError(
                        410,
                        "Expired",
                        "The provided continue parameter is too old to display a consistent "
                        "list result. You can start a new list without the continue parameter.",
                    )
                objects = self._objects_at(res, rv)
            else:
                rv = self._rv
                objects = {k: o for k, o in self._objects.items() if k[0] == res.key}
            # Pages follow the storage's key order (etcd: `<namespace>/<name>` as strings).
            matching = sorted(
                (f"{ns}/{name}", o)
                for (_, ns, name), o in objects.items()
                if (not namespace or ns == namespace)
                and f"{ns}/{name}" >= start
                and selector.matches(o)
            )
            page = matching[:limit] if limit > 0 else matching
            items = [served(res, o) for _, o in page]
        rest = len(matching) - len(page)
        if rest <= 0:
            return items, rv, "", None
        remaining = rest if not selector.labels and not selector.fields else None
        return items, rv, _encode_continue(rv, page[-1][0]), remaining

    def _objects_at(self, res: Resource, rv: int) -> dict[tuple[str, str, str], dict[str, Any]]:
        """The objects of one resource as they were at resourceVersion `rv` (the caller
        holds the lock and has checked that the event log reaches back to `rv`)."""
        objects = {k: o for k, o in self._objects.items() if k[0] == res.key}
        for e in reversed(self._log):
            if e.rv <= rv:
                break
            if e.resource.key != res.key:
                continue
            meta = e.obj["metadata"]
            key = self._key(e.resource, meta.get("namespace", ""), meta["name"])
            if e.type == "ADDED":
                objects.pop(key, None)
            elif e.old is not None:
                objects[key] = e.old
        return objects

    def _write(
        self,
        res: Resource,
        namespace: str,
        name: str,
        change: Callable[[dict[str, Any]], dict[str, Any]],
        status_only: bool = False,
    ) -> dict[str, Any]:
        with self._lock:
            key = self._key(res, namespace, name)
            old = self._objects.get(key)
            if old is None:
                raise ApiError.not_found(res, name)
            changed = change(copy.deepcopy(old))
            if not isinstance(changed, dict) or not isinstance(changed.get("metadata"), dict):
                raise ApiError(422, "Invalid", "the result must be an object with metadata")
            want_rv = changed["metadata"].get("resourceVersion")
            if want_rv not in (None, "", old["metadata"]["resourceVersion"]):
                raise ApiError(
                    409,
                    "Conflict",
                    f'Operation cannot be fulfilled on {res.plural} "{name}": the object has been modified; please apply your changes to the latest version and try again',
                )
            for k in ("labels", "annotations"):
                v = changed["metadata"].get(k)
                if v is not None and (
                    not isinstance(v, dict) or not all(isinstance(x, str) for x in v.values())
                ):
                    raise ApiError(422, "Invalid", f"metadata.{k} must map strings to strings")
            if status_only:
                # pods/status and friends change the status and, as the real API's status
                # strategy allows (istio-cni annotates pods this way), labels and annotations;
                # never the spec or anything else of the metadata.
                new = copy.deepcopy(old)
                new["status"] = copy.deepcopy(changed.get("status") or {})
                for k in ("labels", "annotations"):
                    if changed["metadata"].get(k) is None:
                        new["metadata"].pop(k, None)
                    else:
                        new["metadata"][k] = copy.deepcopy(changed["metadata"][k])
            else:
                new = changed
                # Identity and server-owned fields stay as they were.
                for k in (
                    "name",
                    "namespace",
                    "uid",
                    "creationTimestamp",
                    "deletionTimestamp",
                    "deletionGracePeriodSeconds",
                    "generation",
                    "resourceVersion",
                ):
                    if k in old["metadata"]:
                        new["metadata"][k] = old["metadata"][k]
                    else:
                        new["metadata"].pop(k, None)
                new["kind"], new["apiVersion"] = res.kind, res.api_version
                if res.has_status:
                    new["status"] = copy.deepcopy(old.get("status", {}))
            defines = None if status_only else self._admit_definition(res, new)
            old_as_written = dict(old, apiVersion=new.get("apiVersion"))
            if new == old_as_written:
                return served(res, old)  # a no-op write does not bump the version (as the API)
            if new.get("spec") != old.get("spec"):
                new["metadata"]["generation"] = int(old["metadata"].get("generation", 1)) + 1
            self._bump(new)
            self._objects[key] = new
            if defines is not None:
                self.registry.define(name, defines)
            self._emit(res, "MODIFIED", new, copy.deepcopy(old))
            return copy.deepcopy(new)

    def replace(
        self,
        res: Resource,
        namespace: str,
        name: str,
        obj: Mapping[str, Any],
        status_only: bool = False,
    ) -> dict[str, Any]:
        if not isinstance(obj, Mapping) or (obj.get("metadata") or {}).get("name") not in (
            None,
            name,
        ):
            raise ApiError(400, "BadRequest", "the name in the body does not match the URL")
        return self._write(res, namespace, name, lambda _old: copy.deepcopy(dict(obj)), status_only)

    def patch(
        self,
        res: Resource,
        namespace: str,
        name: str,
        patch: Any,
        content_type: str,
        status_only: bool = False,
    ) -> dict[str, Any]:
        if not isinstance(patch, dict):
            raise ApiError(400, "BadRequest", "a patch must be a JSON object")
        if content_type == "application/merge-patch+json":
            fn: Callable[[Any, Any], Any] = merge_patch
        elif content_type == "application/strategic-merge-patch+json" and not res.custom:
            fn = lambda old, p: strategic_merge_patch(old, p, res.kind)  # noqa: E731
        elif content_type == "application/strategic-merge-patch+json":
            # As the API server: custom resources have no Go types to carry merge keys.
            raise ApiError(
                415,
                "UnsupportedMediaType",
                "the body of the request was in an unknown format - accepted media types "
                "include: application/json-patch+json, application/merge-patch+json, "
                "application/apply-patch+yaml (the stand-in: merge-patch+json)",
            )
        else:
            raise ApiError(
                415,
                "UnsupportedMediaType",
                f"the stand-in supports merge-patch+json and strategic-merge-patch+json, not {content_type!r}",
            )

        def change(old: dict[str, Any]) -> Any:
            try:
                return fn(old, patch)
            except PatchError as e:
                raise ApiError(e.code, e.reason, str(e)) from None

        return self._write(res, namespace, name, change, status_only)

    def delete(
        self, res: Resource, namespace: str, name: str, grace_seconds: int | None = None
    ) -> dict[str, Any]:
        with self._lock:
            key = self._key(res, namespace, name)
            obj = self._objects.get(key)
            if obj is None:
                raise ApiError.not_found(res, name)
            graceful = (
                res.kind == "Pod"
                and self.graceful_pod_deletion
                and (obj.get("spec") or {}).get("nodeName")
                and grace_seconds != 0
                and obj.get("status", {}).get("phase") not in ("Succeeded", "Failed")
            )
            if graceful:
                if "deletionTimestamp" in obj["metadata"]:
                    return copy.deepcopy(obj)
                old = copy.deepcopy(obj)
                obj["metadata"]["deletionTimestamp"] = _now()
                obj["metadata"]["deletionGracePeriodSeconds"] = (
                    30 if grace_seconds is None else grace_seconds
                )
                self._bump(obj)
                self._emit(res, "MODIFIED", obj, old)
                return copy.deepcopy(obj)
            removed = [(res, key)]
            # What goes with it: a namespace's objects; a CRD's custom resources (the API
            # server's namespace and CRD finalizers, done at once).
            kinds = {r.key: r for r in self.registry.all() if r.namespaced}
            if res.kind == "Namespace":
                removed += [
                    (kinds[k[0]], k) for k in self._objects if k[0] in kinds and k[1] == name
                ]
            if (res.group, res.kind) == (CRD_GROUP, "CustomResourceDefinition"):
                defined = self.registry.defined(name)
                if defined:
                    removed = [(defined[0], k) for k in self._objects if k[0] == name] + removed
            for r, k in removed:
                gone = self._objects.pop(k)
                old = copy.deepcopy(gone)
                self._bump(gone)
                self._emit(r, "DELETED", gone, old)
            if (res.group, res.kind) == (CRD_GROUP, "CustomResourceDefinition"):
                self.registry.undefine(name)
            return served(res, obj)

    # -- watch
    def events(
        self,
        res: Resource,
        namespace: str,
        selector: Selector,
        since: int,
        stop: Callable[[], bool],
        timeout: float,
    ) -> Iterator[tuple[str, dict[str, Any]] | None]:
        """Yields (type, object) after resourceVersion `since`, None when idle for a while
        (the caller may then send a bookmark or check its connection). ApiError 410 when
        `since` is older than the event log."""
        deadline = time.monotonic() + timeout
        with self._lock:
            if since < self.oldest_watchable():
                raise ApiError(
                    410,
                    "Expired",
                    f"too old resource version: {since} ({self.oldest_watchable() + 1})",
                )
        cursor = since
        while not stop() and not self.closed and time.monotonic() < deadline:
            batch: list[Event] = []
            with self._lock:
                if self._log and self._log[-1].rv <= cursor:
                    self._lock.wait(timeout=min(0.5, max(0.0, deadline - time.monotonic())))
                if (
                    self._log
                    and self._log[0].rv > cursor + 1
                    and len(self._log) == self._log.maxlen
                ):
                    raise ApiError(410, "Expired", f"too old resource version: {cursor}")
                batch = [e for e in self._log if e.rv > cursor]
            if not batch:
                yield None
                continue
            for e in batch:
                cursor = e.rv
                if e.resource.key != res.key or (
                    namespace and e.obj["metadata"].get("namespace") != namespace
                ):
                    continue
                now_in = e.type != "DELETED" and selector.matches(e.obj)
                was_in = e.old is not None and selector.matches(e.old)
                # Shallow copies: the logged object is shared by every watcher.
                obj = dict(e.obj, apiVersion=res.api_version)
                if e.type == "DELETED":
                    if was_in:
                        yield "DELETED", obj
                elif now_in and (was_in or e.type == "ADDED"):
                    yield e.type, obj
                elif now_in:
                    yield "ADDED", obj
                elif was_in:
                    yield "DELETED", obj


# ---- certificates and kubeconfig -----------------------------------------------------------


def make_certificates(hosts: list[str]) -> tuple[bytes, bytes, bytes]:
    """(CA PEM, server certificate PEM, server key PEM) for the listen addresses."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver stand-in CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [
        x509.DNSName("kubernetes.default.svc"),
        x509.DNSName("localhost"),
    ]
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return ca.public_bytes(pem), cert.public_bytes(pem), key_pem


# ---- HTTP ----------------------------------------------------------------------------------


_VERSION = r"v[0-9]+(?:(?:alpha|beta)[0-9]+)?"
_PATH = re.compile(
    rf"^/(?:api/(?P<cv>{_VERSION})|apis/(?P<g>[a-z0-9.-]+)/(?P<gv>{_VERSION}))"
    r"(?:/namespaces/(?P<ns>[^/]+)(?=/))?/(?P<plural>[a-z][-a-z0-9]*)(?:/(?P<name>[^/]+))?"
    r"(?:/(?P<sub>status))?$"
)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HttpServer

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("kubeapi %s: " + format, self.client_address[0], *args)

    # -- plumbing
    def _send_json(self, code: int, obj: Any) -> None:
        self._send_bytes(code, json.dumps(obj).encode(), "application/json")

    def _send_bytes(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, e: ApiError) -> None:
        self._send_json(e.code, e.status())

    def _body(self) -> Any:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise ApiError(400, "BadRequest", "bad Content-Length") from None
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raise ApiError(
                411, "LengthRequired", "chunked request bodies are not supported by this stand-in"
            )
        if length > MAX_BODY:
            self.close_connection = True
            raise ApiError(
                413, "RequestEntityTooLarge", f"request body larger than {MAX_BODY} bytes"
            )
        raw = self.rfile.read(length) if length else b""
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip()
        if raw and ctype.startswith("application/vnd.kubernetes."):  # protobuf, CBOR
            raise ApiError(
                415,
                "UnsupportedMediaType",
                f"the body of the request was in an unknown format - accepted media types "
                f"include: application/json (the stand-in does not speak {ctype})",
            )
        try:
            return json.loads(raw) if raw else None
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, "BadRequest", f"the body is not JSON: {e}") from None

    def _authorized(self) -> bool:
        got = self.headers.get("Authorization", "")
        want = f"Bearer {self.server.api.token}"
        return hmac.compare_digest(got.encode(), want.encode())

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        api = self.server.api
        url = urllib.parse.urlsplit(self.path)
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
        path = url.path.rstrip("/") or "/"
        try:
            if path in ("/healthz", "/livez", "/readyz"):
                self._send_json(200, "ok")
                return
            if not self._authorized():
                self._body_discard()
                raise ApiError(401, "Unauthorized", "Unauthorized")
            api.requests += 1
            api.seen.append(f"{method} {self.path}")
            api.apply_faults(method, self.path)
            if path == "/_standin/faults" and method == "POST":
                body = self._body()
                api.inject(Fault(**body) if isinstance(body, dict) else Fault("*", "x^"))
                self._send_json(200, {"ok": True})
                return
            if method == "GET" and self._discovery(path):
                return
            m = _PATH.match(path)
            if not m:
                self._body_discard()
                raise ApiError(
                    404, "NotFound", f"the server could not find the requested resource ({path})"
                )
            group = m.group("g") or ""
            version = m.group("cv") or m.group("gv")
            res = api.store.find(group, version, m.group("plural"))
            if (
                res is None
                or (m.group("ns") and not res.namespaced)
                or (m.group("sub") and not res.has_status)
            ):
                self._body_discard()
                raise ApiError(
                    404, "NotFound", f"the server could not find the requested resource ({path})"
                )
            ns = urllib.parse.unquote(m.group("ns") or "")
            name = urllib.parse.unquote(m.group("name") or "")
            sub = m.group("sub") == "status"
            if res.kind == "Namespace" and m.group("name") is None and m.group("ns"):
                raise ApiError(404, "NotFound", "bad path")
            self._resource(method, res, ns, name, sub, query)
        except ApiError as e:
            self._error(e)
        except (ConnectionError, ssl.SSLError, TimeoutError):
            self.close_connection = True

    def _body_discard(self) -> None:
        with contextlib.suppress(ApiError):
            self._body()

    def _discovery(self, path: str) -> bool:
        store = self.server.api.store
        with store._lock:
            registry = store.registry
            gvs = registry.group_versions()
            if path == "/version":
                doc: Any = SERVER_VERSION
            elif path == "/api":
                doc = {
                    "kind": "APIVersions",
                    "versions": gvs[""],
                    "serverAddressByClientCIDRs": [
                        {"clientCIDR": "0.0.0.0/0", "serverAddress": self.server.api.address}
                    ],
                }
            elif path == "/apis":
                doc = api_group_list(registry)
            elif path.startswith("/api/") and path.count("/") == 2:
                if path.split("/")[2] not in gvs[""]:
                    raise ApiError(404, "NotFound", f"no version {path}")
                doc = api_resource_list(registry, "", path.split("/")[2])
            elif path.startswith("/apis/") and path.count("/") == 3:
                _, _, g, v = path.split("/")
                if v not in gvs.get(g, ()) or not g:
                    raise ApiError(404, "NotFound", f"no group {g}/{v}")
                doc = api_resource_list(registry, g, v)
            elif path.startswith("/apis/") and path.count("/") == 2:
                g = path.split("/")[2]
                if not g or g not in gvs:
                    raise ApiError(404, "NotFound", f"no group {g}")
                doc = api_group(g, gvs[g])
            elif path == "/openapi/v2" and "protobuf" in (self.headers.get("Accept") or ""):
                doc = None  # answered below, without the lock
            elif path == "/openapi/v2":
                doc = {"swagger": "2.0", "info": OPENAPI_INFO, "paths": {}, "definitions": {}}
            elif path == "/openapi/v3":
                doc = openapi_root(registry)
            elif path.startswith("/openapi/v3/"):
                wanted = path.removeprefix("/openapi/v3/")
                found = [
                    (g, v) for g, vs in gvs.items() for v in vs if openapi_gv_path(g, v) == wanted
                ]
                if not found:
                    raise ApiError(404, "NotFound", f"no OpenAPI document for {wanted}")
                doc = openapi_document(registry, *found[0])
            else:
                return False
        if doc is None:
            # An empty openapi_v2.Document (no schemas, as the v3 documents): what kubectl's
            # client-side validation reads for `kind: List` input, then skips. The empty
            # protobuf message is zero bytes; kube-openapi labels protobuf octet-stream.
            self._send_bytes(200, b"", "application/octet-stream")
        else:
            self._send_json(200, doc)
        return True

    def _resource(
        self, method: str, res: Resource, ns: str, name: str, sub: bool, query: dict[str, str]
    ) -> None:
        store = self.server.api.store
        if sub and not name:
            raise ApiError(404, "NotFound", "status needs an object name")
        if method == "GET" and not name:
            selector = Selector.parse(
                query.get("labelSelector", ""), query.get("fieldSelector", "")
            )
            if query.get("watch") in ("true", "1"):
                self._watch(res, ns, selector, query)
                return
            rv = query.get("resourceVersion", "")
            if (
                rv
                and query.get("resourceVersionMatch") == "Exact"
                and int(rv) < store.oldest_watchable()
            ):
                raise ApiError(410, "Expired", f"too old resource version: {rv}")
            try:
                limit = int(query.get("limit") or 0)
            except ValueError:
                raise ApiError(400, "BadRequest", "limit must be a number") from None
            token = query.get("continue", "")
            if token and rv:
                raise ApiError(
                    400,
                    "BadRequest",
                    "specifying resource version is not allowed when using continue",
                )
            items, current, more, remaining = store.list_page(res, ns, selector, limit, token)
            for it in items:
                it.pop("kind", None)
                it.pop("apiVersion", None)
            meta: dict[str, Any] = {"resourceVersion": str(current)}
            if more:
                meta["continue"] = more
            if remaining is not None:
                meta["remainingItemCount"] = remaining
            self._send_json(
                200,
                {
                    "kind": f"{res.kind}List",
                    "apiVersion": res.api_version,
                    "metadata": meta,
                    "items": items,
                },
            )
        elif method == "GET":
            self._send_json(200, store.get(res, ns, name))
        elif method == "POST" and not name and not sub:
            self._send_json(201, store.create(res, ns, self._body()))
        elif method == "PUT" and name:
            self._send_json(200, store.replace(res, ns, name, self._body(), status_only=sub))
        elif method == "PATCH" and name:
            ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip()
            self._send_json(200, store.patch(res, ns, name, self._body(), ctype, status_only=sub))
        elif method == "DELETE" and name and not sub:
            body = self._body()
            grace = query.get("gracePeriodSeconds")
            if isinstance(body, dict) and body.get("gracePeriodSeconds") is not None:
                grace = body["gracePeriodSeconds"]
            self._send_json(200, store.delete(res, ns, name, None if grace is None else int(grace)))
        else:
            self._body_discard()
            raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on this path")

    def _watch(self, res: Resource, ns: str, selector: Selector, query: dict[str, str]) -> None:
        api = self.server.api
        store = api.store
        try:
            timeout = float(query.get("timeoutSeconds") or DEFAULT_WATCH_TIMEOUT)
            since_text = query.get("resourceVersion", "")
            since = int(since_text) if since_text not in ("", "0") else None
        except ValueError:
            raise ApiError(
                400, "BadRequest", "resourceVersion and timeoutSeconds must be numbers"
            ) from None
        bookmarks = query.get("allowWatchBookmarks") in ("true", "1")
        initial: list[tuple[str, dict[str, Any]]] = []
        if since is None:
            # "Get State and Start at Most Recent": synthetic ADDED events for what exists.
            items, since = store.list(res, ns, selector)
            initial = [("ADDED", o) for o in items]
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.close_connection = True
        last_sent = time.monotonic()
        last_rv = since

        def send(type_: str, obj: dict[str, Any]) -> None:
            line = json.dumps({"type": type_, "object": obj}).encode() + b"\n"
            self.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
            self.wfile.flush()

        try:
            for type_, obj in initial:
                send(type_, obj)
            try:
                for item in store.events(res, ns, selector, since, api.stopping.is_set, timeout):
                    if item is not None:
                        send(*item)
                        last_rv = int(item[1]["metadata"]["resourceVersion"])
                        last_sent = time.monotonic()
                    elif bookmarks and time.monotonic() - last_sent >= api.bookmark_interval:
                        last_rv = max(last_rv, store.resource_version)
                        send(
                            "BOOKMARK",
                            {
                                "kind": res.kind,
                                "apiVersion": res.api_version,
                                "metadata": {"resourceVersion": str(last_rv)},
                            },
                        )
                        last_sent = time.monotonic()
            except ApiError as e:
                send("ERROR", e.status())
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (OSError, ssl.SSLError):
            pass  # the client went away


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, sock: socket.socket, api: KubeApiServer) -> None:
        self.api = api
        super().__init__(sock.getsockname()[:2], _Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.server_address = sock.getsockname()[:2]
        self._active = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._active.acquire(blocking=False):
            with contextlib.suppress(OSError):
                request.close()
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._active.release()

    def finish_request(self, request: Any, client_address: Any) -> None:
        # The TLS handshake happens on the connection's own thread, never in accept().
        request.settimeout(HANDSHAKE_TIMEOUT)
        # Headers and body go out as separate writes: without NODELAY, Nagle plus the
        # client's delayed ACK add ~40 ms to every response.
        request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            tls = self.api.tls.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError):
            return
        tls.settimeout(IDLE_TIMEOUT)
        try:
            _Handler(tls, client_address, self)
        except (OSError, ssl.SSLError):
            pass
        finally:
            with contextlib.suppress(OSError):
                tls.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.exception("kubeapi: error serving %s", client_address)


class KubeApiServer:
    """The stand-in: an ObjectStore served over HTTPS on one or more listening sockets."""

    def __init__(
        self,
        token: str,
        hosts: list[str] | None = None,
        store: ObjectStore | None = None,
        bookmark_interval: float = 5.0,
    ) -> None:
        self.token = token
        self.store = store or ObjectStore()
        self.ca_pem, cert_pem, key_pem = make_certificates(hosts or ["127.0.0.1"])
        self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.tls.minimum_version = ssl.TLSVersion.TLSv1_2
        self.tls.set_alpn_protocols(["http/1.1"])
        self._load_chain(cert_pem, key_pem)
        self.bookmark_interval = bookmark_interval
        self.stopping = threading.Event()
        self.requests = 0
        # The last requests served ("METHOD /path?query"), for tests of what clients send.
        self.seen: collections.deque[str] = collections.deque(maxlen=4096)
        self.address = ""
        self._faults: list[Fault] = []
        self._faults_lock = threading.Lock()
        self._servers: list[_HttpServer] = []
        self._threads: list[threading.Thread] = []

    def _load_chain(self, cert_pem: bytes, key_pem: bytes) -> None:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "c.pem").write_bytes(cert_pem)
            (Path(d) / "k.pem").write_bytes(key_pem)
            self.tls.load_cert_chain(str(Path(d) / "c.pem"), str(Path(d) / "k.pem"))

    @staticmethod
    def listen(host: str, port: int = 0) -> socket.socket:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(64)
        return sock

    def serve(self, sock: socket.socket) -> str:
        """Serves on a listening socket (which may belong to another network namespace);
        returns its https:// URL."""
        server = _HttpServer(sock, self)
        host, port = sock.getsockname()[:2]
        url = f"https://{host}:{port}" if ":" not in host else f"https://[{host}]:{port}"
        self.address = self.address or f"{host}:{port}"
        t = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name=f"kubeapi {url}",
            daemon=True,
        )
        t.start()
        self._servers.append(server)
        self._threads.append(t)
        return url

    def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        return self.serve(self.listen(host, port))

    def stop(self) -> None:
        self.stopping.set()
        self.store.closed = True
        with self.store._lock:
            self.store._lock.notify_all()
        for s in self._servers:
            s.shutdown()
            s.server_close()
        for t in self._threads:
            t.join(timeout=5)

    # -- faults
    def inject(self, fault: Fault) -> None:
        with self._faults_lock:
            self._faults.append(fault)

    def clear_faults(self) -> None:
        with self._faults_lock:
            self._faults.clear()

    def apply_faults(self, method: str, path: str) -> None:
        with self._faults_lock:
            hit = next((f for f in self._faults if f.count != 0 and f.matches(method, path)), None)
            if hit is not None and hit.count > 0:
                hit.count -= 1
        if hit is None:
            return
        if hit.delay:
            self.stopping.wait(hit.delay)
        if hit.status:
            raise ApiError(
                hit.status, "InternalError" if hit.status >= 500 else "BadRequest", hit.message
            )

    def kubeconfig(self, url: str, token: str | None = None) -> dict[str, Any]:
        from cni.install import kubeconfig_document

        return kubeconfig_document(url, self.ca_pem, token or self.token)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m ztunnel.lab.kubeapi",
        description="Kubernetes API server STAND-IN for tests and the lab (not Kubernetes).",
    )
    p.add_argument("--listen", default="127.0.0.1:6443", help="HOST:PORT (port 0 = any)")
    p.add_argument("--token", required=True, help="the bearer token clients must send")
    p.add_argument("--dir", required=True, help="where to write ca.pem and kubeconfig")
    p.add_argument("--bookmark-interval", type=float, default=5.0)
    p.add_argument(
        "--event-log", type=int, default=DEFAULT_EVENT_LOG, help="watch events kept for resuming"
    )
    args = p.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    host = host.strip("[]")
    api = KubeApiServer(args.token, [host], ObjectStore(args.event_log), args.bookmark_interval)
    url = api.start(host, int(port))
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    (d / "ca.pem").write_bytes(api.ca_pem)
    (d / "kubeconfig").write_text(json.dumps(api.kubeconfig(url), indent=2))
    print(json.dumps({"url": url, "kubeconfig": str(d / "kubeconfig")}), flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    while not done.wait(1.0):
        pass
    api.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "BY_PATH",
    "RESOURCES",
    "VERBS",
    "ApiError",
    "Fault",
    "KubeApiServer",
    "ObjectStore",
    "Resource",
    "Selector",
    "merge_patch",
    "strategic_merge_patch",
]
