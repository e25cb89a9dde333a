"""HBONE request headers: `:authority`, `baggage`, `forwarded`, `traceparent` (shared/WIRE.md)."""

from __future__ import annotations

import ipaddress
import secrets
from dataclasses import dataclass

from ztunnel.errors import HboneError
from ztunnel.model import IPAddress, Workload


def format_authority(ip: IPAddress, port: int) -> str:
    """`ip:port`, IPv6 in brackets (RFC 3986 section 3.2.2)."""
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def parse_authority(authority: str) -> tuple[IPAddress, int]:
    """`ip:port` -> (ip, port); anything else -> HboneError(400)."""
    host, sep, port_s = authority.rpartition(":")
    if not sep or not (port_s.isascii() and port_s.isdigit()):
        raise HboneError(f"bad authority {authority!r}: expected ip:port", 400)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        v6 = True
    else:
        v6 = False
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise HboneError(f"bad authority {authority!r}: host is not an IP address", 400) from None
    if ip.version == 6 and not v6:
        raise HboneError(f"bad authority {authority!r}: IPv6 must be bracketed", 400)
    if ip.version == 4 and v6:
        raise HboneError(f"bad authority {authority!r}: only IPv6 is bracketed", 400)
    port = int(port_s)
    if not 0 < port < 65536:
        raise HboneError(f"bad authority {authority!r}: port out of range", 400)
    return ip, port


def baggage_for(w: Workload | None, cluster: str = "") -> str:
    """W3C baggage with the source workload's Kubernetes facts; empty values are omitted."""
    if w is None:
        return ""
    items = [
        ("k8s.cluster.name", w.cluster_id or cluster),
        ("k8s.namespace.name", w.namespace),
        (f"k8s.{w.workload_type or 'pod'}.name", w.workload_name or w.name),
        ("service.name", w.canonical_name),
        ("service.version", w.canonical_revision),
    ]
    return ",".join(f"{k}={v}" for k, v in items if v)


def parse_baggage(value: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in value.split(","):
        k, sep, v = item.strip().partition("=")
        if sep and k:
            out[k.strip()] = v.split(";", 1)[0].strip()
    return out


def forwarded_for(client_ip: IPAddress, client_port: int, service_host: str = "") -> str:
    """RFC 7239 `for="ip:port"` (quoted because of the colon), plus `host=` via a service."""
    value = f'for="{format_authority(client_ip, client_port)}"'
    if service_host:
        value += f";host={service_host}"
    return value


def new_traceparent() -> str:
    """W3C trace-context `00-<trace id>-<parent id>-00`, random per connection."""
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-00"


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """What the client asks for on an HBONE stream."""

    authority: str
    baggage: str = ""
    forwarded: str = ""
    traceparent: str = ""

    def header_list(self) -> list[tuple[bytes, bytes]]:
        hdrs = [(b":method", b"CONNECT"), (b":authority", self.authority.encode())]
        for name, value in (
            (b"baggage", self.baggage),
            (b"forwarded", self.forwarded),
            (b"traceparent", self.traceparent),
        ):
            if value:
                hdrs.append((name, value.encode()))
        return hdrs
