"""Pure configuration of the capture layer: validated frozen records and the BPF `-D` flags.

Nothing here touches the kernel, so it can be tested without root; the loader process
(`ztunnel.capture.loader`, which receives a `CaptureConfig` as JSON), `ztunnel.capture.objects`
and `ztunnel.capture.netlink` turn these records into programs, maps, filters and rules.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ztunnel.errors import ConfigError
from ztunnel.model import HBONE_PORT, IPAddress

SOURCE = "capture"

# Where `bpf/capture.c` lives in a source checkout (the repository root is three levels up).
DEFAULT_BPF_SOURCE = Path(__file__).resolve().parents[2] / "bpf" / "capture.c"
# The conventional bpffs mount point; each agent pins its maps in its own directory below it.
DEFAULT_PIN_ROOT = Path("/sys/fs/bpf")

# One bit of skb->mark. The node's `ip rule fwmark MARK/MARK` sends every packet with this
# bit to the local-delivery table, so it must not be used by anything else on the node
# (including SO_MARK on the agent's own sockets, which would then be delivered locally).
DEFAULT_MARK = 0x400
DEFAULT_ROUTE_TABLE = 100
DEFAULT_RULE_PRIORITY = 100
# Our own place in each clsact hook when tcx is not used: the first priority, so that our
# filter runs before the primary CNI's (see ztunnel/capture/ordering.py); other filters
# keep theirs. Moving ours back to the front of that priority swaps between two handles.
DEFAULT_TC_PRIORITY = 1
DEFAULT_TC_HANDLE = 0xA7
# How ingress programs are attached: tcx links where the kernel has them, else cls_bpf.
ATTACH_CHOICES = ("auto", "tcx", "cls_bpf")
# Seconds between two checks of what runs ahead of our programs on the hooks.
DEFAULT_CHECK_INTERVAL = 1.0
DEFAULT_MAX_PODS = 4096
DEFAULT_MAX_NODE_ADDRS = 64

IFNAMSIZ = 16  # including the terminating NUL
RESERVED_ROUTE_TABLES = frozenset({0, 253, 254, 255})  # unspec, default, main, local


class FailMode(enum.Enum):
    """What the programs do with a new connection they must capture when no agent listens.

    CLOSED drops the SYN: an enrolled pod never talks in plaintext past a dead agent, and
    nothing reaches an enrolled pod around it. OPEN lets the SYN through untouched.
    """

    CLOSED = "closed"
    OPEN = "open"

    @property
    def map_value(self) -> int:
        """The value of the config map's fail-mode slot (FAIL_CLOSED/FAIL_OPEN in capture.c)."""
        return 1 if self is FailMode.OPEN else 0


class ListenerSlot(enum.IntEnum):
    """Slots of the `listeners` sockmap (SLOT_* in bpf/capture.c)."""

    OUTBOUND = 0
    INBOUND = 1
    HBONE = 2

    @property
    def key(self) -> str:
        return self.name.lower()


LISTENER_KEYS: Mapping[str, ListenerSlot] = {slot.key: slot for slot in ListenerSlot}


def validate_ifname(source: str, path: str, ifname: str) -> str:
    """Checks a Linux interface name (what the kernel's dev_valid_name accepts)."""
    if not ifname or len(ifname) >= IFNAMSIZ:
        raise ConfigError(source, path, f"interface name must be 1..{IFNAMSIZ - 1} characters")
    if ifname in (".", "..") or any(c == "/" or c.isspace() for c in ifname):
        raise ConfigError(source, path, f"not a valid interface name: {ifname!r}")
    return ifname


def _check_int(path: str, value: int, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(SOURCE, path, f"must be an integer in {low}..{high}, got {value!r}")


@dataclass(frozen=True, slots=True)
class CaptureConfig:
    """Everything the capture layer of one node needs; validated on construction.

    `netns` None means the current network namespace (the agent runs inside the node's);
    a name means /run/netns/<name>. `pin_dir` is where programs and maps are pinned (on a
    bpffs); `Capture.start()` needs it, since the loader process hands them over as pins,
    while `detach_all()` works without it.
    """

    node_addresses: tuple[ipaddress.IPv4Address, ...]
    uplink_ifname: str | None = None
    pin_dir: Path | None = None
    netns: str | None = None
    fail_mode: FailMode = FailMode.CLOSED
    mark: int = DEFAULT_MARK
    route_table: int = DEFAULT_ROUTE_TABLE
    rule_priority: int = DEFAULT_RULE_PRIORITY
    hbone_port: int = HBONE_PORT
    tc_priority: int = DEFAULT_TC_PRIORITY
    tc_handle: int = DEFAULT_TC_HANDLE
    max_pods: int = DEFAULT_MAX_PODS
    max_node_addrs: int = DEFAULT_MAX_NODE_ADDRS
    bpf_source: Path = DEFAULT_BPF_SOURCE
    attach: str = "auto"  # auto | tcx | cls_bpf (ATTACH_CHOICES)
    # Programs (names, or "*") the operator accepts ahead of ours: see ordering.AcceptPolicy.
    allow_ahead: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.node_addresses, tuple):
            raise ConfigError(SOURCE, "node_addresses", "must be a tuple of IPv4 addresses")
        for i, addr in enumerate(self.node_addresses):
            if not isinstance(addr, ipaddress.IPv4Address):
                raise ConfigError(
                    SOURCE, f"node_addresses[{i}]", f"only IPv4 is captured, got {addr!r}"
                )
        if self.uplink_ifname is not None:
            validate_ifname(SOURCE, "uplink_ifname", self.uplink_ifname)
        if self.pin_dir is not None:
            text = str(self.pin_dir)
            if not self.pin_dir.is_absolute():
                raise ConfigError(SOURCE, "pin_dir", f"must be an absolute path, got {text!r}")
            # The path becomes a C string literal in -DPIN_DIR="...": keep it plain.
            if any(c in text for c in '"\\') or not text.isprintable():
                raise ConfigError(SOURCE, "pin_dir", f"unsupported character in {text!r}")
        if self.netns is not None and (
            not self.netns or "/" in self.netns or self.netns in (".", "..")
        ):
            raise ConfigError(SOURCE, "netns", f"not a network namespace name: {self.netns!r}")
        if not isinstance(self.fail_mode, FailMode):
            raise ConfigError(SOURCE, "fail_mode", f"must be a FailMode, got {self.fail_mode!r}")
        _check_int("mark", self.mark, 1, 0xFFFFFFFF)
        _check_int("route_table", self.route_table, 1, 0xFFFFFFFF)
        if self.route_table in RESERVED_ROUTE_TABLES:
            raise ConfigError(SOURCE, "route_table", f"table {self.route_table} is reserved")
        _check_int("rule_priority", self.rule_priority, 1, 32765)  # before the main table
        _check_int("hbone_port", self.hbone_port, 1, 65535)
        _check_int("tc_priority", self.tc_priority, 1, 0xFFFF)
        _check_int("tc_handle", self.tc_handle, 1, 0xFFFFFFFF)
        _check_int("max_pods", self.max_pods, 1, 1 << 20)
        _check_int("max_node_addrs", self.max_node_addrs, 1, 4096)
        if len(self.node_addresses) > self.max_node_addrs:
            raise ConfigError(SOURCE, "node_addresses", f"more than {self.max_node_addrs}")
        if self.attach not in ATTACH_CHOICES:
            raise ConfigError(
                SOURCE, "attach", f"must be one of {', '.join(ATTACH_CHOICES)}, got {self.attach!r}"
            )
        if not isinstance(self.allow_ahead, tuple) or not all(
            isinstance(n, str) and n and n.isprintable() for n in self.allow_ahead
        ):
            raise ConfigError(SOURCE, "allow_ahead", "must be a tuple of program names")

    @property
    def tc_alt_handle(self) -> int:
        """Our second cls_bpf handle: ours is re-inserted under it to move it to the front."""
        return self.tc_handle + 1 if self.tc_handle < 0xFFFFFFFF else self.tc_handle - 1

    @property
    def tc_handles(self) -> tuple[int, int]:
        return (self.tc_handle, self.tc_alt_handle)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict of every field (how the agent hands its config to the loader)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "node_addresses":
                value = [str(ip) for ip in value]
            elif isinstance(value, Path):
                value = str(value)
            elif isinstance(value, FailMode):
                value = value.value
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_json(cls, data: Any) -> CaptureConfig:
        """The inverse of `to_json`; a bad or unknown field is named in the ConfigError."""
        if not isinstance(data, dict):
            raise ConfigError(SOURCE, "", f"must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(SOURCE, unknown[0], "unknown field")
        if "node_addresses" not in data:
            raise ConfigError(SOURCE, "node_addresses", "is required")
        values: dict[str, Any] = {}
        for name, value in data.items():
            try:
                if name == "node_addresses":
                    if not isinstance(value, list):
                        raise ValueError("must be a list of addresses")
                    value = tuple(ipaddress.ip_address(ip) for ip in value)
                elif name == "bpf_source" or (name == "pin_dir" and value is not None):
                    if not isinstance(value, str):
                        raise ValueError("must be a path string")
                    value = Path(value)
                elif name == "fail_mode":
                    value = FailMode(value)
                elif name == "allow_ahead":
                    if not isinstance(value, list):
                        raise ValueError("must be a list of program names")
                    value = tuple(value)
                elif name in ("uplink_ifname", "netns") and not isinstance(value, str | None):
                    raise ValueError("must be a string or null")
            except (ValueError, TypeError) as exc:
                raise ConfigError(SOURCE, name, f"bad value {value!r}: {exc}") from None
            values[name] = value
        return cls(**values)

    def cflags(self) -> tuple[str, ...]:
        """The -D flags that configure bpf/capture.c (the source is never edited)."""
        flags = [
            f"-DCAPTURE_MARK={self.mark:#x}",
            f"-DHBONE_PORT={self.hbone_port}",
            f"-DMAX_PODS={self.max_pods}",
            f"-DMAX_NODE_ADDRS={self.max_node_addrs}",
        ]
        if self.pin_dir is not None:
            flags.append(f'-DPIN_DIR="{self.pin_dir}"')
        return tuple(flags)


def listener_slots(listener_fds: Mapping[str, int]) -> dict[ListenerSlot, int]:
    """Maps {"outbound"|"inbound"|"hbone": fd} to sockmap slots, rejecting unknown keys."""
    slots: dict[ListenerSlot, int] = {}
    for key, fd in listener_fds.items():
        slot = LISTENER_KEYS.get(key)
        if slot is None:
            known = ", ".join(LISTENER_KEYS)
            raise ConfigError(SOURCE, f"listener_fds.{key}", f"unknown listener (known: {known})")
        _check_int(f"listener_fds.{key}", fd, 0, 0x7FFFFFFF)
        slots[slot] = fd
    return slots


@dataclass(frozen=True, slots=True)
class PodEnrolment:
    """A pod whose traffic the node agent captures: where its veth is and which IPs it has.

    Only the IPv4 addresses are captured (`ipv4`); the programs do not parse IPv6.
    """

    namespace: str
    name: str
    host_ifname: str
    ips: tuple[IPAddress, ...]

    def __post_init__(self) -> None:
        source = f"pod {self.namespace}/{self.name}"
        if not self.namespace or not self.name:
            raise ConfigError(source, "name", "namespace and name are required")
        validate_ifname(source, "host_ifname", self.host_ifname)
        if not isinstance(self.ips, tuple) or not self.ips:
            raise ConfigError(source, "ips", "must be a non-empty tuple of IP addresses")
        for i, ip in enumerate(self.ips):
            if not isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address):
                raise ConfigError(source, f"ips[{i}]", f"not an IP address: {ip!r}")

    @property
    def ipv4(self) -> tuple[ipaddress.IPv4Address, ...]:
        return tuple(ip for ip in self.ips if isinstance(ip, ipaddress.IPv4Address))
