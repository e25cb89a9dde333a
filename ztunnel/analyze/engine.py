"""Running the analyzers: which can run with the kinds the sources provide (istioctl skips an
analyzer whose input collections are missing), then istioctl's filtering of what they found
(namespace, `--suppress`, the `galley.istio.io/analyze-suppress` annotation), sorted and
deduplicated (istio/istio pkg/config/analysis/local/istiod_analyze.go `filterMessages`,
diag/messages.go `SortedDedupedCopy`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ztunnel.analyze import (
    ambient,
    authz,
    conditions,
    destinationrule,
    schema,
    service,
    virtualservice,
)
from ztunnel.analyze.context import ISTIO_KINDS, Analyzer, Context
from ztunnel.analyze.messages import Message, sorted_deduped
from ztunnel.meshconfig.load import ConfigSet
from ztunnel.meshconfig.resource import ResourceError

ALL: tuple[Analyzer, ...] = (
    *schema.ANALYZERS,
    *virtualservice.ANALYZERS,
    *destinationrule.ANALYZERS,
    *service.ANALYZERS,
    *authz.ANALYZERS,
    *ambient.ANALYZERS,
    *conditions.ANALYZERS,
)


@dataclass(frozen=True, slots=True)
class Suppression:
    """`--suppress CODE=RESOURCE`: RESOURCE as istioctl names it (`Kind namespace/name`, or
    the older `Kind name.namespace` of its help text), `*` matching any run of characters."""

    code: str
    resource: str

    @classmethod
    def parse(cls, text: str) -> Suppression:
        parts = text.split("=")
        if len(parts) != 2:
            raise ValueError(f"{text} is not a valid suppression value. See ztunnel analyze --help")
        return cls(parts[0], parts[1])

    def matches(self, m: Message) -> bool:
        r = m.resource
        if r is None or m.code != self.code:
            return False
        dotted = f"{r.kind} {r.name}.{r.namespace}" if r.namespace else r.friendly_name
        return glob(self.resource, r.friendly_name) or glob(self.resource, dotted)


def glob(pattern: str, subject: str) -> bool:
    """ryanuber/go-glob: `*` matches any run of characters (also none); nothing else is
    special."""
    parts = pattern.split("*")
    if len(parts) == 1:
        return pattern == subject
    if not subject.startswith(parts[0]) or not subject.endswith(parts[-1]):
        return False
    pos = len(parts[0])
    end = len(subject) - len(parts[-1])
    for middle in parts[1:-1]:
        found = subject.find(middle, pos, end)
        if found < 0:
            return False
        pos = found + len(middle)
    return pos <= end


@dataclass
class Result:
    messages: list[Message]  # filtered, sorted, deduplicated
    executed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def available_kinds(cs: ConfigSet, listed: Iterable[str] = ()) -> frozenset[str]:
    """Istio's and the Gateway API's kinds are always there for files (an empty collection
    is still a collection); Services, Pods, Namespaces and workloads only when the input has
    some (istioctl does not read those from files at all, and skips the analyzers that need
    them), or when the cluster listed them."""
    kinds = set(ISTIO_KINDS) | set(listed)
    for name, present in (
        ("Service", cs.services),
        ("Pod", cs.pods),
        ("Namespace", cs.namespaces),
        ("Workload", cs.workloads),
    ):
        if present:
            kinds.add(name)
    return frozenset(kinds)


def keep(m: Message, namespace: str | None, suppressions: Sequence[Suppression]) -> bool:
    r = m.resource
    if r is None:
        return True
    if namespace is not None and r.origin_namespace and r.origin_namespace != namespace:
        return False
    if r.suppress and any(code in ("*", m.code) for code in r.suppress.split(",")):
        return False
    return not any(s.matches(m) for s in suppressions)


def analyze(
    cs: ConfigSet,
    available: frozenset[str],
    *,
    parse_errors: Sequence[ResourceError] = (),
    namespace: str | None = None,
    suppressions: Sequence[Suppression] = (),
    analyzers: Sequence[Analyzer] = ALL,
) -> Result:
    """Run the analyzers that can run; `namespace` None analyzes all namespaces."""
    ctx = Context(cs, available, list(parse_errors))
    result = Result([])
    for a in analyzers:
        if a.missing(available):
            result.skipped.append(a.name)
            continue
        result.executed.append(a.name)
        a.run(ctx)
    kept = [m for m in ctx.messages if keep(m, namespace, suppressions)]
    result.messages = sorted_deduped(kept)
    return result
