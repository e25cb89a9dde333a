"""The Kubernetes API stand-in's patch formats, pure: RFC 7386 JSON merge patch, and strategic
merge patch with the directives `kubectl apply/edit/patch` send (`$patch`, `$retainKeys`,
`$setElementOrder/`, `$deleteFromPrimitiveList/`) and the merge keys of the built-in kinds
the stand-in serves (a table of the API types' `patchMergeKey` tags; other lists replace)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any


class PatchError(ValueError):
    """A patch the server refuses: the HTTP status and Status reason to answer with."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: objects merge, null deletes, everything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


# ---- merge keys (k8s.io/api types' `patchStrategy:"merge" patchMergeKey:"..."` tags) ------

_CONTAINER_LISTS = ("containers", "initContainers", "ephemeralContainers")
# Relative to a PodSpec.
_POD_SPEC_KEYS: dict[tuple[str, ...], str] = {
    ("volumes",): "name",
    ("imagePullSecrets",): "name",
    ("hostAliases",): "ip",
    ("topologySpreadConstraints",): "topologyKey",
    ("schedulingGates",): "name",
    ("resourceClaims",): "name",
}
for _c in _CONTAINER_LISTS:
    _POD_SPEC_KEYS[(_c,)] = "name"
    _POD_SPEC_KEYS[(_c, "ports")] = "containerPort"
    _POD_SPEC_KEYS[(_c, "env")] = "name"
    _POD_SPEC_KEYS[(_c, "volumeMounts")] = "mountPath"
    _POD_SPEC_KEYS[(_c, "volumeDevices")] = "devicePath"
# Where each kind keeps its PodSpec.
_POD_SPEC_AT: dict[str, tuple[str, ...]] = {
    "Pod": ("spec",),
    "DaemonSet": ("spec", "template", "spec"),
    "Deployment": ("spec", "template", "spec"),
    "StatefulSet": ("spec", "template", "spec"),
    "ReplicaSet": ("spec", "template", "spec"),
}
_OBJECT_META_KEYS: dict[tuple[str, ...], str] = {("ownerReferences",): "uid"}
_KIND_KEYS: dict[str, dict[tuple[str, ...], str]] = {
    "Service": {("spec", "ports"): "port"},
    "Pod": {("status", "conditions"): "type", ("status", "podIPs"): "ip"},
    "Node": {
        ("status", "conditions"): "type",
        ("status", "addresses"): "type",
        ("spec", "podCIDRs"): "",
    },
    "Namespace": {("status", "conditions"): "type"},
    "DaemonSet": {("status", "conditions"): "type"},
}
# Lists of strings merged as sets (`patchStrategy:"merge"` without a key).
_SET_LISTS = {("metadata", "finalizers"), ("spec", "finalizers")}
SET = ""  # the merge "key" of a list merged as a set of primitives


def merge_key(kind: str, path: tuple[str, ...]) -> str | None:
    """How the list at `path` (field names, list positions left out) merges: by this key,
    as a set of primitives (SET), or None: the patch replaces it."""
    if path in _SET_LISTS:
        return SET
    if path[:1] == ("metadata",) and path[1:] in _OBJECT_META_KEYS:
        return _OBJECT_META_KEYS[path[1:]]
    spec_at = _POD_SPEC_AT.get(kind)
    if spec_at and path[: len(spec_at)] == spec_at and path[len(spec_at) :] in _POD_SPEC_KEYS:
        return _POD_SPEC_KEYS[path[len(spec_at) :]]
    if spec_at and len(spec_at) > 1:
        template_meta = (*spec_at[:-1], "metadata")
        if path[: len(template_meta)] == template_meta and path[len(template_meta) :] == (
            "finalizers",
        ):
            return SET
    return _KIND_KEYS.get(kind, {}).get(path)


# ---- strategic merge patch -------------------------------------------------------------------

_ORDER = "$setElementOrder/"
_DELETE_FROM = "$deleteFromPrimitiveList/"


def strategic_merge_patch(target: Any, patch: Any, kind: str = "") -> Any:
    """Applies a strategic merge patch to an object of `kind` (the semantics of Kubernetes'
    contributors/devel/sig-api-machinery/strategic-merge-patch.md). PatchError for a
    directive this stand-in does not know (415) or a malformed patch (400/422)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    return _merge_map(target if isinstance(target, dict) else {}, patch, kind, ())


def _directive_error(path: tuple[str, ...], what: str) -> PatchError:
    where = ".".join(path) or "<root>"
    return PatchError(
        415,
        "UnsupportedMediaType",
        f"strategic merge directive {what} at {where} is not supported by this stand-in",
    )


def _strip(value: Any) -> Any:
    """A patch value with its directives removed (what lands in the object when there is
    nothing to merge with)."""
    if isinstance(value, dict):
        return {
            k: _strip(v)
            for k, v in value.items()
            if not k.startswith("$") and v is not None  # null means "absent" here too
        }
    if isinstance(value, list):
        return [
            _strip(v) for v in value if not (isinstance(v, dict) and v.get("$patch") == "replace")
        ]
    return copy.deepcopy(value)


def _merge_map(
    target: Mapping[str, Any], patch: Mapping[str, Any], kind: str, path: tuple[str, ...]
) -> Any:
    directive = patch.get("$patch")
    if directive == "delete":
        return None
    if directive == "replace":
        return _strip(patch)
    if directive not in (None, "merge"):
        raise _directive_error(path, f"$patch: {directive}")
    orders: dict[str, Any] = {}
    deletes: dict[str, Any] = {}
    retain: list[Any] | None = None
    out = dict(target)
    for k, v in patch.items():
        if k == "$patch":
            continue
        if k == "$retainKeys":
            if not isinstance(v, list):
                raise PatchError(400, "BadRequest", "$retainKeys must be a list of field names")
            retain = v
        elif k.startswith(_ORDER):
            orders[k[len(_ORDER) :]] = v
        elif k.startswith(_DELETE_FROM):
            deletes[k[len(_DELETE_FROM) :]] = v
        elif k.startswith("$"):
            raise _directive_error(path, k)
        elif v is None:
            out.pop(k, None)
        else:
            merged = _merge_value(out.get(k), v, kind, (*path, k))
            if merged is None:
                out.pop(k, None)
            else:
                out[k] = merged
    for field, values in deletes.items():
        if not isinstance(values, list):
            raise PatchError(400, "BadRequest", f"{_DELETE_FROM}{field} must be a list")
        current = out.get(field)
        if isinstance(current, list):
            out[field] = [x for x in current if x not in values]
    for field, order in orders.items():
        if not isinstance(order, list):
            raise PatchError(400, "BadRequest", f"{_ORDER}{field} must be a list")
        current = out.get(field)
        if isinstance(current, list):
            key = merge_key(kind, (*path, field))
            out[field] = _ordered(current, order, key, target.get(field))
    if retain is not None:
        out = {k: v for k, v in out.items() if k in retain}
    return out


def _merge_value(current: Any, patch: Any, kind: str, path: tuple[str, ...]) -> Any:
    if isinstance(patch, dict):
        return _merge_map(current if isinstance(current, dict) else {}, patch, kind, path)
    if isinstance(patch, list):
        key = merge_key(kind, path)
        if key is None or not isinstance(current, list):
            return _strip(patch)
        if key == SET:
            return _merge_set(current, patch, path)
        return _merge_list(current, patch, key, kind, path)
    return copy.deepcopy(patch)


def _merge_set(current: list[Any], patch: list[Any], path: tuple[str, ...]) -> list[Any]:
    if any(isinstance(x, dict) for x in patch):
        if {"$patch": "replace"} in patch:
            return [x for x in patch if not isinstance(x, dict)]
        raise PatchError(400, "BadRequest", f"{'.'.join(path)}: a list of strings is expected")
    out = list(current)
    for x in patch:
        if x not in out:
            out.append(x)
    return out


def _merge_list(
    current: list[Any], patch: list[Any], key: str, kind: str, path: tuple[str, ...]
) -> list[Any]:
    if any(isinstance(x, dict) and x.get("$patch") == "replace" for x in patch):
        return _strip(patch)  # type: ignore[no-any-return]
    out = [copy.deepcopy(x) for x in current]
    for item in patch:
        if not isinstance(item, dict):
            raise PatchError(400, "BadRequest", f"{'.'.join(path)}: a list of objects is expected")
        if key not in item:
            raise PatchError(
                422,
                "Invalid",
                f"{'.'.join(path)}: an element does not contain the merge key {key!r}",
            )
        at = [i for i, x in enumerate(out) if isinstance(x, dict) and x.get(key) == item[key]]
        if item.get("$patch") == "delete":
            out = [x for i, x in enumerate(out) if i not in at]
        elif at:
            out[at[0]] = _merge_map(out[at[0]], item, kind, path)
        else:
            out.append(_merge_map({}, item, kind, path))
    return out


def _ordered(merged: list[Any], order: list[Any], key: str | None, server: Any) -> list[Any]:
    """`$setElementOrder`: the elements named in the directive in its order; those only the
    server had keep their place relative to their old neighbours (apimachinery's
    normalizeElementOrder: a server-only element goes before the first ordered element
    that came after it on the server)."""

    def ident(x: Any) -> Any:
        if key and isinstance(x, dict):
            return ("k", repr(x.get(key)))
        return ("v", repr(x))

    rank = {ident(x): i for i, x in enumerate(order)}
    server_rank = {ident(x): i for i, x in enumerate(server if isinstance(server, list) else [])}
    named = sorted((x for x in merged if ident(x) in rank), key=lambda x: rank[ident(x)])
    server_only = [x for x in merged if ident(x) not in rank]
    out: list[Any] = []
    i = 0
    for extra in server_only:
        mine = server_rank.get(ident(extra), len(server_rank))
        while i < len(named) and server_rank.get(ident(named[i]), -1) <= mine:
            out.append(named[i])
            i += 1
        out.append(extra)
    out.extend(named[i:])
    return out
