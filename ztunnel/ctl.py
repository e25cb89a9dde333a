"""`ztunnel ctl`: look into a running agent through its admin API (default 127.0.0.1:15000,
`--admin ADDR:PORT`): workloads, services, policies, certificates, connections, the eBPF
capture's hooks (`ctl capture`), or the whole config dump. Tables for people by default,
`-o json` or `-o yaml` for programs.

Each read-only view is a `View` (which part of `/config_dump`, which columns); commands that
need more than a view (such as a future `ctl check`) add their own subparser in `add_parser`
and talk to the agent through `AdminClient`.
"""

from __future__ import annotations

import argparse
import functools
import http.client
import ipaddress
import json
import sys
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import yaml

from ztunnel.errors import ZtunnelError

DEFAULT_ADMIN = "127.0.0.1:15000"
TIMEOUT = 5.0


class CtlError(ZtunnelError):
    """The agent could not be asked (not reachable, bad answer)."""


def parse_admin_address(value: str) -> tuple[str, int]:
    """`HOST:PORT`, `[IPv6]:PORT` or a bare host (port 15000); an `http://` prefix is allowed."""
    addr = value.strip().removeprefix("http://").rstrip("/")
    host, port = addr, "15000"
    if addr.startswith("["):
        end = addr.find("]")
        if end < 0:
            raise CtlError(f"bad admin address {value!r}: missing ']'")
        host, rest = addr[1:end], addr[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise CtlError(f"bad admin address {value!r}")
            port = rest[1:]
    elif addr.count(":") == 1:
        host, port = addr.split(":")
    elif addr.count(":") > 1:
        try:  # a bare IPv6 address
            ipaddress.IPv6Address(addr)
        except ValueError:
            raise CtlError(f"bad admin address {value!r}: write IPv6 as [ADDR]:PORT") from None
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise CtlError(f"bad admin address {value!r}: expected HOST:PORT")
    return host, int(port)


class AdminClient:
    """A few HTTP requests to an agent's admin API; every failure is a `CtlError` that names
    the address tried."""

    def __init__(self, address: str = DEFAULT_ADMIN, timeout: float = TIMEOUT) -> None:
        self.host, self.port = parse_admin_address(address)
        self.timeout = timeout

    @property
    def where(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def request(self, method: str, path: str) -> tuple[int, bytes]:
        # http.client rather than urllib: urllib would honour http_proxy for this address.
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            conn.request(method, path, headers={"Accept": "application/json"})
            resp = conn.getresponse()
            return resp.status, resp.read()
        except (OSError, http.client.HTTPException) as e:
            reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
            raise CtlError(
                f"cannot reach the agent's admin API at {self.where}: {reason} "
                "(is the agent running? choose another with --admin ADDR:PORT)"
            ) from None
        finally:
            conn.close()

    def get_json(self, path: str) -> Any:
        status, body = self.request("GET", path)
        if status != 200:
            detail = body.decode(errors="replace").strip()
            raise CtlError(f"{self.where}{path} answered {status}: {detail}")
        try:
            return json.loads(body)
        except ValueError:
            raise CtlError(f"{self.where}{path} did not answer JSON") from None

    def config_dump(self) -> dict[str, Any]:
        dump = self.get_json("/config_dump")
        if not isinstance(dump, dict):
            raise CtlError(f"{self.where}/config_dump: unexpected answer")
        return dump


# ---- views ----

Cell = Callable[[dict[str, Any]], object]


@dataclass(frozen=True)
class View:
    name: str
    help: str
    select: Callable[[dict[str, Any]], list[dict[str, Any]]]
    columns: tuple[tuple[str, Cell], ...]


def _join(values: object) -> str:
    if isinstance(values, list | tuple):
        return ",".join(str(v) for v in values) or "-"
    return "-" if values in (None, "") else str(values)


def _gateway(value: object) -> str:
    if not isinstance(value, dict):
        return "-"
    dest = value.get("destination")
    if isinstance(dest, dict):
        host = dest.get("hostname") or dest.get("address")
        ns = dest.get("namespace")
        return f"{ns}/{host}" if ns else str(host)
    return str(dest)


def _services(dump: dict[str, Any]) -> list[dict[str, Any]]:
    """Services with their number of endpoints (the workloads that name them)."""
    counts: dict[str, int] = {}
    for wl in dump.get("workloads", []):
        for key in wl.get("services") or {}:
            counts[key] = counts.get(key, 0) + 1
    out = []
    for svc in dump.get("services", []):
        key = f"{svc.get('namespace')}/{svc.get('hostname')}"
        out.append({**svc, "endpoints": counts.get(key, 0)})
    return out


def _policies(dump: dict[str, Any]) -> list[dict[str, Any]]:
    # Policies that are not dataclasses arrive as strings; show them as a name.
    return [p if isinstance(p, dict) else {"name": str(p)} for p in dump.get("policies", [])]


def _xds(dump: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per xDS resource type, with the connection to istiod on each."""
    xds = (dump.get("istiod") or {}).get("xds")
    if not isinstance(xds, dict):
        return []
    conn = {
        "address": xds.get("address"),
        "connected_since": xds.get("connected_since") or "disconnected",
        "last_error": xds.get("last_error"),
    }
    rows = []
    for t in xds.get("types", []):
        nack = t.get("last_nack") or {}
        ack = t.get("last_ack") or {}
        rows.append(
            {
                **conn,
                **t,
                "type": str(t.get("type_url", "")).rsplit("/", 1)[-1],
                "last_ack_at": ack.get("at"),
                "last_nack_error": nack.get("error"),
            }
        )
    return rows


def _age(seconds: object) -> str:
    if not isinstance(seconds, int | float):
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60)}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60)}m"


def _get(key: str) -> Cell:
    return lambda row: _join(row.get(key))


VIEWS: tuple[View, ...] = (
    View(
        "workloads",
        "workloads of the mesh (local ones first)",
        lambda d: sorted(
            d.get("workloads", []),
            key=lambda w: (not w.get("local"), w.get("namespace", ""), w.get("name", "")),
        ),
        (
            ("NAMESPACE", _get("namespace")),
            ("NAME", _get("name")),
            ("ADDRESSES", _get("addresses")),
            ("NODE", _get("node")),
            ("LOCAL", lambda w: "yes" if w.get("local") else "no"),
            ("PROTOCOL", _get("protocol")),
            ("STATUS", _get("status")),
            ("IDENTITY", _get("identity")),
            ("WAYPOINT", lambda w: _gateway(w.get("waypoint"))),
        ),
    ),
    View(
        "services",
        "services with their VIPs, ports and endpoint counts",
        _services,
        (
            ("NAMESPACE", _get("namespace")),
            ("NAME", _get("name")),
            ("HOSTNAME", _get("hostname")),
            ("VIPS", lambda s: _join([v.get("address") for v in s.get("vips", [])])),
            (
                "PORTS",
                lambda s: _join(
                    [f"{p.get('service_port')}->{p.get('target_port')}" for p in s.get("ports", [])]
                ),
            ),
            ("ENDPOINTS", _get("endpoints")),
            ("WAYPOINT", lambda s: _gateway(s.get("waypoint"))),
        ),
    ),
    View(
        "policies",
        "authorization policies",
        _policies,
        (
            ("NAMESPACE", _get("namespace")),
            ("NAME", _get("name")),
            ("SCOPE", _get("scope")),
            ("ACTION", _get("action")),
            ("RULES", lambda p: str(len(p["rules"])) if isinstance(p.get("rules"), list) else "-"),
            ("DRY RUN", lambda p: "yes" if p.get("dry_run") else "no"),
        ),
    ),
    View(
        "certificates",
        "workload certificates held by the agent",
        lambda d: list(d.get("certificates", [])),
        (
            ("IDENTITY", _get("identity")),
            ("STATE", _get("state")),
            ("NOT AFTER", _get("not_after")),
            ("RENEW AT", _get("renew_at")),
            ("LAST ERROR", _get("last_error")),
        ),
    ),
    View(
        "xds",
        "the xDS connection to istiod: state, resources, last ACK/NACK per type",
        _xds,
        (
            ("ISTIOD", _get("address")),
            ("CONNECTED SINCE", _get("connected_since")),
            ("TYPE", _get("type")),
            ("RESOURCES", _get("resources")),
            ("SYNCED", lambda r: "yes" if r.get("synced") else "no"),
            ("ACKS", _get("acks")),
            ("NACKS", _get("nacks")),
            ("LAST ACK", _get("last_ack_at")),
            ("LAST NACK", _get("last_nack_error")),
            ("LAST ERROR", _get("last_error")),
        ),
    ),
    View(
        "connections",
        "live proxied connections",
        lambda d: list(d.get("connections", {}).get("live", [])),
        (
            ("ID", _get("id")),
            ("DIRECTION", _get("direction")),
            ("PATH", _get("path")),
            ("SRC", _get("src")),
            ("DST", _get("dst")),
            ("SRC IDENTITY", _get("src_identity")),
            ("DST IDENTITY", _get("dst_identity")),
            ("SENT", _get("bytes_sent")),
            ("RECV", _get("bytes_recv")),
            ("AGE", lambda c: _age(c.get("age_seconds"))),
        ),
    ),
)


def render_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, Cell]]) -> str:
    cells = [[h for h, _ in columns]] + [[str(cell(r)) for _, cell in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    return "\n".join(lines)


def render(data: Any, output: str) -> str:
    if output == "yaml":
        return str(yaml.safe_dump(data, sort_keys=False, default_flow_style=False)).rstrip()
    return json.dumps(data, indent=2)


# ---- commands ----


def _client(args: argparse.Namespace) -> AdminClient:
    return AdminClient(getattr(args, "admin", DEFAULT_ADMIN))


def _run_view(view: View, args: argparse.Namespace, out: TextIO) -> int:
    rows = view.select(_client(args).config_dump())
    output = getattr(args, "output", "table")
    if output == "table":
        out.write(render_table(rows, view.columns) + "\n" if rows else f"no {view.name}\n")
    else:
        out.write(render(rows, output) + "\n")
    return 0


def _run_dump(args: argparse.Namespace, out: TextIO) -> int:
    output = getattr(args, "output", "json")
    out.write(render(_client(args).config_dump(), "yaml" if output == "yaml" else "json") + "\n")
    return 0


def _run_check(args: argparse.Namespace, out: TextIO) -> int:
    query = {"from": args.source, "to": args.to}
    if args.source_ip:
        query["source_ip"] = args.source_ip
    result = _client(args).get_json("/authz/check?" + urllib.parse.urlencode(query))
    output = getattr(args, "output", "table")
    if output != "table":
        out.write(render(result, output) + "\n")
    else:
        out.write(
            f"from: {result['source']}"
            + (f" ({result['source_identity']})" if result.get("source_identity") else "")
            + f", source ip {result['source_ip']}\n"
        )
        out.write(f"to:   {result['destination']}\n\n")
        out.write(str(result["text"]).rstrip() + "\n")
    return 0 if result.get("allowed") else 3


CAPTURE_HOOK_COLUMNS: tuple[tuple[str, Cell], ...] = (
    ("INTERFACE", _get("interface")),
    ("HOOK", _get("hook")),
    ("MODE", _get("mode")),
    ("STATE", _get("state")),
    ("REORDERS", _get("reorders")),
    ("AHEAD", lambda h: "; ".join(h.get("ahead") or []) or "-"),
)
CAPTURE_POD_COLUMNS: tuple[tuple[str, Cell], ...] = (
    ("POD", _get("pod")),
    ("CAPTURE OK", lambda p: "yes" if p.get("ok") else "NO"),
    ("DETAIL", _get("detail")),
)


def render_capture(capture: dict[str, Any]) -> str:
    """`ztunnel ctl capture` as text: the attach mode, every hook, every pod's verdict."""
    age = capture.get("last_check_age_seconds")
    lines = [
        f"attach mode: {capture.get('mode') or '-'}"
        f" (tcx {'available' if capture.get('tcx_available') else 'not available'}),"
        f" hooks checked every {capture.get('check_interval_seconds')}s,"
        f" last check {_age(age) + ' ago' if age is not None else 'not yet'}"
    ]
    if capture.get("last_error"):
        lines.append(f"last check failed: {capture['last_error']}")
    hooks = list(capture.get("hooks") or [])
    lines += ["", render_table(hooks, CAPTURE_HOOK_COLUMNS) if hooks else "no hooks"]
    pods = [{"pod": k, **v} for k, v in sorted((capture.get("pods") or {}).items())]
    lines += ["", render_table(pods, CAPTURE_POD_COLUMNS) if pods else "no pods"]
    refused = [h for h in hooks if h.get("state") == "refused"]
    for hook in refused:
        lines += ["", f"{hook.get('interface')}: {hook.get('detail')}"]
    return "\n".join(lines)


def _run_capture(args: argparse.Namespace, out: TextIO) -> int:
    capture = _client(args).config_dump().get("capture")
    if not isinstance(capture, dict):
        raise CtlError("the agent has no eBPF capture (it runs without --capture ebpf)")
    output = getattr(args, "output", "table")
    out.write((render_capture(capture) if output == "table" else render(capture, output)) + "\n")
    pods_ok = all(p.get("ok") for p in (capture.get("pods") or {}).values())
    hooks_ok = all(h.get("ok") for h in capture.get("hooks") or [])
    return 0 if pods_ok and hooks_ok else 3


def _guard(run: Callable[[argparse.Namespace, TextIO], int]) -> Callable[[argparse.Namespace], int]:
    def func(args: argparse.Namespace) -> int:
        try:
            return run(args, sys.stdout)
        except CtlError as e:
            print(f"ztunnel ctl: {e}", file=sys.stderr)
            return 1

    return func


def _common() -> argparse.ArgumentParser:
    # SUPPRESS: a flag given before or after the subcommand name both end up in `args`.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--admin",
        default=argparse.SUPPRESS,
        metavar="ADDR:PORT",
        help=f"the agent's admin API (default {DEFAULT_ADMIN})",
    )
    common.add_argument(
        "-o",
        "--output",
        default=argparse.SUPPRESS,
        choices=("table", "json", "yaml"),
        help="output format (default: table)",
    )
    return common


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `ztunnel ctl` and its commands on the top-level subparsers."""
    common = _common()
    ctl = sub.add_parser(
        "ctl",
        parents=[common],
        help="inspect a running agent through its admin API",
        description="Inspect a running agent through its admin API (localhost only).",
    )
    ctl_sub = ctl.add_subparsers(dest="ctl_command", required=True, metavar="COMMAND")
    for view in VIEWS:
        p = ctl_sub.add_parser(view.name, parents=[common], help=view.help)
        p.set_defaults(func=_guard(functools.partial(_run_view, view)))
    dump = ctl_sub.add_parser(
        "config-dump", parents=[common], help="the agent's whole configuration dump (JSON or YAML)"
    )
    dump.set_defaults(func=_guard(_run_dump))
    capture = ctl_sub.add_parser(
        "capture",
        parents=[common],
        help="the eBPF capture's hooks: what runs ahead of ztunnel, and which pods are"
        " refused (exit 3 when anything is not safely captured)",
    )
    capture.set_defaults(func=_guard(_run_capture))
    check = ctl_sub.add_parser(
        "check",
        parents=[common],
        help="explain how the agent's policies decide a connection (exit 3 when denied)",
    )
    check.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="WORKLOAD|IP|SPIFFE-ID",
        help="the client: a workload (name or namespace/name), an IP, or a SPIFFE identity",
    )
    check.add_argument(
        "--to",
        required=True,
        metavar="IP:PORT",
        help="the destination: a workload address local to this agent",
    )
    check.add_argument("--source-ip", default=None, help="client IP to assume with a SPIFFE id")
    check.set_defaults(func=_guard(_run_check))
