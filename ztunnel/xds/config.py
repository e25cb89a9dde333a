"""How the agent reaches istiod and its CA, read the way Istio's ztunnel reads it
(istio/ztunnel src/config.rs, src/identity/auth.rs, src/xds/client.rs): addresses, the root
certificate (`XDS_ROOT_CA`/`CA_ROOT_CA`: a file, PEM text or `SYSTEM`), the service-account
token (`AUTH_TOKEN`, default `./var/run/secrets/tokens/istio-token`), the node id and metadata
(`ISTIO_META_*`, `ISTIO_METAJSON_*`), extra headers (`XDS_HEADER_*`, `CA_HEADER_*`).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ztunnel.config import Settings
from ztunnel.errors import ConfigError, ZtunnelError

log = logging.getLogger(__name__)

DEFAULT_PORT = 15012
DEFAULT_TOKEN_PATH = "./var/run/secrets/tokens/istio-token"
SYSTEM_ROOTS = "SYSTEM"
DEFAULT_IP = "1.1.1.1"  # what ztunnel puts in the node id when INSTANCE_IP is unset
META_PREFIX = "ISTIO_META_"
METAJSON_PREFIX = "ISTIO_METAJSON_"
XDS_HEADER_PREFIX = "XDS_HEADER_"
CA_HEADER_PREFIX = "CA_HEADER_"
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s)")


class CredentialError(ZtunnelError):
    """The token or a root certificate could not be read."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A gRPC endpoint: `target` for the channel, `host` for certificate verification."""

    host: str
    port: int

    @property
    def target(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def __str__(self) -> str:
        return f"https://{self.target}"


def parse_endpoint(value: str, field: str) -> Endpoint:
    """`https://host:port`, `host:port`, `[v6]:port` or `host` (port 15012)."""
    raw = value.strip()
    if "://" in raw:
        scheme, _, raw = raw.partition("://")
        if scheme != "https":
            raise ConfigError("settings", field, f"only https:// is supported, got {value!r}")
    raw = raw.rstrip("/")
    host, port = raw, str(DEFAULT_PORT)
    if raw.startswith("["):
        end = raw.find("]")
        if end < 0:
            raise ConfigError("settings", field, f"missing ']' in {value!r}")
        host, rest = raw[1:end], raw[end + 1 :]
        if rest:
            port = rest.removeprefix(":")
    elif raw.count(":") == 1:
        host, port = raw.split(":")
    if not host or "/" in host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError("settings", field, f"expected https://HOST:PORT, got {value!r}")
    return Endpoint(host, int(port))


def parse_duration(value: str, field: str) -> float:
    """Seconds from `3600`, `3600s`, `90m`, `24h`, `1h30m` (Go-style durations)."""
    text = value.strip()
    if text.replace(".", "", 1).isdigit():
        seconds = float(text)
    else:
        pos, seconds = 0, 0.0
        for m in _DURATION.finditer(text):
            if m.start() != pos:
                break
            pos = m.end()
            seconds += float(m.group(1)) * {"h": 3600, "m": 60, "s": 1, "ms": 0.001}[m.group(2)]
        if pos != len(text) or not text:
            raise ConfigError("settings", field, f"not a duration: {value!r} (e.g. 24h, 90m)")
    if seconds <= 0:
        raise ConfigError("settings", field, "must be positive")
    return seconds


@dataclass(frozen=True, slots=True)
class RootCertSource:
    """`XDS_ROOT_CA`/`CA_ROOT_CA`: a file (re-read on every connection, so a rotated root is
    picked up), inline PEM, or the system's roots."""

    value: str

    @property
    def is_file(self) -> bool:
        return self.value != SYSTEM_ROOTS and "-----BEGIN" not in self.value

    def load(self) -> bytes | None:
        """PEM bytes, or None for the system roots."""
        if self.value == SYSTEM_ROOTS:
            return None
        if not self.is_file:
            return self.value.encode()
        try:
            data = Path(self.value).read_bytes()
        except OSError as e:
            raise CredentialError(f"root certificate {self.value}: {e.strerror}") from None
        if b"-----BEGIN CERTIFICATE-----" not in data:
            raise CredentialError(f"root certificate {self.value}: no PEM certificate in it")
        return data

    def fingerprint(self) -> tuple[int, int, int] | None:
        if not self.is_file:
            return None
        try:
            st = os.stat(self.value)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)


@dataclass(frozen=True, slots=True)
class TokenSource:
    """The Bearer token: a file (the projected service-account token, re-read when it
    changes), a static token, or none."""

    path: str = ""
    static: str = ""

    def read(self) -> str | None:
        if self.static:
            return self.static
        if not self.path:
            return None
        try:
            token = Path(self.path).read_text().strip()
        except OSError as e:
            raise CredentialError(f"token file {self.path}: {e.strerror}") from None
        if not token:
            raise CredentialError(f"token file {self.path} exists but is empty")
        return token

    def describe(self) -> str:
        if self.static:
            return "static token"
        return f"file {self.path}" if self.path else "none"


def token_source(value: str) -> TokenSource:
    """ztunnel's rules: AUTH_TOKEN naming an existing file is that file, any other value is
    the token itself; unset means the default path if it exists, else no token."""
    if not value:
        return (
            TokenSource(DEFAULT_TOKEN_PATH) if Path(DEFAULT_TOKEN_PATH).exists() else TokenSource()
        )
    if Path(value).exists():
        return TokenSource(value)
    return TokenSource(static=value)


@dataclass(frozen=True, slots=True)
class IstiodConfig:
    """Everything the xDS and CA clients need, parsed once."""

    xds: Endpoint | None
    ca: Endpoint | None
    xds_root: RootCertSource
    ca_root: RootCertSource
    token: TokenSource
    cluster_id: str
    trust_domain: str
    alt_xds_hostname: str
    alt_ca_hostname: str
    secret_ttl: float
    node_id: str
    node_metadata: tuple[tuple[str, Any], ...]
    xds_headers: tuple[tuple[str, str], ...]
    ca_headers: tuple[tuple[str, str], ...]

    def auth_metadata(self, extra: tuple[tuple[str, str], ...]) -> list[tuple[str, str]]:
        """gRPC metadata of a call: Bearer token and cluster id (when there is a token), plus
        the configured headers. The token is read now: a rotated file is picked up."""
        md: list[tuple[str, str]] = []
        token = self.token.read()
        if token is not None:
            md.append(("authorization", f"Bearer {token}"))
            md.append(("clusterid", self.cluster_id))
        md.extend(extra)
        return md


def _headers(environ: Mapping[str, str], prefix: str) -> tuple[tuple[str, str], ...]:
    out = []
    for key, value in sorted(environ.items()):
        if key.startswith(prefix) and len(key) > len(prefix):
            name = key[len(prefix) :].lower()
            out.append((name, value))
    return tuple(out)


def node_metadata(s: Settings, environ: Mapping[str, str]) -> dict[str, Any]:
    """NAME, NAMESPACE, INSTANCE_IPS, NODE_NAME, then ISTIO_META_* (prefix removed) and
    ISTIO_METAJSON_* (parsed JSON), as ztunnel builds its node metadata."""
    meta: dict[str, Any] = {
        "NAME": s.pod_name,
        "NAMESPACE": s.pod_namespace,
        "INSTANCE_IPS": s.instance_ip or DEFAULT_IP,
        "NODE_NAME": s.node_name,
    }
    for key, value in sorted(environ.items()):
        if key.startswith(META_PREFIX) and len(key) > len(META_PREFIX):
            meta[key[len(META_PREFIX) :]] = value
    meta.setdefault("CLUSTER_ID", s.cluster_id)
    for key, value in sorted(environ.items()):
        if key.startswith(METAJSON_PREFIX) and len(key) > len(METAJSON_PREFIX):
            try:
                meta[key[len(METAJSON_PREFIX) :]] = json.loads(value)
            except ValueError:
                log.error("ignoring %s: not JSON", key)
    return meta


def node_id(s: Settings) -> str:
    """`ztunnel~<ip>~<pod>.<ns>~<ns>.svc.cluster.local` (WIRE.md)."""
    ip = s.instance_ip or DEFAULT_IP
    ns = s.pod_namespace
    return f"ztunnel~{ip}~{s.pod_name}.{ns}~{ns}.svc.cluster.local"


def istiod_config(s: Settings, environ: Mapping[str, str] | None = None) -> IstiodConfig:
    environ = os.environ if environ is None else environ
    return IstiodConfig(
        xds=parse_endpoint(s.xds_address, "xds_address") if s.xds_address else None,
        ca=parse_endpoint(s.ca_address, "ca_address") if s.ca_address else None,
        xds_root=RootCertSource(s.xds_root_ca),
        ca_root=RootCertSource(s.ca_root_ca),
        token=token_source(s.auth_token),
        cluster_id=s.cluster_id,
        trust_domain=s.trust_domain,
        alt_xds_hostname=s.alt_xds_hostname,
        alt_ca_hostname=s.alt_ca_hostname,
        secret_ttl=parse_duration(s.secret_ttl, "secret_ttl"),
        node_id=node_id(s),
        node_metadata=tuple(node_metadata(s, environ).items()),
        xds_headers=_headers(environ, XDS_HEADER_PREFIX),
        ca_headers=_headers(environ, CA_HEADER_PREFIX),
    )


def validate_istiod_settings(s: Settings) -> None:
    """Called by `ztunnel.config.validate`: errors name the setting."""
    if s.xds_address:
        parse_endpoint(s.xds_address, "xds_address")
    if s.ca_address:
        parse_endpoint(s.ca_address, "ca_address")
    parse_duration(s.secret_ttl, "secret_ttl")
