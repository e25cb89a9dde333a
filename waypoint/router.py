"""Request routing without I/O: which compiled route entry a request takes (first match),
which weighted destination, and the request/response rewrites Istio applies on the way
(headers set/add/remove, URI and authority rewrites, redirects, CORS, mirror authority)."""

from __future__ import annotations

import random
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field

from waypoint.http.messages import HeaderList, RequestHead, header, header_all, remove_header
from ztunnel.meshconfig.compile import (
    RequestMatch,
    RouteEntry,
    ServiceRoutes,
    WeightedCluster,
)
from ztunnel.meshconfig.hosts import strip_port
from ztunnel.meshconfig.match import MatchKind
from ztunnel.meshconfig.networking import CorsPolicy, HeaderOperations


@dataclass(frozen=True)
class RequestContext:
    """What matching sees besides the request: the port it came to, and its source."""

    port: int
    source_labels: Mapping[str, str] = field(default_factory=dict)
    source_namespace: str = ""


def _query(head: RequestHead) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in urllib.parse.parse_qsl(head.query, keep_blank_values=True):
        out.setdefault(k, v)
    return out


def matches(m: RequestMatch, head: RequestHead, ctx: RequestContext) -> bool:
    if m.port is not None and m.port != ctx.port:
        return False
    if m.uri is not None and not m.uri.matches(head.path_only):
        return False
    if m.method is not None and not m.method.matches(head.method):
        return False
    if m.authority is not None and not m.authority.matches(head.authority):
        return False
    if m.scheme is not None and not m.scheme.matches(head.scheme):
        return False
    for name, sm in m.headers:
        value = head.get(name)
        if not sm.matches(value):
            return False
    for name, sm in m.without_headers:
        if sm.matches(head.get(name)):
            return False
    if m.query:
        q = _query(head)
        for name, sm in m.query:
            if not sm.matches(q.get(name)):
                return False
    if m.source_namespace and m.source_namespace != ctx.source_namespace:
        return False
    return all(ctx.source_labels.get(k) == v for k, v in m.source_labels)


def select(routes: ServiceRoutes, head: RequestHead, ctx: RequestContext) -> RouteEntry | None:
    """The first entry whose match takes the request (None: 404, no route)."""
    for entry in routes.entries:
        if entry.match is None or matches(entry.match, head, ctx):
            return entry
    return None


def pick_weighted(
    clusters: tuple[WeightedCluster, ...], rng: random.Random
) -> WeightedCluster | None:
    total = sum(c.weight for c in clusters)
    if total <= 0:
        return None
    x = rng.uniform(0, total)
    for c in clusters:
        if c.weight <= 0:
            continue
        x -= c.weight
        if x < 0:
            return c
    return next(c for c in reversed(clusters) if c.weight > 0)


def apply_header_ops(headers: HeaderList, ops: HeaderOperations) -> None:
    """Istio's order: set replaces, add appends, remove deletes."""
    for name, value in ops.set:
        remove_header(headers, name)
        headers.append((name, value))
    for name, value in ops.add:
        headers.append((name, value))
    for name in ops.remove:
        remove_header(headers, name)


def apply_request_ops(head: RequestHead, ops: HeaderOperations) -> None:
    """Header ops on a request; `host`/`:authority` changes the authority."""
    for name, value in ops.set:
        if name in ("host", ":authority"):
            head.authority = value
    plain = HeaderOperations(
        tuple((k, v) for k, v in ops.set if k not in ("host", ":authority")),
        ops.add,
        ops.remove,
    )
    apply_header_ops(head.headers, plain)


def rewrite(head: RequestHead, entry: RouteEntry) -> None:
    """`rewrite.uri` replaces the matched prefix (the whole path for exact matches) as
    Envoy's prefix_rewrite does; `uriRegexRewrite` substitutes; `authority` replaces Host."""
    rw = entry.route.rewrite
    if rw is None:
        return
    path, query = head.path_only, head.query
    m = entry.match.uri if entry.match is not None else None
    if rw.full_path is not None:
        path = rw.full_path
    elif rw.prefix_path is not None:
        if m is not None and m.kind in (MatchKind.PREFIX, MatchKind.SEGMENT_PREFIX):
            rest = path[len(m.value) :] if len(path) >= len(m.value) else ""
            if m.kind is MatchKind.SEGMENT_PREFIX and m.value == "/":
                rest = path[1:]
            new = rw.prefix_path
            if m.kind is MatchKind.SEGMENT_PREFIX and new.endswith("/") and rest.startswith("/"):
                rest = rest[1:]
            path = (new + rest) or "/"
        elif m is not None and m.kind is MatchKind.EXACT:
            path = rw.prefix_path or "/"
        else:
            path = (
                rw.prefix_path + path.lstrip("/")
                if rw.prefix_path.endswith("/")
                else rw.prefix_path
            )
    elif rw.regex is not None:
        pattern, sub = rw.regex
        path = pattern.sub(_re_sub(sub), path)  # type: ignore[attr-defined]
    if rw.authority:
        head.authority = rw.authority
    head.path = path + (f"?{query}" if query else "")


def _re_sub(sub: str) -> str:
    """RE2/Envoy substitutions write `\\1`; Python's re accepts the same."""
    return sub


def redirect_location(head: RequestHead, entry: RouteEntry, port: int) -> tuple[int, str]:
    r = entry.route.redirect
    assert r is not None
    scheme = r.scheme or head.scheme or "http"
    host = r.host or strip_port(head.authority)
    out_port: int | None = None
    if r.port is not None:
        out_port = r.port
    elif r.derive_port == "FROM_REQUEST_PORT":
        out_port = port
    elif r.derive_port != "FROM_PROTOCOL_DEFAULT" and ":" in head.authority and not r.host:
        tail = head.authority.rsplit(":", 1)[1]
        out_port = int(tail) if tail.isdigit() else None
    default = 443 if scheme == "https" else 80
    authority = host if out_port in (None, default) else f"{host}:{out_port}"
    path = head.path_only
    m = entry.match.uri if entry.match is not None else None
    if r.full_path is not None:
        path = r.full_path
    elif r.prefix_path is not None and m is not None and m.kind is not MatchKind.REGEX:
        path = (r.prefix_path + path[len(m.value) :]) or "/"
    query = head.query
    if "?" in path:
        path, _, query = path.partition("?")
    return r.code, f"{scheme}://{authority}{path}" + (f"?{query}" if query else "")


def shadow_authority(authority: str) -> str:
    """Envoy's mirror authority: `-shadow` appended to the host, before any port."""
    host, sep, port = authority.rpartition(":")
    if sep and port.isdigit() and "]" not in port:
        return f"{host}-shadow:{port}"
    return f"{authority}-shadow"


# ---- CORS (Envoy's CORS filter semantics) ---------------------------------------------------


def cors_origin_allowed(policy: CorsPolicy, origin: str) -> bool:
    return any(m.matches(origin) for m in policy.allow_origins)


def cors_preflight(policy: CorsPolicy, head: RequestHead) -> HeaderList | None:
    """For an allowed preflight: the response headers; None when not a preflight or the
    origin is not allowed (the caller forwards or ignores per `unmatchedPreflights`)."""
    origin = head.get("origin")
    if (
        head.method != "OPTIONS"
        or origin is None
        or head.get("access-control-request-method") is None
    ):
        return None
    if not cors_origin_allowed(policy, origin):
        return None
    out: HeaderList = [("access-control-allow-origin", origin)]
    if policy.allow_methods:
        out.append(("access-control-allow-methods", ",".join(policy.allow_methods)))
    if policy.allow_headers:
        out.append(("access-control-allow-headers", ",".join(policy.allow_headers)))
    if policy.max_age is not None:
        out.append(("access-control-max-age", str(int(policy.max_age))))
    if policy.allow_credentials:
        out.append(("access-control-allow-credentials", "true"))
    return out


def is_preflight(head: RequestHead) -> bool:
    return (
        head.method == "OPTIONS"
        and head.get("origin") is not None
        and head.get("access-control-request-method") is not None
    )


def cors_response_headers(policy: CorsPolicy, head: RequestHead) -> HeaderList:
    origin = head.get("origin")
    if origin is None or not cors_origin_allowed(policy, origin):
        return []
    out: HeaderList = [("access-control-allow-origin", origin)]
    if policy.expose_headers:
        out.append(("access-control-expose-headers", ",".join(policy.expose_headers)))
    if policy.allow_credentials:
        out.append(("access-control-allow-credentials", "true"))
    return out


def cookie(headers: HeaderList, name: str) -> str | None:
    for value in header_all(headers, "cookie"):
        for part in value.split(";"):
            k, sep, v = part.strip().partition("=")
            if sep and k == name:
                return v
    return None


__all__ = ["header"]
