"""Field parsers shared by the local-config and Istio-resource readers: each takes the value and
its path in the file, and raises `ConfigError` naming that path when the value is bad.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any

from ztunnel.authz.policy import IPNetwork, ServiceAccountMatch, StringMatch
from ztunnel.errors import ConfigError


class Ctx:
    """The file being read, and where warnings go (None: dropped)."""

    def __init__(self, source: str, warnings: list[str] | None) -> None:
        self.source = source
        self.warnings = warnings

    def fail(self, path: str, reason: str) -> ConfigError:
        return ConfigError(self.source, path, reason)

    def warn(self, path: str, message: str) -> None:
        if self.warnings is not None:
            self.warnings.append(
                f"{self.source}: {path}: {message}" if path else f"{self.source}: {message}"
            )


def mapping(ctx: Ctx, value: Any, path: str, *, required: bool = False) -> Mapping[str, Any]:
    if value is None:
        if required:
            raise ctx.fail(path, "must not be null")
        return {}
    if not isinstance(value, Mapping):
        raise ctx.fail(path, f"expected a mapping, got {type(value).__name__}")
    return value


def seq(ctx: Ctx, value: Any, path: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ctx.fail(path, f"expected a list, got {type(value).__name__}")
    return value


def check_keys(ctx: Ctx, obj: Mapping[str, Any], allowed: Iterable[str], path: str) -> None:
    """Unknown keys are errors: a misspelt field would otherwise silently widen a policy."""
    unknown = sorted(str(k) for k in obj if k not in set(allowed))
    if unknown:
        raise ctx.fail(
            f"{path}.{unknown[0]}" if path else unknown[0],
            f"unknown field (allowed: {', '.join(sorted(allowed))})",
        )


def string(ctx: Ctx, value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise ctx.fail(path, f"expected a string, got {type(value).__name__}")
    if not value:
        raise ctx.fail(path, "must not be empty")
    return value


def string_list(ctx: Ctx, value: Any, path: str) -> list[str]:
    return [string(ctx, v, f"{path}[{i}]") for i, v in enumerate(seq(ctx, value, path))]


def pattern(ctx: Ctx, value: Any, path: str) -> StringMatch:
    """Istio's string form (`*`, `prefix*`, `*suffix`, exact). A `*` anywhere else would be
    compared literally by Istio and never match a real peer, which silently disables a DENY:
    we refuse it."""
    text = string(ctx, value, path)
    stars = text.count("*")
    if stars > 1 or (stars == 1 and not (text.startswith("*") or text.endswith("*"))):
        raise ctx.fail(path, f"'*' is only allowed alone, as a prefix or as a suffix: {text!r}")
    return StringMatch.from_pattern(text)


def string_match(ctx: Ctx, value: Any, path: str) -> StringMatch:
    """A pattern string, or `{exact|prefix|suffix: s}` / `{presence: {}}` (any key case)."""
    if isinstance(value, str):
        return pattern(ctx, value, path)
    if not isinstance(value, Mapping):
        raise ctx.fail(path, "expected a string or a mapping with exact/prefix/suffix/presence")
    if len(value) != 1:
        raise ctx.fail(path, "needs exactly one of exact, prefix, suffix, presence")
    ((key, inner),) = value.items()
    kind = str(key).lower()
    if kind == "presence":
        if inner not in (None, {}, [], True):
            raise ctx.fail(f"{path}.{key}", "presence takes no value ({})")
        return StringMatch.presence()
    if kind not in ("exact", "prefix", "suffix"):
        raise ctx.fail(f"{path}.{key}", "expected exact, prefix, suffix or presence")
    text = string(ctx, inner, f"{path}.{key}")
    if kind == "exact":
        return StringMatch.exact(text)
    if kind == "prefix":
        return StringMatch.prefix(text)
    return StringMatch.suffix(text)


def network(ctx: Ctx, value: Any, path: str) -> IPNetwork:
    """An address (a /32 or /128) or a CIDR, IPv4 or IPv6; host bits are masked off, as
    Go's netip.Prefix matching does in istiod/ztunnel."""
    text = string(ctx, value, path)
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ctx.fail(path, f"not an IP address or CIDR: {text!r}") from None


def port(ctx: Ctx, value: Any, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ctx.fail(path, f"expected a port number, got {type(value).__name__}")
    if isinstance(value, str) and not value.isdigit():
        raise ctx.fail(path, f"not a port number: {value!r}")
    number = int(value)
    if not 1 <= number <= 65535:
        raise ctx.fail(path, f"port out of range 1-65535: {number}")
    return number


def service_account(
    ctx: Ctx, value: Any, path: str, default_namespace: str | None
) -> ServiceAccountMatch:
    """`namespace/name`, or a bare `name` in `default_namespace` (Istio's rule for
    `serviceAccounts` in an AuthorizationPolicy: the policy's namespace), or
    `{namespace, serviceAccount}`."""
    if isinstance(value, Mapping):
        check_keys(ctx, value, ("namespace", "serviceAccount"), path)
        return ServiceAccountMatch(
            string(ctx, value.get("namespace"), f"{path}.namespace"),
            string(ctx, value.get("serviceAccount"), f"{path}.serviceAccount"),
        )
    text = string(ctx, value, path)
    ns, sep, sa = text.partition("/")
    if not sep:
        if default_namespace is None:
            raise ctx.fail(path, f"expected 'namespace/serviceAccount', got {text!r}")
        ns, sa = default_namespace, text
    if not ns or not sa or "/" in sa or "*" in text:
        raise ctx.fail(
            path, f"expected 'namespace/serviceAccount' or 'serviceAccount', got {text!r}"
        )
    return ServiceAccountMatch(ns, sa)
