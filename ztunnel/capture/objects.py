"""The programs and maps of bpf/capture.c as pinned objects, opened by path without bcc.

The loader process (`ztunnel.capture.loader`) compiles the programs and pins programs and
maps in one directory on a bpffs; every other process (the agent, a test, `lab down`)
opens them here with BPF_OBJ_GET and works on the same live state by fd.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import shutil
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from ztunnel.capture import syscalls
from ztunnel.capture.config import FailMode, ListenerSlot
from ztunnel.capture.errors import CaptureError

POD_PROGRAM = "capture_pod"
UPLINK_PROGRAM = "capture_uplink"
GUARD_PROGRAM = "capture_guard"
# The second copy of each ingress program (see bpf/capture.c): what a tcx hook gets when
# ours is moved back to the front of its chain.
POD_PROGRAM_COPY = "capture_pod2"
UPLINK_PROGRAM_COPY = "capture_uplink2"
PROGRAM_NAMES = (
    POD_PROGRAM,
    POD_PROGRAM_COPY,
    UPLINK_PROGRAM,
    UPLINK_PROGRAM_COPY,
    GUARD_PROGRAM,
)
# Each program and its twin (the guard has none: nothing is re-ordered on egress).
PROGRAM_TWINS: Mapping[str, str] = {
    POD_PROGRAM: POD_PROGRAM_COPY,
    POD_PROGRAM_COPY: POD_PROGRAM,
    UPLINK_PROGRAM: UPLINK_PROGRAM_COPY,
    UPLINK_PROGRAM_COPY: UPLINK_PROGRAM,
}

ENROLLED_MAP = "enrolled_pods"
NODE_ADDRS_MAP = "node_addrs"
CONFIG_MAP = "capture_config"
LISTENERS_MAP = "listeners"
UNSAFE_MAP = "unsafe_pods"
MAP_NAMES = (ENROLLED_MAP, NODE_ADDRS_MAP, CONFIG_MAP, LISTENERS_MAP, UNSAFE_MAP)

# capture_config slots and the CONFIG_GUARD bits (bpf/capture.c)
CONFIG_FAIL_MODE = 0
CONFIG_GUARD = 1
GUARD_UPLINK = 1
GUARD_PODS = 2

_U32 = struct.Struct("=I")
_POD_INFO = struct.Struct("=II")  # struct pod_info {u32 host_ifindex; u32 flags;}


@dataclass(frozen=True, slots=True)
class MapLayout:
    """A map's type and element sizes as bpf/capture.c declares it."""

    type: int
    key_size: int
    value_size: int


MAP_LAYOUTS: Mapping[str, MapLayout] = {
    ENROLLED_MAP: MapLayout(syscalls.BPF_MAP_TYPE_HASH, 4, _POD_INFO.size),
    NODE_ADDRS_MAP: MapLayout(syscalls.BPF_MAP_TYPE_HASH, 4, 4),
    CONFIG_MAP: MapLayout(syscalls.BPF_MAP_TYPE_ARRAY, 4, 4),
    LISTENERS_MAP: MapLayout(syscalls.BPF_MAP_TYPE_SOCKMAP, 4, 4),
    UNSAFE_MAP: MapLayout(syscalls.BPF_MAP_TYPE_HASH, 4, 4),
}


def _ip_key(ip: ipaddress.IPv4Address) -> bytes:
    """An IPv4 address as the map key the programs use: the 4 bytes in network order."""
    return ip.packed


def prepare_pin_dir(pin_dir: Path) -> None:
    """Creates the pin directory; it must be on a bpffs that outlives this process.

    Note for processes started with `ip netns exec`: that command gives the process a fresh
    /sys, which hides the host's /sys/fs/bpf. Pin below a bpffs mounted outside /sys (the lab
    bind-mounts /sys/fs/bpf on /run/ztunnel-lab/bpf), or pins will not survive a restart.
    """
    if not syscalls.is_on_bpffs(pin_dir):
        raise CaptureError(
            f"pin directory {pin_dir} is not on a bpffs (mount one with"
            " `mount -t bpf bpf <dir>`; under `ip netns exec`, /sys/fs/bpf is hidden)"
        )
    try:
        pin_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CaptureError(f"creating pin directory {pin_dir} failed", exc.errno or 0) from exc


def remove_pins(pin_dir: Path) -> None:
    """Removes a pin directory and everything pinned in it (idempotent).

    Refuses to touch anything that is not on a bpffs, so a wrong path cannot delete files.
    """
    if not pin_dir.exists():
        return
    if not syscalls.is_on_bpffs(pin_dir):
        raise CaptureError(f"refusing to remove {pin_dir}: not on a bpffs")
    try:
        shutil.rmtree(pin_dir)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise CaptureError(f"removing pins in {pin_dir} failed", exc.errno or 0) from exc


def pin_replacing(fd: int, path: Path) -> None:
    """Pins `fd` at `path`, replacing what is pinned there in one step.

    BPF_OBJ_PIN refuses an existing path, so the object is pinned under a temporary name
    and renamed over the old pin: a concurrent BPF_OBJ_GET sees either the old or the new
    object, never none. Attached programs are referenced by their tc filters, not their
    pins, so the old one keeps running until its filters are replaced.
    """
    # No dot in the name: bpffs refuses names with dots (EPERM), they are its own.
    tmp = path.with_name(f"{path.name}__new_{os.getpid()}")
    syscalls.obj_pin(fd, tmp)
    try:
        os.rename(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CaptureError(f"replacing pin {path}", exc.errno or 0) from exc


def remove_stale_temporaries(pin_dir: Path) -> None:
    """Removes temporary pins that a loader killed between pin and rename left behind."""
    for entry in pin_dir.glob("*__new_*"):
        entry.unlink(missing_ok=True)


def _open_all(paths: Mapping[str, Path]) -> dict[str, int]:
    fds: dict[str, int] = {}
    try:
        for name, path in paths.items():
            fds[name] = syscalls.obj_get(path)
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    return fds


class CaptureMaps:
    """The capture maps of one node, by file descriptor; owns (and closes) the fds.

    Every operation is one bpf() syscall per element and takes effect for the very next
    packet, since the programs read the same maps.
    """

    def __init__(self, fds: Mapping[str, int]) -> None:
        missing = [name for name in MAP_NAMES if name not in fds]
        if missing:
            raise CaptureError(f"missing capture maps: {', '.join(missing)}")
        self._fds = dict(fds)

    @classmethod
    def open_pinned(cls, pin_dir: Path) -> CaptureMaps:
        """Opens the maps pinned in `pin_dir` and checks they have the layout we expect."""
        fds = _open_all({name: pin_dir / name for name in MAP_NAMES})
        try:
            for name, fd in fds.items():
                info, want = syscalls.map_info(fd), MAP_LAYOUTS[name]
                if (info.type, info.key_size, info.value_size) != (
                    want.type,
                    want.key_size,
                    want.value_size,
                ):
                    raise CaptureError(
                        f"pinned map {pin_dir / name} is (type {info.type}, key {info.key_size},"
                        f" value {info.value_size}), expected (type {want.type}, key"
                        f" {want.key_size}, value {want.value_size}): a stale pin of another"
                        f" version? Remove {pin_dir} to start afresh",
                        errno.EINVAL,
                    )
        except BaseException:
            for fd in fds.values():
                os.close(fd)
            raise
        return cls(fds)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> CaptureMaps:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _fd(self, name: str) -> int:
        fd = self._fds.get(name)
        if fd is None:
            raise CaptureError("capture maps are closed")
        return fd

    def _update(self, name: str, key: bytes, value: bytes) -> None:
        try:
            syscalls.map_update(self._fd(name), key, value)
        except CaptureError as exc:
            raise CaptureError(f"updating map {name} failed", exc.errno) from exc

    def _delete(self, name: str, key: bytes, absent: int = errno.ENOENT) -> bool:
        try:
            return syscalls.map_delete(self._fd(name), key, absent)
        except CaptureError as exc:
            raise CaptureError(f"deleting from map {name} failed", exc.errno) from exc

    def _keys(self, name: str) -> list[bytes]:
        try:
            return syscalls.map_keys(self._fd(name), MAP_LAYOUTS[name].key_size)
        except CaptureError as exc:
            raise CaptureError(f"iterating map {name} failed", exc.errno) from exc

    def enrol(self, ip: ipaddress.IPv4Address, host_ifindex: int) -> None:
        """Captures traffic from and to `ip` from now on (idempotent)."""
        self._update(ENROLLED_MAP, _ip_key(ip), _POD_INFO.pack(host_ifindex, 0))

    def unenrol(self, ip: ipaddress.IPv4Address) -> bool:
        """Stops capturing `ip`; returns whether it was enrolled."""
        return self._delete(ENROLLED_MAP, _ip_key(ip))

    def enrolled(self) -> dict[ipaddress.IPv4Address, int]:
        """Enrolled addresses and the host-side ifindex recorded for each."""
        result: dict[ipaddress.IPv4Address, int] = {}
        fd = self._fd(ENROLLED_MAP)
        for key in self._keys(ENROLLED_MAP):
            try:
                value = syscalls.map_lookup(fd, key, _POD_INFO.size)
            except CaptureError as exc:
                raise CaptureError(f"reading map {ENROLLED_MAP} failed", exc.errno) from exc
            if value is not None:  # None: removed meanwhile, fine
                result[ipaddress.IPv4Address(key)] = _POD_INFO.unpack(value)[0]
        return result

    def set_node_addresses(self, addresses: tuple[ipaddress.IPv4Address, ...]) -> None:
        """Makes the node-address set exactly `addresses` (additions first, then removals)."""
        wanted = set(addresses)
        for ip in wanted:
            self._update(NODE_ADDRS_MAP, _ip_key(ip), _U32.pack(1))
        for key in self._keys(NODE_ADDRS_MAP):
            if ipaddress.IPv4Address(key) not in wanted:
                self._delete(NODE_ADDRS_MAP, key)

    def node_addresses(self) -> frozenset[ipaddress.IPv4Address]:
        return frozenset(ipaddress.IPv4Address(key) for key in self._keys(NODE_ADDRS_MAP))

    def set_unsafe(self, unsafe: Mapping[ipaddress.IPv4Address, int], uplink: bool) -> None:
        """Makes the refused set exactly `unsafe` (address -> ifindex of its unsafe veth) plus
        the uplink flag; see bpf/capture.c. Additions (and the flag) first, then removals,
        so a check never lets an address out early."""
        wanted = {_ip_key(ip): index for ip, index in unsafe.items()}
        flags = (GUARD_UPLINK if uplink else 0) | (GUARD_PODS if wanted else 0)
        current = self.guard_flags()
        for key, index in wanted.items():
            self._update(UNSAFE_MAP, key, _U32.pack(index))
        self._update(CONFIG_MAP, _U32.pack(CONFIG_GUARD), _U32.pack(flags | current))
        for key in self._keys(UNSAFE_MAP):
            if key not in wanted:
                self._delete(UNSAFE_MAP, key)
        if flags != flags | current:
            self._update(CONFIG_MAP, _U32.pack(CONFIG_GUARD), _U32.pack(flags))

    def unsafe(self) -> dict[ipaddress.IPv4Address, int]:
        """The refused addresses and the ifindex of each one's unsafe veth."""
        fd = self._fd(UNSAFE_MAP)
        result: dict[ipaddress.IPv4Address, int] = {}
        for key in self._keys(UNSAFE_MAP):
            value = syscalls.map_lookup(fd, key, 4)
            if value is not None:
                result[ipaddress.IPv4Address(key)] = _U32.unpack(value)[0]
        return result

    def guard_flags(self) -> int:
        """The CONFIG_GUARD bits: GUARD_UPLINK, GUARD_PODS."""
        value = syscalls.map_lookup(self._fd(CONFIG_MAP), _U32.pack(CONFIG_GUARD), 4)
        return _U32.unpack(value)[0] if value is not None else 0

    def set_listener(self, slot: ListenerSlot, sock_fd: int) -> None:
        """Puts a listening socket (IP_TRANSPARENT, in the node netns) into its sockmap slot.

        The value written is the socket's fd in this process; the kernel stores the socket
        itself and only accepts TCP sockets that are listening or established.
        """
        try:
            syscalls.map_update(self._fd(LISTENERS_MAP), _U32.pack(slot), _U32.pack(sock_fd))
        except CaptureError as exc:
            raise CaptureError(
                f"putting fd {sock_fd} into listener slot {slot.key} failed", exc.errno
            ) from exc

    def clear_listener(self, slot: ListenerSlot) -> None:
        # An empty sockmap slot answers a delete with EINVAL, not ENOENT.
        self._delete(LISTENERS_MAP, _U32.pack(slot), absent=errno.EINVAL)

    def set_fail_mode(self, mode: FailMode) -> None:
        self._update(CONFIG_MAP, _U32.pack(CONFIG_FAIL_MODE), _U32.pack(mode.map_value))

    def fail_mode(self) -> FailMode:
        try:
            value = syscalls.map_lookup(self._fd(CONFIG_MAP), _U32.pack(CONFIG_FAIL_MODE), 4)
        except CaptureError as exc:
            raise CaptureError(f"reading map {CONFIG_MAP} failed", exc.errno) from exc
        if value is not None and _U32.unpack(value)[0] == FailMode.OPEN.map_value:
            return FailMode.OPEN
        return FailMode.CLOSED


class CapturePrograms:
    """The two pinned SCHED_CLS programs and the maps, opened by path; owns the fds.

    Closing releases only this process's fds: attached programs keep running and pins stay.
    """

    def __init__(self, prog_fds: Mapping[str, int], maps: CaptureMaps) -> None:
        self._prog_fds = dict(prog_fds)
        self.maps = maps

    @classmethod
    def open_pinned(cls, pin_dir: Path) -> CapturePrograms:
        fds = _open_all({name: pin_dir / name for name in PROGRAM_NAMES})
        try:
            for name, fd in fds.items():
                info = syscalls.prog_info(fd)
                if info.type != syscalls.BPF_PROG_TYPE_SCHED_CLS:
                    raise CaptureError(
                        f"{pin_dir / name} is a program of type {info.type},"
                        f" not SCHED_CLS ({syscalls.BPF_PROG_TYPE_SCHED_CLS})",
                        errno.EINVAL,
                    )
            maps = CaptureMaps.open_pinned(pin_dir)
        except BaseException:
            for fd in fds.values():
                os.close(fd)
            raise
        return cls(fds, maps)

    def prog_fd(self, name: str) -> int:
        if not self._prog_fds:
            raise CaptureError("capture programs are closed")
        try:
            return self._prog_fds[name]
        except KeyError:
            raise CaptureError(f"no program {name!r}") from None

    def prog_info(self, name: str) -> syscalls.ProgInfo:
        return syscalls.prog_info(self.prog_fd(name))

    def close(self) -> None:
        """Closes this process's fds; attached programs and pinned objects stay in the kernel."""
        for fd in self._prog_fds.values():
            os.close(fd)
        self._prog_fds.clear()
        self.maps.close()


@dataclass(frozen=True, slots=True)
class LoadReport:
    """What one run of the loader did: the programs it pinned (by kernel id) and which maps
    it created or found pinned already (a restart reuses them, so enrolment survives)."""

    pin_dir: Path
    program_ids: Mapping[str, int]
    maps_reused: tuple[str, ...]
    maps_created: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "pin_dir": str(self.pin_dir),
            "program_ids": dict(self.program_ids),
            "maps_reused": list(self.maps_reused),
            "maps_created": list(self.maps_created),
        }

    @classmethod
    def from_json(cls, data: Any) -> LoadReport:
        try:
            ids = data["program_ids"]
            report = cls(
                pin_dir=Path(data["pin_dir"]),
                program_ids={str(k): int(v) for k, v in ids.items()},
                maps_reused=tuple(str(m) for m in data["maps_reused"]),
                maps_created=tuple(str(m) for m in data["maps_created"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CaptureError(f"unreadable loader report {data!r}: {exc!r}") from exc
        missing = [name for name in PROGRAM_NAMES if name not in report.program_ids]
        if missing:
            raise CaptureError(f"loader report lacks programs {', '.join(missing)}")
        return report
