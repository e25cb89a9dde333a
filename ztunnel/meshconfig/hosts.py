"""Hostnames as Istio treats them: short names resolved against the resource's namespace,
wildcards (`*.example.com`, `*`), and the most specific match among candidates
(istio/istio pilot/pkg/model/config.go `ResolveShortnameToFQDN`, `MostSpecificHostMatch`)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

DEFAULT_DOMAIN = "cluster.local"


def resolve_host(host: str, namespace: str, domain: str = DEFAULT_DOMAIN) -> str:
    """`reviews` in namespace `shop` -> `reviews.shop.svc.cluster.local`; names with a dot,
    `*` and IP addresses stay as written."""
    if not host or host == "*" or "." in host:
        return host
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    return f"{host}.{namespace}.svc.{domain}" if namespace else host


def host_matches(pattern: str, hostname: str) -> bool:
    """Does a (possibly wildcard) host pattern cover a concrete hostname? `*` covers all;
    `*.example.com` covers `a.example.com` and `a.b.example.com` but not `example.com`."""
    if pattern == "*":
        return True
    if pattern.startswith("*"):
        return hostname.endswith(pattern[1:]) and len(hostname) > len(pattern) - 1
    return pattern == hostname


def is_wildcard(host: str) -> bool:
    return host.startswith("*")


def most_specific(hostname: str, candidates: Iterable[str]) -> str | None:
    """The candidate host that covers `hostname` most specifically: an exact match, else the
    longest wildcard that covers it."""
    best: str | None = None
    for c in candidates:
        if c == hostname:
            return c
        if is_wildcard(c) and host_matches(c, hostname) and (best is None or len(c) > len(best)):
            best = c
    return best


def strip_port(authority: str) -> str:
    """`host:80` -> `host`; `[::1]:80` -> `::1`; bare hosts unchanged."""
    if authority.startswith("["):
        end = authority.find("]")
        return authority[1:end] if end > 0 else authority
    host, sep, port = authority.rpartition(":")
    if sep and port.isdigit() and ":" not in host:
        return host
    return authority
