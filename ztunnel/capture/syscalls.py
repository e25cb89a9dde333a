"""The raw bpf(2) syscall through ctypes: pinned objects by path, map elements by fd, and
tcx links (attach with explicit ordering, query the chain of a hook, update in place).

This is how the agent process works on its programs and maps without bcc, whose libbcc
brings LLVM along (tens of megabytes per process), and which (0.26) knows nothing of tcx.
Keys and values are plain bytes in the kernel's layout; every failure is a `CaptureError`
carrying the kernel's errno. Constants and struct layouts are those of the kernel's
include/uapi/linux/bpf.h (enum bpf_cmd, enum bpf_attach_type, union bpf_attr,
struct bpf_link_info; tcx since Linux 6.6).
"""

from __future__ import annotations

import ctypes as ct
import errno
import os
import platform
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from ztunnel.capture.errors import CaptureError

# enum bpf_cmd, include/uapi/linux/bpf.h
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_QUERY = 16
BPF_LINK_CREATE = 28
BPF_LINK_UPDATE = 29
BPF_LINK_DETACH = 34

# enum bpf_attach_type: the tcx hooks (Linux 6.6+)
BPF_TCX_INGRESS = 46
BPF_TCX_EGRESS = 47
# enum bpf_link_type
BPF_LINK_TYPE_TCX = 11
# Generic attachment flags (BPF_LINK_CREATE, BPF_PROG_ATTACH): where in a bpf_mprog chain.
# BPF_F_BEFORE without a relative program or link means "at the very front".
BPF_F_REPLACE = 1 << 2
BPF_F_BEFORE = 1 << 3
BPF_F_AFTER = 1 << 4
BPF_F_ID = 1 << 5
# Most programs a tcx hook holds (bpf_mprog's MAX_BPF_MPROG) and then some: a query buffer
# of this size is never too small.
MAX_TCX_PROGRAMS = 64

# Map update flags
BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2

# enum bpf_map_type / enum bpf_prog_type (the ones the capture uses)
BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_SOCKMAP = 15
BPF_PROG_TYPE_SCHED_CLS = 3

CLONE_NEWNET = 0x40000000  # include/uapi/linux/sched.h
NETNS_RUN_DIR = Path("/run/netns")  # where `ip netns` names namespaces

T = TypeVar("T")

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
_setns = _libc.setns
_setns.restype = ct.c_int
_setns.argtypes = [ct.c_int, ct.c_int]
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


class _QueryAttr(ct.Structure):
    """`union bpf_attr` for BPF_PROG_QUERY, up to `revision` (added with tcx)."""

    _fields_ = [
        ("target_ifindex", ct.c_uint32),
        ("attach_type", ct.c_uint32),
        ("query_flags", ct.c_uint32),
        ("attach_flags", ct.c_uint32),
        ("prog_ids", ct.c_uint64),
        ("count", ct.c_uint32),
        ("_pad", ct.c_uint32),
        ("prog_attach_flags", ct.c_uint64),
        ("link_ids", ct.c_uint64),
        ("link_attach_flags", ct.c_uint64),
        ("revision", ct.c_uint64),
    ]


class _LinkCreateAttr(ct.Structure):
    """`union bpf_attr` for BPF_LINK_CREATE with its `tcx` member."""

    _fields_ = [
        ("prog_fd", ct.c_uint32),
        ("target_ifindex", ct.c_uint32),
        ("attach_type", ct.c_uint32),
        ("flags", ct.c_uint32),
        ("relative_fd_or_id", ct.c_uint32),  # the union starts 8-aligned at offset 16
        ("_pad", ct.c_uint32),
        ("expected_revision", ct.c_uint64),
    ]


class _LinkUpdateAttr(ct.Structure):
    _fields_ = [
        ("link_fd", ct.c_uint32),
        ("new_prog_fd", ct.c_uint32),
        ("flags", ct.c_uint32),
        ("old_prog_fd", ct.c_uint32),
    ]


class _IdAttr(ct.Structure):
    """`union bpf_attr` for BPF_*_GET_FD_BY_ID (and BPF_LINK_DETACH: one u32 fd)."""

    _fields_ = [("id", ct.c_uint32), ("next_id", ct.c_uint32), ("open_flags", ct.c_uint32)]


class _LinkInfo(ct.Structure):
    """The head of `struct bpf_link_info` and its `tcx` member (the union is 8-aligned)."""

    _fields_ = [
        ("type", ct.c_uint32),
        ("id", ct.c_uint32),
        ("prog_id", ct.c_uint32),
        ("_pad", ct.c_uint32),
        ("ifindex", ct.c_uint32),
        ("attach_type", ct.c_uint32),
        ("_rest", ct.c_uint8 * 48),  # the other union members are larger; the kernel fills
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


@dataclass(frozen=True, slots=True)
class LinkInfo:
    """What the kernel reports about a link; `ifindex` 0 means its device is gone."""

    type: int
    id: int
    prog_id: int
    ifindex: int
    attach_type: int


@dataclass(frozen=True, slots=True)
class TcxChain:
    """The programs of one tcx hook in the order they run, with their links' ids (0 for a
    program attached without a link) and the hook's revision (bumped by every change)."""

    prog_ids: tuple[int, ...]
    link_ids: tuple[int, ...]
    revision: int


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


def prog_fd_by_id(prog_id: int) -> int:
    """BPF_PROG_GET_FD_BY_ID: an fd (close-on-exec) of a loaded program (ENOENT if gone)."""
    return _bpf(BPF_PROG_GET_FD_BY_ID, _IdAttr(id=prog_id), f"opening program id {prog_id}")


def prog_info_by_id(prog_id: int) -> ProgInfo | None:
    """The info of a program by kernel id, or None if it was unloaded meanwhile."""
    try:
        fd = prog_fd_by_id(prog_id)
    except CaptureError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise
    try:
        return prog_info(fd)
    finally:
        os.close(fd)


def link_info(fd: int) -> LinkInfo:
    """BPF_OBJ_GET_INFO_BY_FD on a link (EINVAL if `fd` is not a link)."""
    info = _LinkInfo()
    attr = _InfoAttr(bpf_fd=fd, info_len=ct.sizeof(info), info=ct.addressof(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr, f"reading link info of fd {fd}")
    tcx = info.type == BPF_LINK_TYPE_TCX
    return LinkInfo(
        type=int(info.type),
        id=int(info.id),
        prog_id=int(info.prog_id),
        ifindex=int(info.ifindex) if tcx else 0,
        attach_type=int(info.attach_type) if tcx else 0,
    )


def tcx_query(ifindex: int, attach_type: int) -> TcxChain:
    """BPF_PROG_QUERY on a tcx hook of the calling thread's network namespace.

    EINVAL on kernels without tcx (before 6.6), ENODEV for a missing interface.
    """
    progs = (ct.c_uint32 * MAX_TCX_PROGRAMS)()
    links = (ct.c_uint32 * MAX_TCX_PROGRAMS)()
    attr = _QueryAttr(
        target_ifindex=ifindex,
        attach_type=attach_type,
        prog_ids=ct.addressof(progs),
        count=MAX_TCX_PROGRAMS,
        link_ids=ct.addressof(links),
    )
    _bpf(BPF_PROG_QUERY, attr, f"querying tcx hook {attach_type} of ifindex {ifindex}")
    count = min(int(attr.count), MAX_TCX_PROGRAMS)
    return TcxChain(
        prog_ids=tuple(int(progs[i]) for i in range(count)),
        link_ids=tuple(int(links[i]) for i in range(count)),
        revision=int(attr.revision),
    )


def tcx_link_create(
    prog_fd: int,
    ifindex: int,
    attach_type: int,
    flags: int = BPF_F_BEFORE,
    relative: int = 0,
    expected_revision: int = 0,
) -> int:
    """BPF_LINK_CREATE on a tcx hook: a link fd (close-on-exec) that holds the attachment.

    The default, BPF_F_BEFORE without a relative, puts the program at the front of the
    chain. `relative` is an fd, or an id with BPF_F_ID; `expected_revision` (non-zero)
    makes the kernel refuse with ESTALE if the chain changed since it was read. The
    program stays attached while the link has a reference: this fd, or a pin of it.
    """
    attr = _LinkCreateAttr(
        prog_fd=prog_fd,
        target_ifindex=ifindex,
        attach_type=attach_type,
        flags=flags,
        relative_fd_or_id=relative,
        expected_revision=expected_revision,
    )
    return _bpf(BPF_LINK_CREATE, attr, f"attaching a tcx link to ifindex {ifindex}")


def link_update(link_fd: int, new_prog_fd: int) -> None:
    """BPF_LINK_UPDATE: swaps the link's program in place (the position in the chain stays)."""
    attr = _LinkUpdateAttr(link_fd=link_fd, new_prog_fd=new_prog_fd)
    _bpf(BPF_LINK_UPDATE, attr, f"updating the program of link fd {link_fd}")


def link_detach(link_fd: int) -> None:
    """BPF_LINK_DETACH: detaches the link's program now, whatever else holds the link."""
    _bpf(BPF_LINK_DETACH, _IdAttr(id=link_fd), f"detaching link fd {link_fd}")


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


def call_in_netns(netns: str | None, fn: Callable[[], T]) -> T:
    """Runs `fn` in the named network namespace (/run/netns/NAME), or here for None.

    Interface indexes in bpf() (tcx links and queries) are resolved in the calling thread's
    namespace; setns(2) moves only the calling thread, so `fn` runs on a fresh thread that
    enters the namespace, and the caller's thread never changes namespace.
    """
    if netns is None:
        return fn()
    result: list[T] = []
    failure: list[BaseException] = []

    def worker() -> None:
        try:
            fd = os.open(NETNS_RUN_DIR / netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _setns(fd, CLONE_NEWNET) != 0:
                    code = ct.get_errno() or errno.EIO
                    raise CaptureError(f"entering network namespace {netns}", code)
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=worker, name=f"bpf-netns:{netns}", daemon=True)
    thread.start()
    thread.join()
    if failure:
        exc = failure[0]
        if isinstance(exc, OSError):
            raise CaptureError(f"entering network namespace {netns}", exc.errno or 0) from exc
        raise exc
    return result[0]


def has_tcx(ifindex: int) -> bool:
    """Whether the kernel has tcx (Linux 6.6+): a BPF_PROG_QUERY of the tcx ingress hook
    of an existing interface (e.g. lo) succeeds; older kernels reject the attach type."""
    try:
        tcx_query(ifindex, BPF_TCX_INGRESS)
    except CaptureError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    return True
