"""Mesh configuration resources, parsed and compiled without I/O: Istio traffic management
(`VirtualService`, `DestinationRule`), the Gateway API (`HTTPRoute`, `Gateway`,
`ReferenceGrant`), L7 `AuthorizationPolicy`, and the Kubernetes `Service`/`Pod`/`Namespace`
they refer to.

It lives in the shared core (not in `waypoint/`) because two users build on the same model:
the waypoint (`waypoint/`, which enforces it) and `ztunnel analyze` (which reports on it, as
`istioctl analyze` does). Both take the parsed resources and the compilation's decisions as
data; nothing here opens a socket or a file except `source.read_documents`.

Rooms, bottom to top:
- `source`: YAML documents with the line of every field.
- `resource`: resource metadata (kind, namespace/name, labels, file and line), the
  `ResourceError`/`ConfigWarning`/`Decision` records, and `Fields`, the validating reader.
- `match`, `hosts`: string matchers (exact/prefix/regex, Gateway API path prefixes) and
  hostname rules (short names, wildcards, most specific match).
- `networking`, `gateway`, `security`, `kube`: one frozen record type per kind, with parsers
  that name the resource and field of any error.
- `registry`: `ServiceEntry` and the `networking.istio.io` Gateway, and (in `kube`) the
  workload controllers' pod templates: parsed only with `ConfigOptions.analysis_kinds`, for
  `ztunnel analyze`; the waypoint skips them.
- `load`: documents -> `ConfigSet` (every resource, warnings, skipped documents; optionally
  every bad document collected instead of the first raised).
- `destinations`: DestinationRule merging and lookup (proxy namespace, service namespace,
  root namespace; subset over host; optional inheritance).
- `compile`: `ConfigSet` + served services -> `RouteTable` (routes per host, policies per
  destination) with `Decision`s (which VirtualService won, unreachable rules, unknown hosts...).
"""

from ztunnel.meshconfig.compile import (
    Cluster,
    RequestMatch,
    Route,
    RouteEntry,
    RouteTable,
    ServiceRef,
    ServiceRoutes,
    compile_routes,
)
from ztunnel.meshconfig.destinations import DestinationRules, EffectivePolicy
from ztunnel.meshconfig.load import ConfigOptions, ConfigSet, load_config, parse_documents
from ztunnel.meshconfig.resource import ConfigWarning, Decision, ResourceError, ResourceMeta
from ztunnel.meshconfig.source import SourceDocument, parse_yaml, read_documents

__all__ = [
    "Cluster",
    "ConfigOptions",
    "ConfigSet",
    "ConfigWarning",
    "Decision",
    "DestinationRules",
    "EffectivePolicy",
    "RequestMatch",
    "ResourceError",
    "ResourceMeta",
    "Route",
    "RouteEntry",
    "RouteTable",
    "ServiceRef",
    "ServiceRoutes",
    "SourceDocument",
    "compile_routes",
    "load_config",
    "parse_documents",
    "parse_yaml",
    "read_documents",
]
