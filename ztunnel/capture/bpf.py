"""The one module that imports bcc: compile and load bpf/capture.c, and work on its maps by fd.

Programs are compiled at run time from `bpf/capture.c` with `-D` flags only. Maps are reached
through file descriptors (bpf() via libbcc/libbpf), so a process that did not compile the
programs (a restarted agent before it reloads, a test, `lab down`) can open the pinned maps
with `CaptureMaps.open_pinned()` and work on the same live state.
"""

from __future__ import annotations

import ctypes as ct
import errno
import ipaddress
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType

import bcc  # the only import of bcc in the project (see shared/STYLE.md)
from bcc import libbcc

from ztunnel.capture.config import CaptureConfig, FailMode, ListenerSlot
from ztunnel.capture.errors import CaptureError

POD_PROGRAM = "capture_pod"
UPLINK_PROGRAM = "capture_uplink"

ENROLLED_MAP = "enrolled_pods"
NODE_ADDRS_MAP = "node_addrs"
CONFIG_MAP = "capture_config"
LISTENERS_MAP = "listeners"
MAP_NAMES = (ENROLLED_MAP, NODE_ADDRS_MAP, CONFIG_MAP, LISTENERS_MAP)

CONFIG_FAIL_MODE = 0  # CONFIG_FAIL_MODE in bpf/capture.c
BPF_ANY = 0
BPF_FS_MAGIC = 0xCAFE4A11  # statfs(2) f_type of a bpffs

_lib = libbcc.lib
# bcc's Python binding does not wrap bpf_obj_get; libbcc links libbpf, which exports it.
_obj_get = ct.CFUNCTYPE(ct.c_int, ct.c_char_p, use_errno=True)(("bpf_obj_get", _lib))
_libc = ct.CDLL(None, use_errno=True)
_statfs = ct.CFUNCTYPE(ct.c_int, ct.c_char_p, ct.c_void_p, use_errno=True)(("statfs", _libc))
_mount = ct.CFUNCTYPE(
    ct.c_int, ct.c_char_p, ct.c_char_p, ct.c_char_p, ct.c_ulong, ct.c_void_p, use_errno=True
)(("mount", _libc))


class _PodInfo(ct.Structure):
    """`struct pod_info` of bpf/capture.c."""

    _fields_ = [("host_ifindex", ct.c_uint32), ("flags", ct.c_uint32)]


_Value = ct.c_uint32 | _PodInfo


class _StatFs(ct.Structure):
    # Only f_type (the first field, a C long) is read; the rest is room for the kernel.
    _fields_ = [("f_type", ct.c_long), ("rest", ct.c_byte * 256)]


def _ip_key(ip: ipaddress.IPv4Address) -> ct.c_uint32:
    """An IPv4 address as the map key the programs use: the 4 bytes in network order."""
    return ct.c_uint32.from_buffer_copy(ip.packed)


def _key_ip(key: ct.c_uint32) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(bytes(key))


def _fail(what: str) -> CaptureError:
    return CaptureError(what, ct.get_errno() or errno.EIO)


def filesystem_type(path: Path) -> int:
    """statfs(2) f_type of the file system holding `path` (or its nearest existing parent)."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    buf = _StatFs()
    if _statfs(os.fsencode(probe), ct.addressof(buf)) != 0:
        raise _fail(f"statfs({probe}) failed")
    return int(buf.f_type) & 0xFFFFFFFF


def is_on_bpffs(path: Path) -> bool:
    return filesystem_type(path) == BPF_FS_MAGIC


def mount_bpffs(mount_point: Path) -> None:
    """Mounts a bpffs on `mount_point` unless one is there already (idempotent)."""
    if mount_point.is_dir() and is_on_bpffs(mount_point):
        return
    mount_point.mkdir(parents=True, exist_ok=True)
    if _mount(b"bpf", os.fsencode(mount_point), b"bpf", 0, None) != 0:
        raise _fail(f"mounting bpffs on {mount_point} failed")


def prepare_pin_dir(pin_dir: Path) -> None:
    """Creates the pin directory; it must be on a bpffs that outlives this process.

    Note for processes started with `ip netns exec`: that command gives the process a fresh
    /sys, which hides the host's /sys/fs/bpf. Pin below a bpffs mounted outside /sys (the lab
    bind-mounts /sys/fs/bpf on /run/ztunnel-lab/bpf), or pins will not survive a restart.
    """
    if not is_on_bpffs(pin_dir):
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
    if not is_on_bpffs(pin_dir):
        raise CaptureError(f"refusing to remove {pin_dir}: not on a bpffs")
    try:
        shutil.rmtree(pin_dir)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise CaptureError(f"removing pins in {pin_dir} failed", exc.errno or 0) from exc


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
        """Opens the maps pinned in `pin_dir` by a running or past agent."""
        fds: dict[str, int] = {}
        try:
            for name in MAP_NAMES:
                fd = _obj_get(os.fsencode(pin_dir / name))
                if fd < 0:
                    raise CaptureError(f"opening pinned map {pin_dir / name} failed", -fd)
                fds[name] = fd
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

    def _update(self, name: str, key: ct.c_uint32, value: _Value) -> None:
        if _lib.bpf_update_elem(self._fd(name), ct.byref(key), ct.byref(value), BPF_ANY) != 0:
            raise _fail(f"updating map {name} failed")

    def _delete(self, name: str, key: ct.c_uint32, absent: int = errno.ENOENT) -> bool:
        if _lib.bpf_delete_elem(self._fd(name), ct.byref(key)) == 0:
            return True
        if ct.get_errno() == absent:
            return False
        raise _fail(f"deleting from map {name} failed")

    def _keys(self, name: str) -> Iterator[ct.c_uint32]:
        fd = self._fd(name)
        key = ct.c_uint32()
        prev: ct.c_uint32 | None = None
        while True:
            prev_ref = ct.byref(prev) if prev is not None else None
            if _lib.bpf_get_next_key(fd, prev_ref, ct.byref(key)) != 0:
                if ct.get_errno() == errno.ENOENT:
                    return
                raise _fail(f"iterating map {name} failed")
            yield ct.c_uint32(key.value)
            prev = ct.c_uint32(key.value)

    def enrol(self, ip: ipaddress.IPv4Address, host_ifindex: int) -> None:
        """Captures traffic from and to `ip` from now on (idempotent)."""
        self._update(ENROLLED_MAP, _ip_key(ip), _PodInfo(host_ifindex, 0))

    def unenrol(self, ip: ipaddress.IPv4Address) -> bool:
        """Stops capturing `ip`; returns whether it was enrolled."""
        return self._delete(ENROLLED_MAP, _ip_key(ip))

    def enrolled(self) -> dict[ipaddress.IPv4Address, int]:
        """Enrolled addresses and the host-side ifindex recorded for each."""
        result: dict[ipaddress.IPv4Address, int] = {}
        fd = self._fd(ENROLLED_MAP)
        for key in list(self._keys(ENROLLED_MAP)):
            info = _PodInfo()
            if _lib.bpf_lookup_elem(fd, ct.byref(key), ct.byref(info)) == 0:
                result[_key_ip(key)] = int(info.host_ifindex)
            elif ct.get_errno() != errno.ENOENT:  # removed meanwhile: fine
                raise _fail(f"reading map {ENROLLED_MAP} failed")
        return result

    def set_node_addresses(self, addresses: tuple[ipaddress.IPv4Address, ...]) -> None:
        """Makes the node-address set exactly `addresses` (additions first, then removals)."""
        wanted = set(addresses)
        for ip in wanted:
            self._update(NODE_ADDRS_MAP, _ip_key(ip), ct.c_uint32(1))
        for key in list(self._keys(NODE_ADDRS_MAP)):
            if _key_ip(key) not in wanted:
                self._delete(NODE_ADDRS_MAP, key)

    def node_addresses(self) -> frozenset[ipaddress.IPv4Address]:
        return frozenset(_key_ip(key) for key in self._keys(NODE_ADDRS_MAP))

    def set_listener(self, slot: ListenerSlot, sock_fd: int) -> None:
        """Puts a listening socket (IP_TRANSPARENT, in the node netns) into its sockmap slot.

        bcc's Table does not know sockmaps (map type 15), hence the raw update by fd; the
        kernel only accepts TCP sockets that are listening or established.
        """
        if _lib.bpf_update_elem(
            self._fd(LISTENERS_MAP), ct.byref(ct.c_uint32(slot)), ct.byref(ct.c_uint32(sock_fd)), 0
        ):
            raise _fail(f"putting fd {sock_fd} into listener slot {slot.key} failed")

    def clear_listener(self, slot: ListenerSlot) -> None:
        # An empty sockmap slot answers a delete with EINVAL, not ENOENT.
        self._delete(LISTENERS_MAP, ct.c_uint32(slot), absent=errno.EINVAL)

    def set_fail_mode(self, mode: FailMode) -> None:
        self._update(CONFIG_MAP, ct.c_uint32(CONFIG_FAIL_MODE), ct.c_uint32(mode.map_value))

    def fail_mode(self) -> FailMode:
        value = ct.c_uint32()
        key = ct.c_uint32(CONFIG_FAIL_MODE)
        if _lib.bpf_lookup_elem(self._fd(CONFIG_MAP), ct.byref(key), ct.byref(value)) != 0:
            raise _fail(f"reading map {CONFIG_MAP} failed")
        return FailMode.OPEN if value.value == FailMode.OPEN.map_value else FailMode.CLOSED


class CapturePrograms:
    """bpf/capture.c compiled by bcc and loaded as two SCHED_CLS programs, plus its maps.

    With `config.pin_dir` set, bcc reuses maps already pinned there (BPF_TABLE_PINNED) and
    pins the ones it creates, so a reload attaches to the live state.
    """

    def __init__(self, module: bcc.BPF, prog_fds: dict[str, int], maps: CaptureMaps) -> None:
        self._module: bcc.BPF | None = module
        self._prog_fds = prog_fds
        self.maps = maps

    @classmethod
    def load(cls, config: CaptureConfig) -> CapturePrograms:
        source = config.bpf_source
        if not source.is_file():
            raise CaptureError(f"BPF source {source} not found")
        try:
            module = bcc.BPF(src_file=os.fsencode(source), cflags=list(config.cflags()))
        except Exception as exc:  # bcc raises bare Exception; the compiler log went to stderr
            raise CaptureError(f"compiling {source} failed: {exc}") from exc
        fds: dict[str, int] = {}
        try:
            prog_fds = {
                name: int(module.load_func(name.encode(), bcc.BPF.SCHED_CLS).fd)
                for name in (POD_PROGRAM, UPLINK_PROGRAM)
            }
            for name in MAP_NAMES:
                fd = _lib.bpf_table_fd(module.module, name.encode())
                if fd < 0:
                    raise CaptureError(f"map {name} missing from {source}")
                # Our own copy, so the maps outlive bcc's module object if needed.
                fds[name] = os.dup(fd)
            return cls(module, prog_fds, CaptureMaps(fds))
        except Exception as exc:
            for fd in fds.values():
                os.close(fd)
            module.cleanup()
            if isinstance(exc, CaptureError):
                raise
            raise CaptureError(f"loading programs of {source} failed: {exc}") from exc

    def prog_fd(self, name: str) -> int:
        if self._module is None:
            raise CaptureError("capture programs are closed")
        try:
            return self._prog_fds[name]
        except KeyError:
            raise CaptureError(f"no program {name!r}") from None

    def close(self) -> None:
        """Closes this process's fds; attached programs and pinned maps stay in the kernel."""
        self.maps.close()
        if self._module is not None:
            self._module.cleanup()
            self._module = None
