"""Analysis messages as istioctl prints them: levels, the message types (Istio's codes, names,
levels and templates, from istio/istio pkg/config/analysis/msg/messages.yaml), the resource a
message is about (`Kind namespace/name file:line`), and Go's `fmt` verbs the templates use, so
that a message reads byte for byte as istioctl's (pkg/config/analysis/diag/message.go)."""

from __future__ import annotations

import enum
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# istioctl links `url.ConfigAnalysis` of its own minor version (https://istio.io/v1.NN/...);
# this tool belongs to no Istio release, so it links the current reference.
ANALYSIS_REFERENCE = "https://istio.io/latest/docs/reference/config/analysis"
DOC_REF = "istioctl-analyze"  # the `?ref=` istioctl analyze sets (Messages.SetDocRef)


class Level(enum.Enum):
    """diag.Level: sort order (worst first) and name."""

    ERROR = (0, "Error")
    WARNING = (1, "Warning")
    INFO = (2, "Info")

    @property
    def order(self) -> int:
        return self.value[0]

    @property
    def label(self) -> str:
        return self.value[1]

    def at_least(self, threshold: Level) -> bool:
        """`IsWorseThanOrEqualTo`."""
        return self.order <= threshold.order

    @classmethod
    def parse(cls, text: str) -> Level:
        for level in cls:
            if level.label.upper() == text.strip().upper():
                return level
        raise ValueError("invalid level option")


@dataclass(frozen=True, slots=True)
class MessageType:
    code: str
    name: str
    level: Level
    template: str  # Go fmt template, as in messages.yaml

    def format(self, *args: Any) -> str:
        return go_sprintf(self.template, args)


def _t(code: str, name: str, level: Level, template: str) -> MessageType:
    return MessageType(code, name, level, template)


E, W, INFO = Level.ERROR, Level.WARNING, Level.INFO

# The types this tool reports; templates verbatim from messages.yaml.
ReferencedResourceNotFound = _t(
    "IST0101", "ReferencedResourceNotFound", E, "Referenced %s not found: %q"
)
SchemaValidationError = _t("IST0106", "SchemaValidationError", E, "Schema validation error: %v")
ConflictingMeshGatewayVirtualServiceHosts = _t(
    "IST0109",
    "ConflictingMeshGatewayVirtualServiceHosts",
    E,
    "The VirtualServices %s associated with mesh gateway define the same host %s which can lead "
    "to undefined behavior. This can be fixed by merging the conflicting VirtualServices into a "
    "single resource.",
)
VirtualServiceDestinationPortSelectorRequired = _t(
    "IST0112",
    "VirtualServiceDestinationPortSelectorRequired",
    E,
    "This VirtualService routes to a service %q that exposes multiple ports %v. Specifying a port "
    "in the destination is required to disambiguate.",
)
PortNameIsNotUnderNamingConvention = _t(
    "IST0118",
    "PortNameIsNotUnderNamingConvention",
    INFO,
    "Port name %s (port: %d, targetPort: %s) doesn't follow the naming convention of Istio port.",
)
NamespaceMultipleInjectionLabels = _t(
    "IST0123",
    "NamespaceMultipleInjectionLabels",
    W,
    "The namespace has more than one type of injection labels %v, which may lead to undefined "
    "behavior. Make sure only one injection label exists.",
)
NoMatchingWorkloadsFound = _t(
    "IST0127",
    "NoMatchingWorkloadsFound",
    W,
    "No matching workloads for this resource with the following labels: %s",
)
VirtualServiceUnreachableRule = _t(
    "IST0130", "VirtualServiceUnreachableRule", W, "VirtualService rule %v not used (%s)."
)
VirtualServiceIneffectiveMatch = _t(
    "IST0131",
    "VirtualServiceIneffectiveMatch",
    INFO,
    "VirtualService rule %v match %v is not used (duplicate/overlapping match in rule %v).",
)
VirtualServiceHostNotFoundInGateway = _t(
    "IST0132",
    "VirtualServiceHostNotFoundInGateway",
    W,
    "one or more host %v defined in VirtualService %s not found in Gateway %s.",
)
IngressRouteRulesNotAffected = _t(
    "IST0140",
    "IngressRouteRulesNotAffected",
    W,
    "Subset in virtual service %s has no effect on ingress gateway %s requests",
)
SchemaWarning = _t("IST0133", "SchemaWarning", W, "Schema validation warning: %v")
ExternalNameServiceTypeInvalidPortName = _t(
    "IST0150",
    "ExternalNameServiceTypeInvalidPortName",
    W,
    "Port name for ExternalName service is invalid. Proxy may prevent tcp named ports and "
    "unmatched traffic for ports serving TCP protocol from being forwarded correctly",
)
NegativeConditionStatus = _t(
    "IST0171",
    "NegativeConditionStatus",
    W,
    "A condition with a negative status is present: type=%s, reason=%s, message=%s.",
)
DestinationRuleSubsetNotSelectPods = _t(
    "IST0173",
    "DestinationRuleSubsetNotSelectPods",
    E,
    "The Subset %s defined in the DestinationRule does not select any pods. Which may lead to "
    "503 UH (NoHealthyUpstream).",
)
UnknownDestinationRuleHost = _t(
    "IST0174",
    "UnknownDestinationRuleHost",
    W,
    "The host %s defined in the DestinationRule does not match any services in the mesh.",
)
# This project's own codes (ZTN...), for ambient mistakes Istio has no message for.
AmbientPodHasSidecar = _t(
    "ZTN0001",
    "AmbientPodHasSidecar",
    W,
    "%s an Istio sidecar (%s) although namespace %s is labelled istio.io/dataplane-mode=ambient: "
    "the node agent does not capture pods that have a sidecar, so ambient mTLS, L4 authorization "
    "and waypoints do not apply to them. Remove the injection and restart the pods to move them "
    "to ambient.",
)
VirtualServiceIgnoredByWaypoint = _t(
    "ZTN0002",
    "VirtualServiceIgnoredByWaypoint",
    W,
    "This VirtualService is not used for %s: its waypoint %s uses only the VirtualServices in "
    "the service's namespace (%s) and in its own (%s).",
)

REPORTED: tuple[MessageType, ...] = (
    ReferencedResourceNotFound,
    SchemaValidationError,
    ConflictingMeshGatewayVirtualServiceHosts,
    VirtualServiceDestinationPortSelectorRequired,
    PortNameIsNotUnderNamingConvention,
    NamespaceMultipleInjectionLabels,
    NoMatchingWorkloadsFound,
    VirtualServiceUnreachableRule,
    VirtualServiceIneffectiveMatch,
    VirtualServiceHostNotFoundInGateway,
    SchemaWarning,
    IngressRouteRulesNotAffected,
    ExternalNameServiceTypeInvalidPortName,
    NegativeConditionStatus,
    DestinationRuleSubsetNotSelectPods,
    UnknownDestinationRuleHost,
    AmbientPodHasSidecar,
    VirtualServiceIgnoredByWaypoint,
)

# Every code Istio defines (messages.yaml), so that `--suppress` of a code this tool does not
# report is accepted silently, as istioctl accepts it.
_ISTIO_NUMBERS = (1, 2, 101, 102, 103, 106, 107, 108, 109, 110, 111, 112, 116, 118, 123)
ISTIO_CODES = frozenset(f"IST{n:04d}" for n in (*_ISTIO_NUMBERS, 125, 126, *range(127, 178)))
KNOWN_CODES = ISTIO_CODES | {t.code for t in REPORTED}


# ---- the resource a message is about --------------------------------------------------------

NO_REFERENCE_PREFIX = "<"  # sources like "<cluster>": no file to point at


@dataclass(frozen=True, slots=True)
class ResourceRef:
    """`resource.Instance` as far as messages use it: kind, namespace/name, and where it was
    read (file and 1-based document line; no file for resources from the cluster)."""

    kind: str
    namespace: str
    name: str
    file: str = ""
    line: int = 0
    suppress: str = ""  # the galley.istio.io/analyze-suppress annotation

    @property
    def friendly_name(self) -> str:
        """`Kind namespace/name` (cluster-scoped: `Kind name`), istioctl's convention."""
        return (
            f"{self.kind} {self.namespace}/{self.name}"
            if self.namespace
            else (f"{self.kind} {self.name}")
        )

    @property
    def comparator(self) -> str:
        return f"{self.kind}/{self.name}/{self.namespace}"

    @property
    def origin_namespace(self) -> str:
        """The namespace messages are filtered by; a Namespace is in its own namespace."""
        return self.name if self.kind == "Namespace" else self.namespace

    def reference(self, line: int = 0) -> str | None:
        """`kube.Position.String()` with the message's line: `file:line`; no line for JSON
        files (istioctl cannot place them); None for resources not read from a file."""
        if not self.file or self.file.startswith(NO_REFERENCE_PREFIX):
            return None
        where = line or self.line
        if where > 0 and not self.file.endswith(".json"):
            return f"{self.file}:{where}"
        return self.file


@dataclass(frozen=True, slots=True)
class Message:
    type: MessageType
    text: str
    resource: ResourceRef | None = None
    line: int = 0  # the field's line; 0: the document's

    @property
    def level(self) -> Level:
        return self.type.level

    @property
    def code(self) -> str:
        return self.type.code

    def origin(self) -> str:
        if self.resource is None:
            return ""
        ref = self.resource.reference(self.line)
        loc = f" {ref}" if ref else ""
        return f" ({self.resource.friendly_name}{loc})"

    def render(self, color: bool = False) -> str:
        """`Error [IST0109] (VirtualService default/a a.yaml:4) The VirtualServices ...`."""
        prefix, suffix = (COLORS[self.level], "\033[0m") if color else ("", "")
        return f"{prefix}{self.level.label}{suffix} [{self.code}]{self.origin()} {self.text}"

    def __str__(self) -> str:
        return self.render()

    def documentation_url(self) -> str:
        if not self.code.startswith("IST"):
            return ""
        return f"{ANALYSIS_REFERENCE}/{self.code.lower()}/?ref={DOC_REF}"

    def unstructured(self) -> dict[str, Any]:
        """`Message.Unstructured(true)`: the JSON/YAML shape of `istioctl analyze -o json`."""
        out: dict[str, Any] = {"code": self.code, "level": self.level.label}
        if self.resource is not None:
            out["origin"] = self.resource.friendly_name
            ref = self.resource.reference(self.line)
            if ref is not None:
                out["reference"] = ref
        out["message"] = self.text
        out["documentationUrl"] = self.documentation_url()
        return out


COLORS = {Level.INFO: "", Level.WARNING: "\033[33m", Level.ERROR: "\033[1;31m"}


def sort_key(m: Message) -> tuple[int, str, int, str, str]:
    """`Messages.Sort`: level (worst first), code, messages without a resource first, the
    resource's `Kind/name/namespace`, then the rendered text."""
    r = m.resource
    return (m.level.order, m.code, 0 if r is None else 1, r.comparator if r else "", str(m))


def sorted_deduped(messages: Sequence[Message]) -> list[Message]:
    """`SortedDedupedCopy`: sorted; messages that render the same are reported once."""
    out: list[Message] = []
    for m in sorted(messages, key=sort_key):
        if out and str(out[-1]) == str(m):
            continue
        out.append(m)
    return out


# ---- Go fmt ---------------------------------------------------------------------------------

_VERB = re.compile(r"%([%svqdt])")


def go_quote(s: str) -> str:
    """strconv.Quote: double quotes, Go escapes, printable Unicode kept as is."""
    out = ['"']
    for ch in s:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif unicodedata.category(ch)[0] == "C" or (ch.isspace() and ch != " "):
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x80 else f"\\u{code:04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


_ESCAPES = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_ESCAPES["\v"] = "\\v"


def go_value(v: Any) -> str:
    """%v / %s of the Go value the template expects: lists as `[a b]`, bools as true/false."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list | tuple):
        return "[" + " ".join(go_value(x) for x in v) + "]"
    return str(v)


def go_sprintf(template: str, args: Sequence[Any]) -> str:
    it = iter(args)

    def one(m: re.Match[str]) -> str:
        verb = m.group(1)
        if verb == "%":
            return "%"
        value = next(it)
        if verb == "q":
            return go_quote(str(value))
        if verb == "d":
            return str(int(value))
        return go_value(value)

    return _VERB.sub(one, template)
