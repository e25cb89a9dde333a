"""Settings of `ztunnel run`: each one a flag and, where Istio ztunnel has one, the same
environment variable. Parsed once into a frozen `Settings`; errors name the flag/variable."""

from __future__ import annotations

import argparse
import ipaddress
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from ztunnel.errors import ConfigError
from ztunnel.identity import DEFAULT_TRUST_DOMAIN


@dataclass(frozen=True, slots=True)
class Settings:
    node_name: str = "local"
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    cluster_id: str = "Kubernetes"
    local_xds_path: str = ""
    xds_address: str = ""
    ca_address: str = ""
    ca_dir: str = ""
    # istiod and its CA (ztunnel.xds.config reads these; names and defaults as Istio's ztunnel)
    xds_root_ca: str = "./var/run/secrets/istio/root-cert.pem"
    ca_root_ca: str = "./var/run/secrets/istio/root-cert.pem"
    auth_token: str = ""
    alt_xds_hostname: str = ""
    alt_ca_hostname: str = ""
    secret_ttl: str = "24h"
    pod_name: str = ""
    pod_namespace: str = ""
    instance_ip: str = ""
    capture: str = "none"  # none | ebpf | tproxy
    outbound_port: int = 15001
    inbound_plaintext_port: int = 15006
    hbone_port: int = 15008
    socks5_port: int = 15080
    socks5_address: str = "127.0.0.1"
    admin_port: int = 15000
    admin_address: str = "127.0.0.1"
    stats_port: int = 15020
    readiness_port: int = 15021
    status_address: str = "127.0.0.1"
    log_format: str = "text"
    log_level: str = "info"
    connect_timeout: float = 10.0
    drain_timeout: float = 10.0
    pool_idle_timeout: float = 300.0
    allow_tls12: bool = False
    event_loop: str = "uvloop"  # uvloop | asyncio
    bind_source_ip: bool = True
    reload_interval: float = 1.0
    # eBPF capture (only with capture=ebpf)
    bpf_pin_dir: str = "/sys/fs/bpf/ztunnel"
    uplink: str = ""
    node_ip: str = ""
    fail_open: bool = False
    enrolment_socket: str = "/var/run/ztunnel/ztunnel.sock"
    state_dir: str = "/var/run/ztunnel"
    capture_attach: str = "auto"  # auto | tcx | cls_bpf
    capture_allow_ahead: str = ""  # program names accepted ahead of ours, or "*"
    capture_check_interval: float = 1.0
    capture_tc_priority: int = 1
    # Limits and protections (ztunnel.admission, ztunnel.hbone.limits; README)
    max_connections: int = 0  # 0: derived from the open-file limit
    max_pending_handshakes: int = 512
    max_pending_handshakes_per_source: int = 64
    max_connections_per_identity: int = 1024
    hbone_handshake_timeout: float = 5.0
    h2_limit_window: float = 10.0
    h2_max_resets: int = 200
    h2_max_control_frames: int = 1000
    h2_max_header_list_size: int = 16384
    # Worker processes sharing the listeners (ztunnel.workers); 0: the CPUs the agent may use
    workers: int = 0

    @property
    def own_ports(self) -> frozenset[int]:
        return frozenset({self.outbound_port, self.inbound_plaintext_port, self.hbone_port})


# (field, flag, env var, help)
_SPEC: list[tuple[str, str, str, str]] = [
    (
        "node_name",
        "--node-name",
        "NODE_NAME",
        "this agent's node; workloads with this node are local",
    ),
    ("trust_domain", "--trust-domain", "TRUST_DOMAIN", "SPIFFE trust domain of the mesh"),
    (
        "cluster_id",
        "--cluster-id",
        "CLUSTER_ID",
        "cluster id (telemetry, istiod and CA requests; ISTIO_META_CLUSTER_ID wins)",
    ),
    (
        "local_xds_path",
        "--local-xds",
        "LOCAL_XDS_PATH",
        "mesh state file or directory (YAML), reloaded on change",
    ),
    (
        "xds_address",
        "--xds-address",
        "XDS_ADDRESS",
        "istiod's delta xDS address (https://HOST:PORT; port 15012 by default)",
    ),
    (
        "ca_address",
        "--ca-address",
        "CA_ADDRESS",
        "Istio CA address for workload certificates (https://HOST:PORT)",
    ),
    (
        "ca_dir",
        "--ca-dir",
        "ZTUNNEL_CA_DIR",
        "act as our own CA with the cacerts in this directory",
    ),
    (
        "xds_root_ca",
        "--xds-root-ca",
        "XDS_ROOT_CA",
        "root certificate istiod's serving certificate must chain to: a file, PEM text, or SYSTEM",
    ),
    (
        "ca_root_ca",
        "--ca-root-ca",
        "CA_ROOT_CA",
        "root certificate of the CA's serving certificate: a file, PEM text, or SYSTEM",
    ),
    (
        "auth_token",
        "--auth-token",
        "AUTH_TOKEN",
        "service-account token for istiod: a file (re-read when it changes) or the token itself; "
        "default ./var/run/secrets/tokens/istio-token when it exists",
    ),
    (
        "alt_xds_hostname",
        "--alt-xds-hostname",
        "ALT_XDS_HOSTNAME",
        "name to verify istiod's certificate against instead of the address' host",
    ),
    (
        "alt_ca_hostname",
        "--alt-ca-hostname",
        "ALT_CA_HOSTNAME",
        "name to verify the CA's certificate against instead of the address' host",
    ),
    (
        "secret_ttl",
        "--secret-ttl",
        "SECRET_TTL",
        "requested workload certificate lifetime (e.g. 24h, 90m, 3600s)",
    ),
    ("pod_name", "--pod-name", "POD_NAME", "this agent's pod name (xDS node id)"),
    ("pod_namespace", "--pod-namespace", "POD_NAMESPACE", "this agent's namespace (xDS node id)"),
    ("instance_ip", "--instance-ip", "INSTANCE_IP", "this agent's pod IP (xDS node id)"),
    (
        "capture",
        "--capture",
        "ZTUNNEL_CAPTURE",
        "traffic capture: none (listen on each local workload IP), ebpf, or tproxy (the ebpf "
        "listeners without BPF: the node's TPROXY rules are installed by someone else, e.g. the "
        "benchmark)",
    ),
    ("outbound_port", "--outbound-port", "ZTUNNEL_OUTBOUND_PORT", "outbound capture port"),
    (
        "inbound_plaintext_port",
        "--inbound-plaintext-port",
        "ZTUNNEL_INBOUND_PLAINTEXT_PORT",
        "inbound plaintext capture port",
    ),
    (
        "hbone_port",
        "--hbone-port",
        "ZTUNNEL_HBONE_PORT",
        "inbound HBONE port, also dialed on peers",
    ),
    (
        "socks5_port",
        "--socks5-port",
        "ZTUNNEL_SOCKS5_PORT",
        "SOCKS5 outbound entry port (0 disables)",
    ),
    ("socks5_address", "--socks5-address", "ZTUNNEL_SOCKS5_ADDRESS", "SOCKS5 listen address"),
    ("admin_port", "--admin-port", "ZTUNNEL_ADMIN_PORT", "admin API port (0 disables)"),
    (
        "admin_address",
        "--admin-address",
        "ZTUNNEL_ADMIN_ADDRESS",
        "admin API address (localhost only)",
    ),
    ("stats_port", "--stats-port", "ZTUNNEL_STATS_PORT", "Prometheus metrics port (0 disables)"),
    ("readiness_port", "--readiness-port", "ZTUNNEL_READINESS_PORT", "readiness port (0 disables)"),
    (
        "status_address",
        "--status-address",
        "ZTUNNEL_STATUS_ADDRESS",
        "address of the metrics and readiness listeners",
    ),
    ("log_format", "--log-format", "LOG_FORMAT", "access/agent log format: text or json"),
    ("log_level", "--log-level", "LOG_LEVEL", "log level: debug, info, warning, error"),
    (
        "connect_timeout",
        "--connect-timeout",
        "ZTUNNEL_CONNECT_TIMEOUT",
        "seconds to wait for an upstream connect or CONNECT answer",
    ),
    (
        "drain_timeout",
        "--drain-timeout",
        "TERMINATION_GRACE_PERIOD_SECONDS",
        "grace period for open connections on SIGTERM",
    ),
    (
        "pool_idle_timeout",
        "--pool-idle-timeout",
        "POOL_UNUSED_RELEASE_TIMEOUT",
        "seconds before an idle HBONE connection is released",
    ),
    ("allow_tls12", "--allow-tls12", "ZTUNNEL_ALLOW_TLS12", "also accept TLS 1.2 for HBONE"),
    ("event_loop", "--event-loop", "ZTUNNEL_EVENT_LOOP", "asyncio event loop: uvloop or asyncio"),
    (
        "bind_source_ip",
        "--bind-source-ip",
        "ZTUNNEL_BIND_SOURCE_IP",
        "open outbound HBONE from the source workload's IP",
    ),
    (
        "reload_interval",
        "--reload-interval",
        "ZTUNNEL_RELOAD_INTERVAL",
        "seconds between checks of the mesh state file",
    ),
    (
        "bpf_pin_dir",
        "--bpf-pin-dir",
        "ZTUNNEL_BPF_PIN_DIR",
        "bpffs directory for pinned capture maps (ebpf)",
    ),
    ("uplink", "--uplink", "ZTUNNEL_UPLINK", "node interface towards other nodes (ebpf)"),
    ("node_ip", "--node-ip", "ZTUNNEL_NODE_IP", "the node's own address, never captured (ebpf)"),
    (
        "fail_open",
        "--fail-open",
        "ZTUNNEL_FAIL_OPEN",
        "let enrolled pods' traffic pass uncaptured while no agent runs (ebpf)",
    ),
    (
        "enrolment_socket",
        "--enrolment-socket",
        "ZTUNNEL_ENROLMENT_SOCKET",
        "Unix socket of the enrolment API (ebpf)",
    ),
    (
        "state_dir",
        "--state-dir",
        "ZTUNNEL_STATE_DIR",
        "directory for the agent's small state files (ebpf)",
    ),
    (
        "capture_attach",
        "--capture-attach",
        "ZTUNNEL_CAPTURE_ATTACH",
        "how the capture programs are attached: auto (tcx links on Linux 6.6+, else cls_bpf), "
        "tcx, or cls_bpf (the first tc priority; also on a tcx kernel) (ebpf)",
    ),
    (
        "capture_allow_ahead",
        "--capture-allow-ahead",
        "ZTUNNEL_CAPTURE_ALLOW_AHEAD",
        "accept the risk of these programs running ahead of the capture (comma-separated BPF "
        "program names or tc filter kinds, or *): their pods stay captured instead of being "
        "refused (ebpf)",
    ),
    (
        "capture_tc_priority",
        "--capture-tc-priority",
        "ZTUNNEL_CAPTURE_TC_PRIORITY",
        "tc priority of the capture filters in cls_bpf mode (1 runs first) (ebpf)",
    ),
    (
        "capture_check_interval",
        "--capture-check-interval",
        "ZTUNNEL_CAPTURE_CHECK_INTERVAL",
        "seconds between checks for programs running ahead of the capture (ebpf)",
    ),
    (
        "max_connections",
        "--max-connections",
        "ZTUNNEL_MAX_CONNECTIONS",
        "connections held at once (accepted sockets and inbound HBONE streams); more are shed; 0 = (open-file limit - 512) / 2",
    ),
    (
        "max_pending_handshakes",
        "--max-pending-handshakes",
        "ZTUNNEL_MAX_PENDING_HANDSHAKES",
        "HBONE TLS handshakes in progress at once",
    ),
    (
        "max_pending_handshakes_per_source",
        "--max-pending-handshakes-per-source",
        "ZTUNNEL_MAX_PENDING_HANDSHAKES_PER_SOURCE",
        "HBONE TLS handshakes in progress from one source address",
    ),
    (
        "max_connections_per_identity",
        "--max-connections-per-identity",
        "ZTUNNEL_MAX_CONNECTIONS_PER_IDENTITY",
        "inbound HBONE connections of one peer identity",
    ),
    (
        "hbone_handshake_timeout",
        "--hbone-handshake-timeout",
        "ZTUNNEL_HBONE_HANDSHAKE_TIMEOUT",
        "seconds from accept to a verified HBONE peer",
    ),
    (
        "h2_limit_window",
        "--h2-limit-window",
        "ZTUNNEL_H2_LIMIT_WINDOW",
        "seconds of the window the HTTP/2 frame limits count in",
    ),
    (
        "h2_max_resets",
        "--h2-max-resets",
        "ZTUNNEL_H2_MAX_RESETS",
        "stream resets (received or refused) per HBONE connection and window before GOAWAY ENHANCE_YOUR_CALM",
    ),
    (
        "h2_max_control_frames",
        "--h2-max-control-frames",
        "ZTUNNEL_H2_MAX_CONTROL_FRAMES",
        "SETTINGS, PING, PRIORITY, closed-stream, empty DATA or unknown frames (each) per HBONE connection and window",
    ),
    (
        "h2_max_header_list_size",
        "--h2-max-header-list-size",
        "ZTUNNEL_H2_MAX_HEADER_LIST_SIZE",
        "bytes of one HBONE request's or response's header block",
    ),
    (
        "workers",
        "--workers",
        "ZTUNNEL_WORKERS",
        "worker processes sharing the listeners (ebpf/tproxy capture); 0 = the CPUs the agent may use (CPU affinity, cgroup cpu.max quota)",
    ),
]

# Further environment variables for a setting, tried before the main one (Istio's ztunnel
# prefers ISTIO_META_CLUSTER_ID over CLUSTER_ID).
_ENV_FIRST: dict[str, tuple[str, ...]] = {"cluster_id": ("ISTIO_META_CLUSTER_ID",)}

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = Settings()
    for name, flag, env, help_text in _SPEC:
        default = getattr(defaults, name)
        if isinstance(default, bool):
            parser.add_argument(
                flag,
                dest=name,
                default=None,
                nargs="?",
                const="true",
                metavar="BOOL",
                help=f"{help_text} [env {env}; default {default}]",
            )
        else:
            parser.add_argument(
                flag, dest=name, default=None, help=f"{help_text} [env {env}; default {default!r}]"
            )


def convert_value(name: str, raw: str, kind: type, where: str) -> Any:
    """One flag or environment value as the type of its setting's default (bool, int, float,
    str); `where` names the flag or variable in the error. Shared with the waypoint's settings."""
    try:
        if kind is bool:
            v = raw.strip().lower()
            if v in _TRUE:
                return True
            if v in _FALSE:
                return False
            raise ValueError("expected true or false")
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        return raw
    except ValueError as e:
        raise ConfigError(where, name, f"bad value {raw!r}: {e}") from None


def settings_from(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Settings:
    """Flags win over environment variables, which win over defaults; validated."""
    environ = os.environ if environ is None else environ
    defaults = Settings()
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    by_name = {f.name: f for f in fields(Settings)}
    for name, flag, env, _ in _SPEC:
        kind = type(getattr(defaults, name))
        raw = getattr(args, name, None)
        where = flag
        for name_env in (*_ENV_FIRST.get(name, ()), env):
            if raw is None and name_env in environ:
                raw, where = environ[name_env], f"environment variable {name_env}"
        if raw is None:
            continue
        values[name] = convert_value(name, str(raw), kind, where)
        origins[name] = where
    assert set(values) <= set(by_name)
    s = Settings(**values)
    try:
        validate(s)
    except ConfigError as e:
        # Name what the user set: the flag or environment variable the bad value came from.
        raise ConfigError(
            origins.get(e.path, _describe_setting(e.path)), e.path, e.reason
        ) from None
    return s


def _describe_setting(name: str) -> str:
    for field_name, flag, env, _ in _SPEC:
        if field_name == name:
            return f"{flag} (env {env})"
    return "settings"


def validate(s: Settings) -> None:
    ports = {
        "outbound_port": s.outbound_port,
        "inbound_plaintext_port": s.inbound_plaintext_port,
        "hbone_port": s.hbone_port,
        "socks5_port": s.socks5_port,
        "admin_port": s.admin_port,
        "stats_port": s.stats_port,
        "readiness_port": s.readiness_port,
    }
    for name, port in ports.items():
        if not 0 <= port <= 65535:
            raise ConfigError("settings", name, f"port out of range: {port}")
    if s.capture not in ("none", "ebpf", "tproxy"):
        raise ConfigError("settings", "capture", f"must be none, ebpf or tproxy, got {s.capture!r}")
    if s.log_format not in ("text", "json"):
        raise ConfigError("settings", "log_format", f"must be text or json, got {s.log_format!r}")
    if s.event_loop not in ("uvloop", "asyncio"):
        raise ConfigError("settings", "event_loop", "must be uvloop or asyncio")
    if s.log_level.lower() not in ("debug", "info", "warning", "warn", "error"):
        raise ConfigError("settings", "log_level", f"unknown level {s.log_level!r}")
    for name in ("socks5_address", "admin_address", "status_address"):
        try:
            ipaddress.ip_address(getattr(s, name))
        except ValueError:
            raise ConfigError(
                "settings", name, f"not an IP address: {getattr(s, name)!r}"
            ) from None
    if s.node_ip:
        try:
            ipaddress.ip_address(s.node_ip)
        except ValueError:
            raise ConfigError("settings", "node_ip", f"not an IP address: {s.node_ip!r}") from None
    if not s.local_xds_path and not s.xds_address:
        raise ConfigError(
            "settings",
            "local_xds_path",
            "no mesh state: give --local-xds FILE (LOCAL_XDS_PATH) or --xds-address "
            "(XDS_ADDRESS) of istiod",
        )
    if s.local_xds_path and s.xds_address:
        raise ConfigError(
            "settings",
            "xds_address",
            "give either istiod (--xds-address) or a mesh state file (--local-xds), not both",
        )
    if s.ca_dir and s.ca_address:
        raise ConfigError(
            "settings",
            "ca_address",
            "give either the Istio CA (--ca-address) or a local CA (--ca-dir), not both",
        )
    if not s.ca_dir and not s.ca_address:
        raise ConfigError(
            "settings",
            "ca_dir",
            "no certificate source: give --ca-address (CA_ADDRESS) of the Istio CA, or "
            "--ca-dir DIR (ztunnel ca init --dir DIR)",
        )
    from ztunnel.xds.config import validate_istiod_settings  # the istiod-specific fields

    validate_istiod_settings(s)
    for name in ("connect_timeout", "drain_timeout", "pool_idle_timeout", "reload_interval"):
        if getattr(s, name) <= 0:
            raise ConfigError("settings", name, "must be positive")
    validate_capture(s)
    validate_limits(s)
    if not 0 <= s.workers <= 1024:
        raise ConfigError("settings", "workers", "must be 0 (automatic) or 1..1024")


def validate_capture(s: Settings) -> None:
    """The eBPF capture's own settings (ztunnel.capture.ordering has the details)."""
    if s.capture_attach not in ("auto", "tcx", "cls_bpf"):
        raise ConfigError(
            "settings", "capture_attach", f"must be auto, tcx or cls_bpf, got {s.capture_attach!r}"
        )
    if not 1 <= s.capture_tc_priority <= 0xFFFF:
        raise ConfigError("settings", "capture_tc_priority", "must be in 1..65535")
    if not 0.05 <= s.capture_check_interval <= 3600:
        raise ConfigError(
            "settings", "capture_check_interval", "must be between 0.05 and 3600 seconds"
        )
    for name in s.capture_allow_ahead.split(","):
        name = name.strip()
        if name and (len(name) > 64 or not name.isprintable() or " " in name):
            raise ConfigError("settings", "capture_allow_ahead", f"not a program name: {name!r}")


def validate_limits(s: Settings) -> None:
    """The limits and protections (README: Limits and protections)."""
    for name in ("hbone_handshake_timeout", "h2_limit_window"):
        if not getattr(s, name) > 0:
            raise ConfigError("settings", name, "must be positive")
    for name in (
        "max_pending_handshakes",
        "max_pending_handshakes_per_source",
        "max_connections_per_identity",
        "h2_max_resets",
        "h2_max_control_frames",
    ):
        if getattr(s, name) < 1:
            raise ConfigError("settings", name, "must be at least 1")
    if s.max_connections < 0:
        raise ConfigError("settings", "max_connections", "must be 0 (automatic) or positive")
    if s.max_pending_handshakes_per_source > s.max_pending_handshakes:
        raise ConfigError(
            "settings",
            "max_pending_handshakes_per_source",
            f"cannot exceed max_pending_handshakes ({s.max_pending_handshakes})",
        )
    if not 1024 <= s.h2_max_header_list_size <= 1024 * 1024:
        raise ConfigError(
            "settings", "h2_max_header_list_size", "must be between 1024 and 1048576 bytes"
        )


def describe(argv: Sequence[str] | None = None) -> list[tuple[str, str, str]]:
    """(flag, env, help) for every setting: the documentation table."""
    return [(flag, env, h) for _, flag, env, h in _SPEC]
