"""Istio `networking.istio.io` VirtualService and DestinationRule (v1, v1beta1 and v1alpha3
share one schema) as frozen records, with Istio's validation
(istio/istio pkg/config/validation). Hosts are kept as written; `compile` resolves them."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ztunnel.meshconfig.match import StringMatch, read_string_match
from ztunnel.meshconfig.resource import Fields, ResourceMeta

NETWORKING_API_VERSIONS = (
    "networking.istio.io/v1",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1alpha3",
)

# Envoy retry policies Istio accepts in `retryOn` (plus HTTP status codes as numbers).
RETRY_ON = frozenset(
    {
        "5xx",
        "gateway-error",
        "reset",
        "reset-before-request",
        "connect-failure",
        "envoy-ratelimited",
        "retriable-4xx",
        "refused-stream",
        "retriable-status-codes",
        "retriable-headers",
        "http3-post-connect-failure",
        "cancelled",
        "deadline-exceeded",
        "internal",
        "resource-exhausted",
        "unavailable",
    }
)
# MeshConfig's default HTTP retry policy (istio/istio pkg/config/mesh: DefaultMeshConfig).
DEFAULT_RETRY_ON = (
    "connect-failure",
    "refused-stream",
    "unavailable",
    "cancelled",
    "retriable-status-codes",
)
DEFAULT_RETRY_ATTEMPTS = 2
DEFAULT_RETRIABLE_CODES = (503,)

GRPC_STATUS = {
    "OK": 0,
    "CANCELLED": 1,
    "UNKNOWN": 2,
    "INVALID_ARGUMENT": 3,
    "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5,
    "ALREADY_EXISTS": 6,
    "PERMISSION_DENIED": 7,
    "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9,
    "ABORTED": 10,
    "OUT_OF_RANGE": 11,
    "UNIMPLEMENTED": 12,
    "INTERNAL": 13,
    "UNAVAILABLE": 14,
    "DATA_LOSS": 15,
    "UNAUTHENTICATED": 16,
}

_HEADER_NAME = re.compile(r"^:?[!#$%&'*+\-.^_`|~0-9a-zA-Z]+$")


# ---- VirtualService --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Destination:
    host: str  # as written (resolve with the resource's namespace)
    subset: str = ""
    port: int | None = None


@dataclass(frozen=True, slots=True)
class HeaderOperations:
    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.set or self.add or self.remove)


@dataclass(frozen=True, slots=True)
class Headers:
    request: HeaderOperations = HeaderOperations()
    response: HeaderOperations = HeaderOperations()


@dataclass(frozen=True, slots=True)
class RouteDestination:
    destination: Destination
    weight: int
    headers: Headers = Headers()


@dataclass(frozen=True, slots=True)
class HTTPMatchRequest:
    path: str  # field path of this match, e.g. spec.http[1].match[0]
    name: str = ""
    uri: StringMatch | None = None
    scheme: StringMatch | None = None
    method: StringMatch | None = None
    authority: StringMatch | None = None
    headers: tuple[tuple[str, StringMatch], ...] = ()
    without_headers: tuple[tuple[str, StringMatch], ...] = ()
    query_params: tuple[tuple[str, StringMatch], ...] = ()
    port: int | None = None
    source_labels: tuple[tuple[str, str], ...] = ()
    source_namespace: str = ""
    gateways: tuple[str, ...] = ()
    ignore_uri_case: bool = False


@dataclass(frozen=True, slots=True)
class HTTPRedirect:
    uri: str = ""
    authority: str = ""
    port: int | None = None
    derive_port: str = ""  # FROM_PROTOCOL_DEFAULT | FROM_REQUEST_PORT
    scheme: str = ""
    code: int = 301


@dataclass(frozen=True, slots=True)
class HTTPRewrite:
    uri: str | None = None
    authority: str = ""
    uri_regex: tuple[re.Pattern[str], str] | None = None


@dataclass(frozen=True, slots=True)
class HTTPRetry:
    attempts: int
    per_try_timeout: float | None = None
    retry_on: tuple[str, ...] = DEFAULT_RETRY_ON
    retriable_codes: tuple[int, ...] = DEFAULT_RETRIABLE_CODES


DEFAULT_RETRY = HTTPRetry(DEFAULT_RETRY_ATTEMPTS)


@dataclass(frozen=True, slots=True)
class FaultDelay:
    fixed_delay: float
    percentage: float = 100.0


@dataclass(frozen=True, slots=True)
class FaultAbort:
    percentage: float = 100.0
    http_status: int | None = None
    grpc_status: int | None = None


@dataclass(frozen=True, slots=True)
class HTTPFault:
    delay: FaultDelay | None = None
    abort: FaultAbort | None = None


@dataclass(frozen=True, slots=True)
class Mirror:
    destination: Destination
    percentage: float = 100.0


@dataclass(frozen=True, slots=True)
class CorsPolicy:
    allow_origins: tuple[StringMatch, ...] = ()
    allow_methods: tuple[str, ...] = ()
    allow_headers: tuple[str, ...] = ()
    expose_headers: tuple[str, ...] = ()
    max_age: float | None = None
    allow_credentials: bool | None = None
    unmatched_preflights: str = "FORWARD"  # FORWARD | IGNORE


@dataclass(frozen=True, slots=True)
class DirectResponse:
    status: int
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class Delegate:
    name: str
    namespace: str = ""


@dataclass(frozen=True, slots=True)
class HTTPRoute:
    """One `spec.http[i]` rule of a VirtualService."""

    path: str
    name: str = ""
    match: tuple[HTTPMatchRequest, ...] = ()
    route: tuple[RouteDestination, ...] = ()
    redirect: HTTPRedirect | None = None
    direct_response: DirectResponse | None = None
    delegate: Delegate | None = None
    rewrite: HTTPRewrite | None = None
    timeout: float | None = None  # None: not set; 0: disabled
    retries: HTTPRetry | None = None  # None: not set (the mesh default applies)
    fault: HTTPFault | None = None
    mirrors: tuple[Mirror, ...] = ()
    cors: CorsPolicy | None = None
    headers: Headers = Headers()


@dataclass(frozen=True, slots=True)
class L4Match:
    port: int | None = None
    destination_subnets: tuple[str, ...] = ()
    source_labels: tuple[tuple[str, str], ...] = ()
    source_namespace: str = ""
    gateways: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class TCPRoute:
    path: str
    match: tuple[L4Match, ...] = ()
    route: tuple[RouteDestination, ...] = ()


@dataclass(frozen=True, slots=True)
class VirtualService:
    meta: ResourceMeta
    hosts: tuple[str, ...]
    gateways: tuple[str, ...] = ()
    http: tuple[HTTPRoute, ...] = ()
    tcp: tuple[TCPRoute, ...] = ()
    tls_routes: int = 0  # TLS routes are parsed for counting only (not supported)
    export_to: tuple[str, ...] = ()
    raw: Mapping[str, Any] | None = None

    @property
    def is_delegate(self) -> bool:
        """A delegate VirtualService has no hosts; a root one refers to it."""
        return not self.hosts


def _header_ops(f: Fields, raw: Any, path: str) -> HeaderOperations:
    obj = f.mapping(raw, path)
    f.check_keys(obj, path, ("set", "add", "remove"))

    def pairs(key: str) -> tuple[tuple[str, str], ...]:
        out = []
        for k, v in f.mapping(obj.get(key), f"{path}.{key}").items():
            if not isinstance(k, str) or not _HEADER_NAME.match(k):
                raise f.fail(f"{path}.{key}.{k}", f"not a valid header name: {k!r}")
            if not isinstance(v, str):
                raise f.fail(f"{path}.{key}.{k}", "header values must be strings")
            out.append((k.lower(), v))
        return tuple(out)

    remove = tuple(h.lower() for h in f.strings(obj.get("remove"), f"{path}.remove"))
    return HeaderOperations(pairs("set"), pairs("add"), remove)


def read_headers(f: Fields, raw: Any, path: str) -> Headers:
    obj = f.mapping(raw, path)
    f.check_keys(obj, path, ("request", "response"))
    return Headers(
        _header_ops(f, obj.get("request"), f"{path}.request"),
        _header_ops(f, obj.get("response"), f"{path}.response"),
    )


def _destination(f: Fields, raw: Any, path: str) -> Destination:
    obj = f.mapping(raw, path, required=True)
    f.check_keys(obj, path, ("host", "subset", "port"))
    host = f.string(obj.get("host"), f"{path}.host")
    port = None
    if obj.get("port") is not None:
        p = f.mapping(obj["port"], f"{path}.port")
        f.check_keys(p, f"{path}.port", ("number",))
        port = f.port(p.get("number"), f"{path}.port.number")
    return Destination(host, f.string(obj.get("subset"), f"{path}.subset", required=False), port)


def _route_destinations(f: Fields, raw: Any, path: str) -> tuple[RouteDestination, ...]:
    items = f.seq(raw, path)
    out = []
    for i, item in enumerate(items):
        p = f"{path}[{i}]"
        obj = f.mapping(item, p, required=True)
        f.check_keys(obj, p, ("destination", "weight", "headers"))
        weight_raw = obj.get("weight")
        weight = (
            f.integer(weight_raw, f"{p}.weight", 0)
            if weight_raw is not None
            else (100 if len(items) == 1 else 0)
        )
        out.append(
            RouteDestination(
                _destination(f, obj.get("destination"), f"{p}.destination"),
                weight,
                read_headers(f, obj.get("headers"), f"{p}.headers"),
            )
        )
    if len(out) > 1 and sum(d.weight for d in out) == 0:
        raise f.fail(path, "the destinations' weights add up to 0: no traffic could be sent")
    return tuple(out)


def _match_map(
    f: Fields, raw: Any, path: str, allow_empty: bool
) -> tuple[tuple[str, StringMatch], ...]:
    out = []
    for k, v in f.mapping(raw, path).items():
        if not isinstance(k, str) or not k:
            raise f.fail(f"{path}.{k}", "keys must be non-empty strings")
        out.append((k.lower(), read_string_match(f, v, f"{path}.{k}", allow_empty=allow_empty)))
    return tuple(out)


def _http_match(f: Fields, raw: Any, path: str) -> HTTPMatchRequest:
    obj = f.mapping(raw, path, required=True)
    f.check_keys(
        obj,
        path,
        (
            "name",
            "uri",
            "scheme",
            "method",
            "authority",
            "headers",
            "withoutHeaders",
            "queryParams",
            "port",
            "sourceLabels",
            "sourceNamespace",
            "gateways",
            "ignoreUriCase",
            "statPrefix",
        ),
    )
    icase = f.boolean(obj.get("ignoreUriCase"), f"{path}.ignoreUriCase")

    def sm(key: str, ignore_case: bool = False) -> StringMatch | None:
        v = obj.get(key)
        return None if v is None else read_string_match(f, v, f"{path}.{key}", ignore_case)

    return HTTPMatchRequest(
        path=path,
        name=f.string(obj.get("name"), f"{path}.name", required=False),
        uri=sm("uri", icase),
        scheme=sm("scheme"),
        method=sm("method"),
        authority=sm("authority"),
        headers=_match_map(f, obj.get("headers"), f"{path}.headers", True),
        without_headers=_match_map(f, obj.get("withoutHeaders"), f"{path}.withoutHeaders", True),
        query_params=_match_map(f, obj.get("queryParams"), f"{path}.queryParams", True),
        port=None if obj.get("port") is None else f.port(obj["port"], f"{path}.port"),
        source_labels=tuple(
            sorted(f.string_map(obj.get("sourceLabels"), f"{path}.sourceLabels").items())
        ),
        source_namespace=f.string(
            obj.get("sourceNamespace"), f"{path}.sourceNamespace", required=False
        ),
        gateways=f.strings(obj.get("gateways"), f"{path}.gateways"),
        ignore_uri_case=icase,
    )


def _redirect(f: Fields, raw: Any, path: str) -> HTTPRedirect:
    obj = f.mapping(raw, path, required=True)
    f.check_keys(obj, path, ("uri", "authority", "port", "derivePort", "scheme", "redirectCode"))
    if obj.get("port") is not None and obj.get("derivePort") is not None:
        raise f.fail(path, "port and derivePort are mutually exclusive")
    derive = f.string(obj.get("derivePort"), f"{path}.derivePort", required=False)
    if derive and derive not in ("FROM_PROTOCOL_DEFAULT", "FROM_REQUEST_PORT"):
        raise f.fail(f"{path}.derivePort", "must be FROM_PROTOCOL_DEFAULT or FROM_REQUEST_PORT")
    scheme = f.string(obj.get("scheme"), f"{path}.scheme", required=False)
    if scheme and scheme not in ("http", "https"):
        raise f.fail(f"{path}.scheme", f"must be http or https, got {scheme!r}")
    code = obj.get("redirectCode")
    uri = f.string(obj.get("uri"), f"{path}.uri", required=False)
    authority = f.string(obj.get("authority"), f"{path}.authority", required=False)
    if not (uri or authority or scheme or obj.get("port") or derive):
        raise f.fail(path, "redirect must specify uri, authority, scheme or port")
    return HTTPRedirect(
        uri=uri,
        authority=authority,
        port=None if obj.get("port") is None else f.port(obj["port"], f"{path}.port"),
        derive_port=derive,
        scheme=scheme,
        code=301 if code is None else f.integer(code, f"{path}.redirectCode", 300, 399),
    )


def _rewrite(f: Fields, raw: Any, path: str) -> HTTPRewrite:
    obj = f.mapping(raw, path, required=True)
    f.check_keys(obj, path, ("uri", "authority", "uriRegexRewrite"))
    regex = None
    if obj.get("uriRegexRewrite") is not None:
        rp = f"{path}.uriRegexRewrite"
        rr = f.mapping(obj["uriRegexRewrite"], rp)
        f.check_keys(rr, rp, ("match", "rewrite"))
        if obj.get("uri") is not None:
            raise f.fail(rp, "uri and uriRegexRewrite are mutually exclusive")
        pattern = f.string(rr.get("match"), f"{rp}.match")
        try:
            compiled = re.compile(pattern)
        except re.error as e:
            raise f.fail(f"{rp}.match", f"invalid regular expression: {e}") from None
        regex = (compiled, f.string(rr.get("rewrite"), f"{rp}.rewrite", empty=True))
    uri = obj.get("uri")
    return HTTPRewrite(
        uri=None if uri is None else f.string(uri, f"{path}.uri", empty=True),
        authority=f.string(obj.get("authority"), f"{path}.authority", required=False),
        uri_regex=regex,
    )


def _retries(f: Fields, raw: Any, path: str) -> HTTPRetry:
    obj = f.mapping(raw, path, required=True)
    f.check_keys(
        obj,
        path,
        ("attempts", "perTryTimeout", "retryOn", "retryRemoteLocalities", "backoff"),
        unsupported=(),
    )
    attempts = f.integer(obj.get("attempts", 0), f"{path}.attempts", 0)
    per_try = f.opt_duration(obj.get("perTryTimeout"), f"{path}.perTryTimeout", 0.001)
    retry_on: list[str] = []
    codes: list[int] = []
    raw_on = obj.get("retryOn")
    if raw_on is not None:
        text = f.string(raw_on, f"{path}.retryOn")
        for item in (s.strip() for s in text.split(",")):
            if not item:
                continue
            if item.isdigit():
                code = int(item)
                if not 100 <= code <= 599:
                    raise f.fail(f"{path}.retryOn", f"{code} is not an HTTP status code")
                codes.append(code)
            elif item in RETRY_ON:
                retry_on.append(item)
            else:
                raise f.fail(f"{path}.retryOn", f"unknown retry policy {item!r}")
        if codes and "retriable-status-codes" not in retry_on:
            retry_on.append("retriable-status-codes")
    if raw_on is None:
        return HTTPRetry(attempts, per_try)
    return HTTPRetry(attempts, per_try, tuple(retry_on), tuple(codes))


def _fault(f: Fields, raw: Any, path: str) -> HTTPFault:
    obj = f.mapping(raw, path, required=True)
    f.check_keys(obj, path, ("delay", "abort"))
    delay = abort = None
    if obj.get("delay") is not None:
        dp = f"{path}.delay"
        d = f.mapping(obj["delay"], dp)
        f.check_keys(
            d, dp, ("fixedDelay", "percentage", "percent"), unsupported=("exponentialDelay",)
        )
        delay = FaultDelay(
            f.duration(d.get("fixedDelay"), f"{dp}.fixedDelay", 0.001),
            _fault_percent(f, d, dp),
        )
    if obj.get("abort") is not None:
        ap = f"{path}.abort"
        a = f.mapping(obj["abort"], ap)
        f.check_keys(a, ap, ("httpStatus", "grpcStatus", "percentage"), unsupported=("http2Error",))
        http = a.get("httpStatus")
        grpc = a.get("grpcStatus")
        if (http is None) == (grpc is None):
            raise f.fail(ap, "needs exactly one of httpStatus, grpcStatus")
        grpc_code = None
        if grpc is not None:
            name = f.string(grpc, f"{ap}.grpcStatus")
            if name not in GRPC_STATUS:
                raise f.fail(f"{ap}.grpcStatus", f"unknown gRPC status {name!r}")
            grpc_code = GRPC_STATUS[name]
        abort = FaultAbort(
            _fault_percent(f, a, ap),
            None if http is None else f.integer(http, f"{ap}.httpStatus", 200, 599),
            grpc_code,
        )
    if delay is None and abort is None:
        raise f.fail(path, "needs delay or abort")
    return HTTPFault(delay, abort)


def _fault_percent(f: Fields, obj: Mapping[str, Any], path: str) -> float:
    if obj.get("percentage") is not None:
        return f.percentage(obj["percentage"], f"{path}.percentage")
    if obj.get("percent") is not None:  # deprecated integer form
        return float(f.integer(obj["percent"], f"{path}.percent", 0, 100))
    return 100.0


def _cors(f: Fields, raw: Any, path: str) -> CorsPolicy:
    obj = f.mapping(raw, path, required=True)
    f.check_keys(
        obj,
        path,
        (
            "allowOrigins",
            "allowOrigin",
            "allowMethods",
            "allowHeaders",
            "exposeHeaders",
            "maxAge",
            "allowCredentials",
            "unmatchedPreflights",
        ),
    )
    origins = [
        read_string_match(f, v, f"{path}.allowOrigins[{i}]")
        for i, v in enumerate(f.seq(obj.get("allowOrigins"), f"{path}.allowOrigins"))
    ]
    for o in f.strings(obj.get("allowOrigin"), f"{path}.allowOrigin"):
        origins.append(StringMatch.present() if o == "*" else StringMatch.exact(o))
    unmatched = f.string(obj.get("unmatchedPreflights", "FORWARD"), f"{path}.unmatchedPreflights")
    if unmatched not in ("FORWARD", "IGNORE", "UNSPECIFIED"):
        raise f.fail(f"{path}.unmatchedPreflights", "must be FORWARD or IGNORE")
    creds = obj.get("allowCredentials")
    return CorsPolicy(
        allow_origins=tuple(origins),
        allow_methods=f.strings(obj.get("allowMethods"), f"{path}.allowMethods"),
        allow_headers=f.strings(obj.get("allowHeaders"), f"{path}.allowHeaders"),
        expose_headers=f.strings(obj.get("exposeHeaders"), f"{path}.exposeHeaders"),
        max_age=f.opt_duration(obj.get("maxAge"), f"{path}.maxAge"),
        allow_credentials=None if creds is None else f.boolean(creds, f"{path}.allowCredentials"),
        unmatched_preflights="FORWARD" if unmatched == "UNSPECIFIED" else unmatched,
    )


def _mirrors(f: Fields, obj: Mapping[str, Any], path: str) -> tuple[Mirror, ...]:
    if obj.get("mirror") is not None and obj.get("mirrors") is not None:
        raise f.fail(f"{path}.mirrors", "mirror and mirrors are mutually exclusive")
    if obj.get("mirror") is not None:
        pct = 100.0
        if obj.get("mirrorPercentage") is not None:
            pct = f.percentage(obj["mirrorPercentage"], f"{path}.mirrorPercentage")
        elif obj.get("mirrorPercent") is not None:
            pct = float(f.integer(obj["mirrorPercent"], f"{path}.mirrorPercent", 0, 100))
        return (Mirror(_destination(f, obj["mirror"], f"{path}.mirror"), pct),)
    out = []
    for i, raw in enumerate(f.seq(obj.get("mirrors"), f"{path}.mirrors")):
        mp = f"{path}.mirrors[{i}]"
        m = f.mapping(raw, mp, required=True)
        f.check_keys(m, mp, ("destination", "percentage"))
        pct = (
            100.0
            if m.get("percentage") is None
            else f.percentage(m["percentage"], f"{mp}.percentage")
        )
        out.append(Mirror(_destination(f, m.get("destination"), f"{mp}.destination"), pct))
    return tuple(out)


_HTTP_ROUTE_KEYS = (
    "name",
    "match",
    "route",
    "redirect",
    "directResponse",
    "delegate",
    "rewrite",
    "timeout",
    "retries",
    "fault",
    "mirror",
    "mirrors",
    "mirrorPercentage",
    "mirrorPercent",
    "corsPolicy",
    "headers",
)


def _http_route(f: Fields, raw: Any, path: str, delegate_vs: bool) -> HTTPRoute:
    obj = f.mapping(raw, path, required=True)
    f.check_keys(obj, path, _HTTP_ROUTE_KEYS)
    actions = [k for k in ("route", "redirect", "directResponse", "delegate") if obj.get(k)]
    if len(actions) > 1:
        raise f.fail(path, f"only one of route, redirect, directResponse, delegate; got {actions}")
    if not actions:
        raise f.fail(path, "needs route, redirect, directResponse or delegate")
    if obj.get("redirect") and obj.get("rewrite"):
        raise f.fail(f"{path}.rewrite", "rewrite cannot be combined with redirect")
    delegate = None
    if obj.get("delegate") is not None:
        if delegate_vs:
            raise f.fail(f"{path}.delegate", "a delegate VirtualService cannot delegate again")
        dp = f"{path}.delegate"
        d = f.mapping(obj["delegate"], dp)
        f.check_keys(d, dp, ("name", "namespace"))
        delegate = Delegate(
            f.string(d.get("name"), f"{dp}.name"),
            f.string(d.get("namespace"), f"{dp}.namespace", required=False),
        )
    direct = None
    if obj.get("directResponse") is not None:
        dp = f"{path}.directResponse"
        d = f.mapping(obj["directResponse"], dp)
        f.check_keys(d, dp, ("status", "body"))
        body = b""
        if d.get("body") is not None:
            bp = f"{dp}.body"
            b = f.mapping(d["body"], bp)
            f.check_keys(b, bp, ("string", "bytes"))
            if b.get("string") is not None:
                body = f.string(b["string"], f"{bp}.string", empty=True).encode()
            elif b.get("bytes") is not None:
                import base64
                import binascii

                try:
                    body = base64.b64decode(f.string(b["bytes"], f"{bp}.bytes"), validate=True)
                except (binascii.Error, ValueError):
                    raise f.fail(f"{bp}.bytes", "not valid base64") from None
        direct = DirectResponse(f.integer(d.get("status"), f"{dp}.status", 200, 599), body)
    timeout = obj.get("timeout")
    return HTTPRoute(
        path=path,
        name=f.string(obj.get("name"), f"{path}.name", required=False),
        match=tuple(
            _http_match(f, m, f"{path}.match[{i}]")
            for i, m in enumerate(f.seq(obj.get("match"), f"{path}.match"))
        ),
        route=_route_destinations(f, obj.get("route"), f"{path}.route"),
        redirect=None
        if obj.get("redirect") is None
        else _redirect(f, obj["redirect"], f"{path}.redirect"),
        direct_response=direct,
        delegate=delegate,
        rewrite=None
        if obj.get("rewrite") is None
        else _rewrite(f, obj["rewrite"], f"{path}.rewrite"),
        timeout=None if timeout is None else f.duration(timeout, f"{path}.timeout"),
        retries=None
        if obj.get("retries") is None
        else _retries(f, obj["retries"], f"{path}.retries"),
        fault=None if obj.get("fault") is None else _fault(f, obj["fault"], f"{path}.fault"),
        mirrors=_mirrors(f, obj, path),
        cors=None
        if obj.get("corsPolicy") is None
        else _cors(f, obj["corsPolicy"], f"{path}.corsPolicy"),
        headers=read_headers(f, obj.get("headers"), f"{path}.headers"),
    )


def _tcp_route(f: Fields, raw: Any, path: str) -> TCPRoute:
    obj = f.mapping(raw, path, required=True)
    f.check_keys(obj, path, ("match", "route"))
    matches = []
    for i, m in enumerate(f.seq(obj.get("match"), f"{path}.match")):
        mp = f"{path}.match[{i}]"
        mm = f.mapping(m, mp, required=True)
        f.check_keys(
            mm,
            mp,
            ("port", "destinationSubnets", "sourceLabels", "sourceNamespace", "gateways"),
            unsupported=("sourceSubnet",),
        )
        matches.append(
            L4Match(
                port=None if mm.get("port") is None else f.port(mm["port"], f"{mp}.port"),
                destination_subnets=f.strings(
                    mm.get("destinationSubnets"), f"{mp}.destinationSubnets"
                ),
                source_labels=tuple(
                    sorted(f.string_map(mm.get("sourceLabels"), f"{mp}.sourceLabels").items())
                ),
                source_namespace=f.string(
                    mm.get("sourceNamespace"), f"{mp}.sourceNamespace", required=False
                ),
                gateways=f.strings(mm.get("gateways"), f"{mp}.gateways"),
            )
        )
    route = _route_destinations(f, obj.get("route"), f"{path}.route")
    if not route:
        raise f.fail(f"{path}.route", "at least one destination is required")
    return TCPRoute(path, tuple(matches), route)


def parse_virtual_service(f: Fields, meta: ResourceMeta) -> VirtualService:
    spec = f.mapping(f.doc.obj.get("spec"), "spec", required=True)
    f.check_keys(spec, "spec", ("hosts", "gateways", "http", "tcp", "tls", "exportTo"))
    hosts = f.strings(spec.get("hosts"), "spec.hosts")
    gateways = f.strings(spec.get("gateways"), "spec.gateways")
    mesh_bound = not gateways or "mesh" in gateways
    for i, h in enumerate(hosts):
        if h == "*" and mesh_bound:
            raise f.fail(f"spec.hosts[{i}]", "the wildcard host '*' is not allowed for the mesh")
    delegate_vs = not hosts
    if delegate_vs and gateways:
        raise f.fail("spec.gateways", "a delegate VirtualService (no hosts) cannot set gateways")
    http = tuple(
        _http_route(f, r, f"spec.http[{i}]", delegate_vs)
        for i, r in enumerate(f.seq(spec.get("http"), "spec.http"))
    )
    tcp = tuple(
        _tcp_route(f, r, f"spec.tcp[{i}]") for i, r in enumerate(f.seq(spec.get("tcp"), "spec.tcp"))
    )
    tls = f.seq(spec.get("tls"), "spec.tls")
    if tls:
        f.warn(
            "spec.tls",
            "TLS routes (SNI) are not supported by the waypoint; ignored",
            "unsupported-field",
        )
    if not http and not tcp and not tls:
        raise f.fail("spec", "needs at least one of http, tcp, tls")
    return VirtualService(
        meta,
        hosts,
        gateways,
        http,
        tcp,
        len(tls),
        f.export_to(spec.get("exportTo"), "spec.exportTo"),
        spec,
    )


# ---- DestinationRule -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConsistentHash:
    kind: str  # header | cookie | source_ip | query_param
    name: str = ""
    cookie_path: str = ""
    cookie_ttl: float | None = None
    ring_size: int = 1024
    algorithm: str = "ring_hash"  # ring_hash | maglev


@dataclass(frozen=True, slots=True)
class LoadBalancer:
    simple: str = "LEAST_REQUEST"  # Istio's default
    consistent_hash: ConsistentHash | None = None


@dataclass(frozen=True, slots=True)
class ConnectionPool:
    """None means unlimited/default (Istio leaves Envoy's circuit breakers wide open)."""

    max_connections: int | None = None
    connect_timeout: float = 10.0
    max_connection_duration: float | None = None
    tcp_idle_timeout: float | None = None
    http1_max_pending_requests: int | None = None
    http2_max_requests: int | None = None
    max_requests_per_connection: int | None = None
    max_retries: int | None = None
    idle_timeout: float | None = None
    h2_upgrade_policy: str = "DEFAULT"
    use_client_protocol: bool = False
    max_concurrent_streams: int | None = None


@dataclass(frozen=True, slots=True)
class OutlierDetection:
    consecutive_5xx_errors: int = 5
    consecutive_gateway_errors: int = 0
    consecutive_local_origin_failures: int = 5
    split_external_local_origin_errors: bool = False
    interval: float = 10.0
    base_ejection_time: float = 30.0
    max_ejection_percent: int = 10
    min_health_percent: int = 0


@dataclass(frozen=True, slots=True)
class TrafficPolicy:
    load_balancer: LoadBalancer | None = None
    connection_pool: ConnectionPool | None = None
    outlier_detection: OutlierDetection | None = None
    tls_mode: str = ""
    port_level: tuple[tuple[int, TrafficPolicy], ...] = ()

    def for_port(self, port: int) -> tuple[TrafficPolicy, bool]:
        """The port-level policy when one exists (it replaces, does not inherit: fields it
        leaves out take their defaults), else this policy. Second: whether port-level."""
        for p, policy in self.port_level:
            if p == port:
                return policy, True
        return self, False


@dataclass(frozen=True, slots=True)
class Subset:
    name: str
    labels: tuple[tuple[str, str], ...]
    traffic_policy: TrafficPolicy | None = None
    path: str = ""


@dataclass(frozen=True, slots=True)
class DestinationRule:
    meta: ResourceMeta
    host: str  # "" only for a mesh/namespace-wide rule (inheritance)
    subsets: tuple[Subset, ...] = ()
    traffic_policy: TrafficPolicy | None = None
    export_to: tuple[str, ...] = ()
    workload_selector: tuple[tuple[str, str], ...] = ()
    raw: Mapping[str, Any] | None = None


_SIMPLE_LB = ("UNSPECIFIED", "LEAST_CONN", "RANDOM", "PASSTHROUGH", "ROUND_ROBIN", "LEAST_REQUEST")


def _load_balancer(f: Fields, raw: Any, path: str) -> LoadBalancer:
    obj = f.mapping(raw, path, required=True)
    f.check_keys(
        obj,
        path,
        ("simple", "consistentHash"),
        unsupported=("localityLbSetting", "warmupDurationSecs", "warmup"),
    )
    if obj.get("simple") is not None and obj.get("consistentHash") is not None:
        raise f.fail(path, "simple and consistentHash are mutually exclusive")
    if obj.get("consistentHash") is not None:
        return LoadBalancer(
            "CONSISTENT_HASH", _consistent_hash(f, obj["consistentHash"], f"{path}.consistentHash")
        )
    simple = f.string(obj.get("simple", "UNSPECIFIED"), f"{path}.simple")
    if simple not in _SIMPLE_LB:
        raise f.fail(f"{path}.simple", f"must be one of {', '.join(_SIMPLE_LB)}, got {simple!r}")
    if simple == "PASSTHROUGH":
        f.warn(
            f"{path}.simple",
            "PASSTHROUGH is not supported; LEAST_REQUEST is used",
            "unsupported-field",
        )
    if simple in ("UNSPECIFIED", "LEAST_CONN", "PASSTHROUGH"):
        simple = "LEAST_REQUEST"
    return LoadBalancer(simple)


def _consistent_hash(f: Fields, raw: Any, path: str) -> ConsistentHash:
    obj = f.mapping(raw, path, required=True)
    keys = ("httpHeaderName", "httpCookie", "useSourceIp", "httpQueryParameterName")
    f.check_keys(obj, path, (*keys, "ringHash", "maglev", "minimumRingSize"))
    present = [k for k in keys if obj.get(k) not in (None, False)]
    if len(present) != 1:
        raise f.fail(path, f"needs exactly one of {', '.join(keys)}")
    algorithm, ring = "ring_hash", 1024
    if obj.get("maglev") is not None:
        algorithm, ring = "maglev", 65537
    if obj.get("ringHash") is not None:
        rh = f.mapping(obj["ringHash"], f"{path}.ringHash")
        f.check_keys(rh, f"{path}.ringHash", ("minimumRingSize",))
        ring = f.integer(
            rh.get("minimumRingSize", 1024), f"{path}.ringHash.minimumRingSize", 1, 8_388_608
        )
    if obj.get("minimumRingSize") is not None:
        ring = f.integer(obj["minimumRingSize"], f"{path}.minimumRingSize", 1, 8_388_608)
    k = present[0]
    if k == "httpHeaderName":
        return ConsistentHash(
            "header", f.string(obj[k], f"{path}.{k}").lower(), ring_size=ring, algorithm=algorithm
        )
    if k == "httpQueryParameterName":
        return ConsistentHash(
            "query_param", f.string(obj[k], f"{path}.{k}"), ring_size=ring, algorithm=algorithm
        )
    if k == "useSourceIp":
        f.boolean(obj[k], f"{path}.{k}")
        return ConsistentHash("source_ip", ring_size=ring, algorithm=algorithm)
    cp = f"{path}.httpCookie"
    c = f.mapping(obj[k], cp)
    f.check_keys(c, cp, ("name", "path", "ttl"), unsupported=("attributes",))
    return ConsistentHash(
        "cookie",
        f.string(c.get("name"), f"{cp}.name"),
        f.string(c.get("path"), f"{cp}.path", required=False),
        f.opt_duration(c.get("ttl"), f"{cp}.ttl"),
        ring,
        algorithm,
    )


def _connection_pool(f: Fields, raw: Any, path: str) -> ConnectionPool:
    obj = f.mapping(raw, path, required=True)
    f.check_keys(obj, path, ("tcp", "http"))
    tp, hp = f"{path}.tcp", f"{path}.http"
    tcp = f.mapping(obj.get("tcp"), tp)
    http = f.mapping(obj.get("http"), hp)
    f.check_keys(
        tcp,
        tp,
        ("maxConnections", "connectTimeout", "maxConnectionDuration", "idleTimeout"),
        unsupported=("tcpKeepalive",),
    )
    f.check_keys(
        http,
        hp,
        (
            "http1MaxPendingRequests",
            "http2MaxRequests",
            "maxRequestsPerConnection",
            "maxRetries",
            "idleTimeout",
            "h2UpgradePolicy",
            "useClientProtocol",
            "maxConcurrentStreams",
        ),
    )
    upgrade = f.string(http.get("h2UpgradePolicy", "DEFAULT"), f"{hp}.h2UpgradePolicy")
    if upgrade not in ("DEFAULT", "DO_NOT_UPGRADE", "UPGRADE"):
        raise f.fail(f"{hp}.h2UpgradePolicy", "must be DEFAULT, DO_NOT_UPGRADE or UPGRADE")

    def positive(obj: Mapping[str, Any], key: str, p: str) -> int | None:
        return f.opt_integer(obj.get(key), f"{p}.{key}", 1)

    return ConnectionPool(
        max_connections=positive(tcp, "maxConnections", tp),
        connect_timeout=f.duration(tcp.get("connectTimeout", "10s"), f"{tp}.connectTimeout", 0.001),
        max_connection_duration=f.opt_duration(
            tcp.get("maxConnectionDuration"), f"{tp}.maxConnectionDuration", 0.001
        ),
        tcp_idle_timeout=f.opt_duration(tcp.get("idleTimeout"), f"{tp}.idleTimeout"),
        http1_max_pending_requests=positive(http, "http1MaxPendingRequests", hp),
        http2_max_requests=positive(http, "http2MaxRequests", hp),
        max_requests_per_connection=f.opt_integer(
            http.get("maxRequestsPerConnection"), f"{hp}.maxRequestsPerConnection", 0
        )
        or None,
        max_retries=f.opt_integer(http.get("maxRetries"), f"{hp}.maxRetries", 0),
        idle_timeout=f.opt_duration(http.get("idleTimeout"), f"{hp}.idleTimeout"),
        h2_upgrade_policy=upgrade,
        use_client_protocol=f.boolean(http.get("useClientProtocol"), f"{hp}.useClientProtocol"),
        max_concurrent_streams=positive(http, "maxConcurrentStreams", hp),
    )


def _outlier(f: Fields, raw: Any, path: str) -> OutlierDetection:
    obj = f.mapping(raw, path, required=True)
    f.check_keys(
        obj,
        path,
        (
            "consecutiveErrors",
            "consecutive5xxErrors",
            "consecutiveGatewayErrors",
            "consecutiveLocalOriginFailures",
            "splitExternalLocalOriginErrors",
            "interval",
            "baseEjectionTime",
            "maxEjectionPercent",
            "minHealthPercent",
        ),
    )
    c5 = obj.get("consecutive5xxErrors", obj.get("consecutiveErrors"))
    return OutlierDetection(
        consecutive_5xx_errors=5
        if c5 is None
        else f.integer(c5, f"{path}.consecutive5xxErrors", 0),
        consecutive_gateway_errors=f.integer(
            obj.get("consecutiveGatewayErrors", 0), f"{path}.consecutiveGatewayErrors", 0
        ),
        consecutive_local_origin_failures=f.integer(
            obj.get("consecutiveLocalOriginFailures", 5),
            f"{path}.consecutiveLocalOriginFailures",
            0,
        ),
        split_external_local_origin_errors=f.boolean(
            obj.get("splitExternalLocalOriginErrors"), f"{path}.splitExternalLocalOriginErrors"
        ),
        interval=f.duration(obj.get("interval", "10s"), f"{path}.interval", 0.001),
        base_ejection_time=f.duration(
            obj.get("baseEjectionTime", "30s"), f"{path}.baseEjectionTime", 0.001
        ),
        max_ejection_percent=f.integer(
            obj.get("maxEjectionPercent", 10), f"{path}.maxEjectionPercent", 0, 100
        ),
        min_health_percent=f.integer(
            obj.get("minHealthPercent", 0), f"{path}.minHealthPercent", 0, 100
        ),
    )


_TLS_MODES = ("DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL")


def read_traffic_policy(f: Fields, raw: Any, path: str, port_level: bool = False) -> TrafficPolicy:
    obj = f.mapping(raw, path, required=True)
    keys = ["loadBalancer", "connectionPool", "outlierDetection", "tls"]
    if port_level:
        keys.append("port")
    else:
        keys.append("portLevelSettings")
    f.check_keys(obj, path, keys, unsupported=("tunnel", "proxyProtocol", "retryBudget"))
    tls_mode = ""
    if obj.get("tls") is not None:
        tp = f"{path}.tls"
        tls = f.mapping(obj["tls"], tp)
        tls_mode = f.string(tls.get("mode", "DISABLE"), f"{tp}.mode")
        if tls_mode not in _TLS_MODES:
            raise f.fail(f"{tp}.mode", f"must be one of {', '.join(_TLS_MODES)}")
        if tls_mode in ("SIMPLE", "MUTUAL"):
            f.warn(
                tp,
                f"TLS origination ({tls_mode}) is not supported: traffic to mesh "
                "workloads is always HBONE mutual TLS",
                "unsupported-field",
            )
    levels: list[tuple[int, TrafficPolicy]] = []
    for i, raw_pl in enumerate(f.seq(obj.get("portLevelSettings"), f"{path}.portLevelSettings")):
        pp = f"{path}.portLevelSettings[{i}]"
        pl = f.mapping(raw_pl, pp, required=True)
        port_obj = f.mapping(pl.get("port"), f"{pp}.port", required=True)
        f.check_keys(port_obj, f"{pp}.port", ("number",))
        number = f.port(port_obj.get("number"), f"{pp}.port.number")
        if any(p == number for p, _ in levels):
            raise f.fail(f"{pp}.port.number", f"port {number} appears twice")
        levels.append((number, read_traffic_policy(f, pl, pp, port_level=True)))
    return TrafficPolicy(
        load_balancer=None
        if obj.get("loadBalancer") is None
        else _load_balancer(f, obj["loadBalancer"], f"{path}.loadBalancer"),
        connection_pool=None
        if obj.get("connectionPool") is None
        else _connection_pool(f, obj["connectionPool"], f"{path}.connectionPool"),
        outlier_detection=None
        if obj.get("outlierDetection") is None
        else _outlier(f, obj["outlierDetection"], f"{path}.outlierDetection"),
        tls_mode=tls_mode,
        port_level=tuple(levels),
    )


def parse_destination_rule(f: Fields, meta: ResourceMeta, allow_hostless: bool) -> DestinationRule:
    spec = f.mapping(f.doc.obj.get("spec"), "spec", required=True)
    f.check_keys(spec, "spec", ("host", "trafficPolicy", "subsets", "exportTo", "workloadSelector"))
    host = f.string(spec.get("host"), "spec.host", required=not allow_hostless)
    subsets = []
    seen: set[str] = set()
    for i, raw in enumerate(f.seq(spec.get("subsets"), "spec.subsets")):
        sp = f"spec.subsets[{i}]"
        s = f.mapping(raw, sp, required=True)
        f.check_keys(s, sp, ("name", "labels", "trafficPolicy"))
        name = f.string(s.get("name"), f"{sp}.name")
        if name in seen:
            raise f.fail(f"{sp}.name", f"duplicate subset name {name!r}")
        seen.add(name)
        subsets.append(
            Subset(
                name,
                tuple(sorted(f.string_map(s.get("labels"), f"{sp}.labels").items())),
                None
                if s.get("trafficPolicy") is None
                else read_traffic_policy(f, s["trafficPolicy"], f"{sp}.trafficPolicy"),
                sp,
            )
        )
    selector: tuple[tuple[str, str], ...] = ()
    if spec.get("workloadSelector") is not None:
        ws = f.mapping(spec["workloadSelector"], "spec.workloadSelector")
        f.check_keys(ws, "spec.workloadSelector", ("matchLabels",))
        selector = tuple(
            sorted(f.string_map(ws.get("matchLabels"), "spec.workloadSelector.matchLabels").items())
        )
        f.warn(
            "spec.workloadSelector",
            "applies to sidecars only; a waypoint ignores this rule",
            "ignored",
        )
    return DestinationRule(
        meta,
        host,
        tuple(subsets),
        None
        if spec.get("trafficPolicy") is None
        else read_traffic_policy(f, spec["trafficPolicy"], "spec.trafficPolicy"),
        f.export_to(spec.get("exportTo"), "spec.exportTo"),
        selector,
        spec,
    )
