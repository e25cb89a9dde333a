"""What every configuration resource carries (kind, namespace/name, labels, where it was
written), the errors and warnings that name a resource and a field, and `Fields`, the reader
that every kind's parser uses to take values apart with those errors."""

from __future__ import annotations

import datetime
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ztunnel.errors import ConfigError
from ztunnel.meshconfig.source import SourceDocument

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a resource was written: file, 1-based line of the document, document index."""

    file: str
    line: int
    index: int = 0

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True, slots=True)
class ResourceMeta:
    """The identity of a resource and what analysis needs about it."""

    kind: str
    api_version: str
    name: str
    namespace: str
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    created: float | None = None
    origin: Origin = Origin("<memory>", 0)
    order: int = 0  # position among all loaded documents

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.kind, self.namespace, self.name)

    @property
    def label(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}" if self.namespace else self.kind

    @property
    def sort_key(self) -> tuple[int, float, int, str, str]:
        """Istio's order for competing resources: oldest creationTimestamp first; resources
        without one (local files) after, in the order they were written; then by name."""
        if self.created is not None:
            return (0, self.created, 0, self.namespace, self.name)
        return (1, 0.0, self.order, self.namespace, self.name)


class ResourceError(ConfigError):
    """A bad field of a resource: `file:line: Kind ns/name: field.path: reason`."""

    def __init__(self, meta: ResourceMeta | None, file: str, line: int, path: str, reason: str):
        self.meta = meta
        self.file = file
        self.line = line
        self.field_path = path
        label = meta.label if meta is not None else ""
        where = f"{label}: {path}" if label and path else (label or path)
        super().__init__(f"{file}:{line}" if line else file, where, reason)


@dataclass(frozen=True, slots=True)
class ConfigWarning:
    """Something accepted but not (fully) honoured, or ignored, with where it is."""

    file: str
    line: int
    resource: str  # the resource's label ("" for file-level warnings)
    path: str
    message: str
    code: str = ""  # a short stable name for tooling (e.g. "unsupported-field")

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        parts = [where, *(p for p in (self.resource, self.path) if p), self.message]
        return ": ".join(parts)


@dataclass(frozen=True, slots=True)
class Decision:
    """One choice or finding of compilation, as data for tools (`ztunnel analyze`).

    `code` is stable: vs-selected, vs-conflict, vs-not-applicable, rule-unreachable,
    match-ineffective, host-not-found, subset-not-found, port-required, delegate-not-found,
    delegate-not-exported, delegate-conflict, dr-selected, dr-merged, dr-duplicate-subset,
    dr-shadowed, route-mixed-kinds, backend-not-permitted, parent-not-found,
    source-labels-at-waypoint, policy-target-not-found.
    """

    code: str
    resource: str  # label of the resource concerned ("Kind ns/name")
    path: str
    message: str
    file: str = ""
    line: int = 0
    related: tuple[str, ...] = ()

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}: " if self.file else ""
        return f"{where}{self.resource}: {self.path}: {self.message} [{self.code}]"


class Fields:
    """Reads the fields of one document; every failure names the resource, path and line."""

    def __init__(
        self, doc: SourceDocument, warnings: list[ConfigWarning], meta: ResourceMeta | None = None
    ) -> None:
        self.doc = doc
        self.meta = meta
        self.warnings = warnings

    def fail(self, path: str, reason: str) -> ResourceError:
        return ResourceError(self.meta, self.doc.file, self.doc.line_of(path), path, reason)

    def warn(self, path: str, message: str, code: str = "") -> None:
        self.warnings.append(
            ConfigWarning(
                self.doc.file,
                self.doc.line_of(path),
                self.meta.label if self.meta else "",
                path,
                message,
                code,
            )
        )

    # ---- shapes ----

    def mapping(self, value: Any, path: str, required: bool = False) -> Mapping[str, Any]:
        if value is None:
            if required:
                raise self.fail(path, "is required")
            return {}
        if not isinstance(value, Mapping):
            raise self.fail(path, f"expected a mapping, got {_type(value)}")
        return value

    def seq(self, value: Any, path: str) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.fail(path, f"expected a list, got {_type(value)}")
        return value

    def check_keys(
        self,
        obj: Mapping[str, Any],
        path: str,
        known: Iterable[str],
        unsupported: Iterable[str] = (),
    ) -> None:
        """Unknown keys are errors (a misspelt field would otherwise be silently ignored);
        known but unsupported keys are warnings."""
        allowed = set(known)
        ignored = set(unsupported)
        for k in obj:
            sub = f"{path}.{k}" if path else str(k)
            if k in ignored:
                self.warn(sub, "not supported by this implementation; ignored", "unsupported-field")
            elif k not in allowed:
                raise self.fail(sub, f"unknown field (known: {', '.join(sorted(allowed))})")

    # ---- scalars ----

    def string(self, value: Any, path: str, *, required: bool = True, empty: bool = False) -> str:
        if value is None:
            if required:
                raise self.fail(path, "is required")
            return ""
        if not isinstance(value, str):
            raise self.fail(path, f"expected a string, got {_type(value)}")
        if not value and not empty and required:
            raise self.fail(path, "must not be empty")
        return value

    def strings(self, value: Any, path: str) -> tuple[str, ...]:
        return tuple(self.string(v, f"{path}[{i}]") for i, v in enumerate(self.seq(value, path)))

    def string_map(self, value: Any, path: str) -> dict[str, str]:
        out: dict[str, str] = {}
        for k, v in self.mapping(value, path).items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise self.fail(
                    f"{path}.{k}", "keys and values must be strings (quote numbers and booleans)"
                )
            out[k] = v
        return out

    def integer(self, value: Any, path: str, lo: int | None = None, hi: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, str) and value.strip().lstrip("-").isdigit():
                value = int(value)
            else:
                raise self.fail(path, f"expected an integer, got {_type(value)}")
        if lo is not None and value < lo:
            raise self.fail(path, f"must be >= {lo}, got {value}")
        if hi is not None and value > hi:
            raise self.fail(path, f"must be <= {hi}, got {value}")
        return int(value)

    def opt_integer(
        self, value: Any, path: str, lo: int | None = None, hi: int | None = None
    ) -> int | None:
        return None if value is None else self.integer(value, path, lo, hi)

    def number(
        self, value: Any, path: str, lo: float | None = None, hi: float | None = None
    ) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(path, f"expected a number, got {_type(value)}")
        v = float(value)
        if math.isnan(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
            raise self.fail(path, f"must be in [{lo}, {hi}], got {value}")
        return v

    def boolean(self, value: Any, path: str, default: bool = False) -> bool:
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.fail(path, f"expected true or false, got {_type(value)}")
        return value

    def port(self, value: Any, path: str) -> int:
        return self.integer(value, path, 1, 65535)

    def duration(self, value: Any, path: str, minimum: float = 0.0) -> float:
        """A Go/protobuf duration (`1.5s`, `250ms`, `1m30s`, `1h`) in seconds."""
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise self.fail(path, f"expected a duration like '1.5s' or '250ms', got {_type(value)}")
        if isinstance(value, int | float):
            raise self.fail(path, f"a duration needs a unit, e.g. '{value}s'")
        text = value.strip()
        pos = 0
        total = 0.0
        for m in _DURATION_PART.finditer(text):
            if m.start() != pos:
                break
            total += float(m.group(1)) * _UNITS[m.group(2)]
            pos = m.end()
        if not text or pos != len(text):
            raise self.fail(path, f"not a duration: {value!r} (use e.g. '1.5s', '250ms', '1m30s')")
        if total < minimum:
            raise self.fail(path, f"duration must be at least {minimum * 1000:g}ms, got {value!r}")
        return total

    def opt_duration(self, value: Any, path: str, minimum: float = 0.0) -> float | None:
        return None if value is None else self.duration(value, path, minimum)

    def percentage(self, value: Any, path: str) -> float:
        """Istio's `Percent {value: 0..100}`."""
        obj = self.mapping(value, path, required=True)
        self.check_keys(obj, path, ("value",))
        return self.number(obj.get("value", 0.0), f"{path}.value", 0.0, 100.0)

    def export_to(self, value: Any, path: str) -> tuple[str, ...]:
        out = self.strings(value, path)
        for i, ns in enumerate(out):
            if ns not in (".", "*", "~") and not _DNS_LABEL.match(ns):
                raise self.fail(f"{path}[{i}]", f"not '.', '*' or a namespace name: {ns!r}")
        return out


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def parse_timestamp(value: Any) -> float:
    """An RFC 3339 timestamp (YAML may already have made it a datetime) in seconds; ValueError
    when it is not one."""
    if isinstance(value, datetime.datetime):
        when = value
    elif isinstance(value, str):
        when = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    else:
        raise ValueError("expected an RFC 3339 timestamp")
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp()


def created_at(fields: Fields, value: Any, path: str) -> float | None:
    """metadata.creationTimestamp in seconds."""
    if value is None:
        return None
    try:
        return parse_timestamp(value)
    except ValueError:
        raise fields.fail(path, f"not an RFC 3339 timestamp: {value!r}") from None


def read_meta(
    fields: Fields,
    kind: str,
    api_version: str,
    order: int,
    namespaced: bool = True,
    default_namespace: str = "default",
) -> ResourceMeta:
    """`metadata` of a Kubernetes-style document (name, namespace default `default_namespace`,
    as `kubectl apply -n` would set it; labels, annotations, creationTimestamp); the other
    metadata fields are ignored."""
    obj = fields.doc.obj
    meta = fields.mapping(obj.get("metadata"), "metadata", required=True)
    name = fields.string(meta.get("name"), "metadata.name")
    if len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
        raise fields.fail("metadata.name", f"not a valid Kubernetes name: {name!r}")
    namespace = ""
    if namespaced:
        namespace = fields.string(meta.get("namespace") or default_namespace, "metadata.namespace")
        if len(namespace) > 63 or not _DNS_LABEL.match(namespace):
            raise fields.fail("metadata.namespace", f"not a valid namespace: {namespace!r}")
    annotations = {
        str(k): str(v)
        for k, v in fields.mapping(meta.get("annotations"), "metadata.annotations").items()
    }
    return ResourceMeta(
        kind=kind,
        api_version=api_version,
        name=name,
        namespace=namespace,
        labels=fields.string_map(meta.get("labels"), "metadata.labels"),
        annotations=annotations,
        created=created_at(fields, meta.get("creationTimestamp"), "metadata.creationTimestamp"),
        origin=Origin(fields.doc.file, fields.doc.line, fields.doc.index),
        order=order,
    )
