"""Settings of `ztunnel-waypoint` / `ztunnel waypoint run`: each a flag and an environment
variable, parsed once into a frozen `WaypointSettings`; errors name the flag."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from typing import Any

from ztunnel.config import convert_value
from ztunnel.errors import ConfigError
from ztunnel.identity import DEFAULT_TRUST_DOMAIN


@dataclass(frozen=True)
class WaypointSettings:
    name: str = "waypoint"
    namespace: str = "default"
    service_account: str = ""  # default: the name (as Istio's waypoint deployments)
    hostname: str = ""  # default: <name>.<namespace>.svc.<domain>
    addresses: tuple[str, ...] = ()
    waypoint_for: str = "service"
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    domain: str = "cluster.local"
    root_namespace: str = "istio-system"
    dr_inheritance: bool = False
    local_xds_path: str = ""
    config_paths: tuple[str, ...] = ()
    ca_dir: str = ""
    hbone_address: str = "0.0.0.0"
    hbone_port: int = 15008
    peer_hbone_port: int = 15008
    stats_address: str = "0.0.0.0"
    stats_port: int = 15020
    otlp_endpoint: str = ""
    otlp_protocol: str = "http/protobuf"
    trace_sampling: float = 100.0
    log_format: str = "text"
    log_level: str = "info"
    reload_interval: float = 1.0
    drain_timeout: float = 5.0
    connect_timeout: float = 10.0
    header_timeout: float = 30.0
    idle_timeout: float = 300.0
    max_header_bytes: int = 60 * 1024
    buffer_limit: int = 1 << 20
    sniff_timeout: float = 0.3
    event_loop: str = "uvloop"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def service_hostname(self) -> str:
        return self.hostname or f"{self.name}.{self.namespace}.svc.{self.domain}"

    @property
    def account(self) -> str:
        return self.service_account or self.name


# (field, flag, env, help)
_SPEC: list[tuple[str, str, str, str]] = [
    ("name", "--name", "WAYPOINT_NAME", "the waypoint's Gateway name (targetRefs, binding)"),
    ("namespace", "--namespace", "POD_NAMESPACE", "the waypoint's namespace"),
    (
        "service_account",
        "--service-account",
        "SERVICE_ACCOUNT",
        "identity's service account (default: --name)",
    ),
    (
        "hostname",
        "--hostname",
        "WAYPOINT_HOSTNAME",
        "the waypoint service's hostname (default <name>.<namespace>.svc.<domain>)",
    ),
    (
        "addresses",
        "--address",
        "WAYPOINT_ADDRESSES",
        "an address of this waypoint (repeatable; comma-separated in the env)",
    ),
    (
        "waypoint_for",
        "--waypoint-for",
        "WAYPOINT_FOR",
        "service | workload | all | none (the Gateway's istio.io/waypoint-for label wins)",
    ),
    ("trust_domain", "--trust-domain", "TRUST_DOMAIN", "SPIFFE trust domain"),
    ("domain", "--domain", "CLUSTER_DOMAIN", "cluster DNS domain for short names"),
    (
        "root_namespace",
        "--root-namespace",
        "ISTIO_ROOT_NAMESPACE",
        "Istio's root (mesh config) namespace",
    ),
    (
        "dr_inheritance",
        "--dr-inheritance",
        "PILOT_ENABLE_DESTINATION_RULE_INHERITANCE",
        "host-less DestinationRules are inherited",
    ),
    (
        "local_xds_path",
        "--local-xds",
        "LOCAL_XDS_PATH",
        "mesh state file or directory (workloads, services), reloaded on change",
    ),
    (
        "config_paths",
        "--config",
        "WAYPOINT_CONFIG",
        "route/policy YAML files or directories (repeatable; default: --local-xds)",
    ),
    (
        "ca_dir",
        "--ca-dir",
        "ZTUNNEL_CA_DIR",
        "the built-in CA's directory (certificates for the waypoint identity)",
    ),
    ("hbone_address", "--hbone-address", "WAYPOINT_HBONE_ADDRESS", "address of the HBONE listener"),
    ("hbone_port", "--hbone-port", "WAYPOINT_HBONE_PORT", "port of the HBONE listener"),
    (
        "peer_hbone_port",
        "--peer-hbone-port",
        "PEER_HBONE_PORT",
        "HBONE port of node agents we connect to",
    ),
    ("stats_address", "--stats-address", "STATS_ADDRESS", "address of /metrics and /healthz/ready"),
    ("stats_port", "--stats-port", "STATS_PORT", "port of /metrics and /healthz/ready (0: off)"),
    (
        "otlp_endpoint",
        "--otlp-endpoint",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTLP collector for spans (empty: no export)",
    ),
    ("otlp_protocol", "--otlp-protocol", "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf | grpc"),
    ("trace_sampling", "--trace-sampling", "TRACE_SAMPLING", "percent of new traces sampled"),
    ("log_format", "--log-format", "LOG_FORMAT", "text | json"),
    ("log_level", "--log-level", "LOG_LEVEL", "debug | info | warning | error"),
    (
        "reload_interval",
        "--reload-interval",
        "RELOAD_INTERVAL",
        "seconds between checks of the files",
    ),
    ("drain_timeout", "--drain-timeout", "DRAIN_TIMEOUT", "grace period on SIGTERM"),
    ("connect_timeout", "--connect-timeout", "CONNECT_TIMEOUT", "default upstream connect timeout"),
    (
        "header_timeout",
        "--header-timeout",
        "HEADER_TIMEOUT",
        "a request head must arrive within this",
    ),
    (
        "idle_timeout",
        "--idle-timeout",
        "IDLE_TIMEOUT",
        "idle client connections are closed after this",
    ),
    (
        "max_header_bytes",
        "--max-header-bytes",
        "MAX_HEADER_BYTES",
        "largest request head (431 beyond)",
    ),
    ("buffer_limit", "--buffer-limit", "BUFFER_LIMIT", "request body kept for retries and mirrors"),
    (
        "sniff_timeout",
        "--sniff-timeout",
        "SNIFF_TIMEOUT",
        "wait this long for client bytes to detect HTTP on ports without an app protocol",
    ),
    ("event_loop", "--event-loop", "EVENT_LOOP", "uvloop | asyncio"),
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    defaults = WaypointSettings()
    for name, flag, env, text in _SPEC:
        d = getattr(defaults, name)
        if isinstance(d, tuple):
            p.add_argument(flag, dest=name, action="append", default=None, help=f"{text} [{env}]")
        elif isinstance(d, bool):
            p.add_argument(
                flag, dest=name, action="store_true", default=None, help=f"{text} [{env}]"
            )
        else:
            p.add_argument(flag, dest=name, default=None, help=f"{text} [{env}, default {d!r}]")


def settings_from(args: argparse.Namespace, env: dict[str, str] | None = None) -> WaypointSettings:
    env = dict(os.environ) if env is None else env
    defaults = WaypointSettings()
    values: dict[str, Any] = {}
    for name, flag, var, _ in _SPEC:
        raw: Any = getattr(args, name, None)
        where = flag
        if raw is None and var in env:
            raw, where = env[var], var
        if raw is None:
            continue
        d = getattr(defaults, name)
        if isinstance(d, tuple):
            items = raw if isinstance(raw, list) else str(raw).split(",")
            values[name] = tuple(s.strip() for s in items if s.strip())
        elif isinstance(raw, bool):  # a store_true flag
            values[name] = raw
        else:
            values[name] = convert_value(name, str(raw), type(d), where)
    s = WaypointSettings(**values)
    if s.waypoint_for not in ("service", "workload", "all", "none"):
        raise ConfigError("--waypoint-for", "", "must be service, workload, all or none")
    if s.otlp_protocol not in ("http/protobuf", "grpc"):
        raise ConfigError("--otlp-protocol", "", "must be http/protobuf or grpc")
    if not s.local_xds_path:
        raise ConfigError("--local-xds", "", "the mesh state file is required (LOCAL_XDS_PATH)")
    if not s.ca_dir:
        raise ConfigError(
            "--ca-dir", "", "a CA directory is required for the waypoint's certificate"
        )
    for port_name in ("hbone_port", "stats_port"):
        v = getattr(s, port_name)
        if not 0 <= v <= 65535:
            raise ConfigError(f"--{port_name.replace('_', '-')}", "", "port out of range")
    return s
