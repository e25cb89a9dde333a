"""The raw bpf(2) syscall through ctypes: pinned objects by path, map elements by fd.

This is how the agent process works on its programs and maps without bcc, whose libbcc
brings LLVM along (tens of megabytes per process). Keys and values are plain bytes in the
kernel's layout; every failure is a `CaptureError` carrying the kernel's errno.
"""

from __future__ import annotations

import ctypes as ct
import errno
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from ztunnel.capture.errors import CaptureError

# enum bpf_cmd, include/uapi/linux/bpf.h
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_OBJ_GET_INFO_BY_FD = 15

# Map update flags
BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2

# enum bpf_map_type / enum bpf_prog_type (the ones the capture uses)
BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_SOCKMAP = 15
BPF_PROG_TYPE_SCHED_CLS = 3

BPF_OBJ_NAME_LEN = 16
BPF_TAG_SIZE = 8
BPF_FS_MAGIC = 0xCAFE4A11  # statfs(2) f_type of a bpffs

# __NR_bpf differs per architecture (arch/*/include/uapi/asm/unistd*.h).
_NR_BPF = {
    "x86_64": 321,
    "i386": 357,
    "i686": 357,
    "aarch64": 280,
    "arm64": 280,
    "riscv64": 280,
    "armv7l": 386,
    "ppc64le": 361,
    "ppc64": 361,
    "s390x": 351,
}

_libc = ct.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ct.c_long
_syscall.argtypes = [ct.c_long, ct.c_int, ct.c_void_p, ct.c_uint]
_statfs = _libc.statfs
_statfs.restype = ct.c_int
_statfs.argtypes = [ct.c_char_p, ct.c_void_p]
_mount = _libc.mount
_mount.restype = ct.c_int
_mount.argtypes = [ct.c_char_p, ct.c_char_p, ct.c_char_p, ct.c_ulong, ct.c_void_p]


# The members of `union bpf_attr` used here; the kernel wants every byte past the member it
# reads to be zero, which ctypes guarantees for a freshly constructed structure.
class _ElemAttr(ct.Structure):
    _fields_ = [
        ("map_fd", ct.c_uint32),
        ("_pad", ct.c_uint32),  # `key` is an __aligned_u64
        ("key", ct.c_uint64),
        ("value", ct.c_uint64),  # also `next_key` for BPF_MAP_GET_NEXT_KEY
        ("flags", ct.c_uint64),
    ]


class _ObjAttr(ct.Structure):
    _fields_ = [("pathname", ct.c_uint64), ("bpf_fd", ct.c_uint32), ("file_flags", ct.c_uint32)]


class _InfoAttr(ct.Structure):
    _fields_ = [("bpf_fd", ct.c_uint32), ("info_len", ct.c_uint32), ("info", ct.c_uint64)]


class _ProgInfo(ct.Structure):
    """The head of `struct bpf_prog_info` (the kernel copies no more than info_len)."""

    _fields_ = [
        ("type", ct.c_uint32),
        ("id", ct.c_uint32),
        ("tag", ct.c_uint8 * BPF_TAG_SIZE),
        ("jited_prog_len", ct.c_uint32),
        ("xlated_prog_len", ct.c_uint32),
        ("jited_prog_insns", ct.c_uint64),
        ("xlated_prog_insns", ct.c_uint64),
        ("load_time", ct.c_uint64),
        ("created_by_uid", ct.c_uint32),
        ("nr_map_ids", ct.c_uint32),
        ("map_ids", ct.c_uint64),
        ("name", ct.c_char * BPF_OBJ_NAME_LEN),
    ]


class _MapInfo(ct.Structure):
    """The head of `struct bpf_map_info`."""

    _fields_ = [
        ("type", ct.c_uint32),
        ("id", ct.c_uint32),
        ("key_size", ct.c_uint32),
        ("value_size", ct.c_uint32),
        ("max_entries", ct.c_uint32),
        ("map_flags", ct.c_uint32),
        ("name", ct.c_char * BPF_OBJ_NAME_LEN),
    ]


class _StatFs(ct.Structure):
    # Only f_type (the first field, a C long) is read; the rest is room for the kernel.
    _fields_ = [("f_type", ct.c_long), ("rest", ct.c_byte * 256)]


@dataclass(frozen=True, slots=True)
class ProgInfo:
    """What the kernel reports about a loaded program."""

    type: int
    id: int
    tag: str  # hex, as `bpftool prog` shows it
    name: str


@dataclass(frozen=True, slots=True)
class MapInfo:
    """What the kernel reports about a map."""

    type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    name: str


def _nr_bpf() -> int:
    machine = platform.machine()
    try:
        return _NR_BPF[machine]
    except KeyError:
        raise CaptureError(f"bpf() syscall number unknown on {machine}", errno.ENOSYS) from None


def _bpf(cmd: int, attr: ct.Structure, what: str) -> int:
    ret = int(_syscall(_nr_bpf(), cmd, ct.addressof(attr), ct.sizeof(attr)))
    if ret < 0:
        raise CaptureError(what, ct.get_errno() or errno.EIO)
    return ret


def _buffer(data: bytes) -> ct.Array[ct.c_char]:
    return ct.create_string_buffer(data, len(data))


def obj_get(path: Path) -> int:
    """BPF_OBJ_GET: a new fd (close-on-exec) for the program or map pinned at `path`."""
    name = _buffer(os.fsencode(path) + b"\0")
    attr = _ObjAttr(pathname=ct.addressof(name))
    return _bpf(BPF_OBJ_GET, attr, f"opening pinned object {path}")


def obj_pin(fd: int, path: Path) -> None:
    """BPF_OBJ_PIN: pins the program or map behind `fd` at `path` (which must not exist)."""
    name = _buffer(os.fsencode(path) + b"\0")
    attr = _ObjAttr(pathname=ct.addressof(name), bpf_fd=fd)
    _bpf(BPF_OBJ_PIN, attr, f"pinning fd {fd} at {path}")


def prog_info(fd: int) -> ProgInfo:
    """BPF_OBJ_GET_INFO_BY_FD on a program (EINVAL if `fd` is not a program)."""
    info = _ProgInfo()
    attr = _InfoAttr(bpf_fd=fd, info_len=ct.sizeof(info), info=ct.addressof(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr, f"reading program info of fd {fd}")
    return ProgInfo(
        type=int(info.type),
        id=int(info.id),
        tag=bytes(info.tag).hex(),
        name=info.name.decode(errors="replace"),
    )


def map_info(fd: int) -> MapInfo:
    """BPF_OBJ_GET_INFO_BY_FD on a map (EINVAL if `fd` is not a map)."""
    info = _MapInfo()
    attr = _InfoAttr(bpf_fd=fd, info_len=ct.sizeof(info), info=ct.addressof(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr, f"reading map info of fd {fd}")
    return MapInfo(
        type=int(info.type),
        id=int(info.id),
        key_size=int(info.key_size),
        value_size=int(info.value_size),
        max_entries=int(info.max_entries),
        name=info.name.decode(errors="replace"),
    )


def map_update(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    """BPF_MAP_UPDATE_ELEM. For a sockmap, `value` is the socket's fd as a u32."""
    k, v = _buffer(key), _buffer(value)
    attr = _ElemAttr(map_fd=fd, key=ct.addressof(k), value=ct.addressof(v), flags=flags)
    _bpf(BPF_MAP_UPDATE_ELEM, attr, f"updating map fd {fd}")


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    """BPF_MAP_LOOKUP_ELEM: the value, or None if the key is absent."""
    k, v = _buffer(key), ct.create_string_buffer(value_size)
    attr = _ElemAttr(map_fd=fd, key=ct.addressof(k), value=ct.addressof(v))
    try:
        _bpf(BPF_MAP_LOOKUP_ELEM, attr, f"reading map fd {fd}")
    except CaptureError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise
    return v.raw


def map_delete(fd: int, key: bytes, absent: int = errno.ENOENT) -> bool:
    """BPF_MAP_DELETE_ELEM: whether the key was there. `absent` is the errno that means
    "not there" (ENOENT, but EINVAL for an empty sockmap slot)."""
    k = _buffer(key)
    attr = _ElemAttr(map_fd=fd, key=ct.addressof(k))
    try:
        _bpf(BPF_MAP_DELETE_ELEM, attr, f"deleting from map fd {fd}")
    except CaptureError as exc:
        if exc.errno == absent:
            return False
        raise
    return True


def map_next_key(fd: int, key: bytes | None, key_size: int) -> bytes | None:
    """BPF_MAP_GET_NEXT_KEY: the key after `key` (the first key for None); None at the end."""
    k = _buffer(key) if key is not None else None
    nxt = ct.create_string_buffer(key_size)
    attr = _ElemAttr(map_fd=fd, key=ct.addressof(k) if k is not None else 0)
    attr.value = ct.addressof(nxt)
    try:
        _bpf(BPF_MAP_GET_NEXT_KEY, attr, f"iterating map fd {fd}")
    except CaptureError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise
    return nxt.raw


def map_keys(fd: int, key_size: int) -> list[bytes]:
    """Every key of a hash or array map (a snapshot; entries may change meanwhile)."""
    keys: list[bytes] = []
    key = map_next_key(fd, None, key_size)
    while key is not None:
        keys.append(key)
        key = map_next_key(fd, key, key_size)
    return keys


def filesystem_type(path: Path) -> int:
    """statfs(2) f_type of the file system holding `path` (or its nearest existing parent)."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    buf = _StatFs()
    if _statfs(os.fsencode(probe), ct.addressof(buf)) != 0:
        raise CaptureError(f"statfs({probe}) failed", ct.get_errno() or errno.EIO)
    return int(buf.f_type) & 0xFFFFFFFF


def is_on_bpffs(path: Path) -> bool:
    return filesystem_type(path) == BPF_FS_MAGIC


def mount_bpffs(mount_point: Path) -> None:
    """Mounts a bpffs on `mount_point` unless one is there already (idempotent)."""
    if mount_point.is_dir() and is_on_bpffs(mount_point):
        return
    mount_point.mkdir(parents=True, exist_ok=True)
    if _mount(b"bpf", os.fsencode(mount_point), b"bpf", 0, None) != 0:
        raise CaptureError(f"mounting bpffs on {mount_point} failed", ct.get_errno() or errno.EIO)
