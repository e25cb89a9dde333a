"""The one module that uses pyroute2: tc filters, XDP and the local-delivery rule in one netns.

Filters are ours by (priority, handle): we add, replace and delete only those, so other
programs in the same clsact hook (a primary CNI's) keep working, and the clsact qdisc itself
is never deleted. Listing a hook returns every filter of chain 0 (any kind) in the order the
kernel runs them, and the XDP programs of the namespace's links: what runs ahead of ours.
Those two listings run every check of the hooks (each second), so they are read with a plain
rtnetlink dump socket and a small attribute parser (`RawDump`, `raw_attrs`) instead of
pyroute2, whose message decoding costs milliseconds per link; changes go through pyroute2.
netlink errors become `CaptureError` carrying the errno.

pyroute2's synchronous `IPRoute` runs its own event loop: call these methods from a plain
thread (e.g. `asyncio.to_thread`), never directly from a running asyncio loop.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import os
import socket
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

from ztunnel.capture import pyroute2_lean
from ztunnel.capture.errors import CaptureError

if TYPE_CHECKING:
    from pyroute2 import IPRoute
    from pyroute2 import netns as pyroute2_netns
    from pyroute2.netlink.exceptions import NetlinkError
else:
    # Without the package __init__'s every netlink family: 7 MB less agent RSS.
    IPRoute, pyroute2_netns, NetlinkError = pyroute2_lean.load()

RT_SCOPE_HOST = 254
RTPROT_STATIC = 4

# rtnetlink as read by RawDump: include/uapi/linux/netlink.h (nlmsghdr, NLM_F_*, NLMSG_*),
# include/uapi/linux/rtnetlink.h (RTM_*, struct ifinfomsg, struct tcmsg, TCA_*),
# include/uapi/linux/if_link.h (IFLA_*, IFLA_XDP_*), include/uapi/linux/pkt_cls.h (TCA_BPF_*).
NETLINK_ROUTE = 0
RTM_GETLINK = 18
RTM_GETTFILTER = 46
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
IFLA_IFNAME = 3
IFLA_XDP = 43
IFLA_XDP_PROG_IDS = (4, 5, 6, 7)  # PROG_ID, DRV_PROG_ID, SKB_PROG_ID, HW_PROG_ID
TCA_KIND = 1
TCA_OPTIONS = 2
TCA_CHAIN = 11
TCA_BPF_NAME = 7
TCA_BPF_ID = 11
_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_IFINFOMSG = struct.Struct("=BBHiII")  # family, pad, type, index, flags, change
_TCMSG = struct.Struct("=BBHiIII")  # family, pad, pad, ifindex, handle, parent, info
_NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER
DUMP_TIMEOUT = 5.0


class Direction(enum.Enum):
    """clsact hooks, by their parent handle (TC_H_MIN_INGRESS / TC_H_MIN_EGRESS)."""

    INGRESS = 0xFFFFFFF2
    EGRESS = 0xFFFFFFF3


@dataclass(frozen=True, slots=True)
class TcFilter:
    """A filter found in a clsact hook: for `kind` bpf, `name` is its TCA_BPF_NAME and
    `prog_id` the program it runs; other kinds (u32, flower, ...) have neither."""

    ifname: str
    direction: Direction
    priority: int
    handle: int
    name: str
    kind: str = "bpf"
    prog_id: int = 0
    chain: int = 0


@dataclass(frozen=True, slots=True)
class LinkXdp:
    """An interface's index and the XDP programs on it."""

    index: int
    xdp: tuple[int, ...] = ()


def raw_attrs(data: bytes, start: int, end: int) -> dict[int, bytes]:
    """The netlink attributes (type -> payload) packed in data[start:end]; the first of
    each type wins. Malformed lengths end the walk (the kernel never sends them)."""
    attrs: dict[int, bytes] = {}
    pos = start
    while pos + 4 <= end:
        length, kind = struct.unpack_from("=HH", data, pos)
        if length < 4 or pos + length > end:
            break
        attrs.setdefault(kind & _NLA_TYPE_MASK, data[pos + 4 : pos + length])
        pos += (length + 3) & ~3
    return attrs


def _u32(value: bytes | None) -> int:
    return int(struct.unpack("=I", value[:4])[0]) if value is not None and len(value) >= 4 else 0


def _text(value: bytes | None) -> str:
    return value.split(b"\0", 1)[0].decode(errors="replace") if value else ""


class RawDump:
    """rtnetlink dump requests on a plain NETLINK_ROUTE socket of one namespace: each answer
    is the list of (message type, payload) of the dump; an NLMSG_ERROR raises OSError."""

    def __init__(self, netns: str | None) -> None:
        self._netns = netns
        self._sock: socket.socket | None = None
        self._seq = 0

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _socket(self) -> socket.socket:
        if self._sock is None:
            # A netlink socket belongs to the namespace it was created in.
            from ztunnel.capture.syscalls import call_in_netns

            def make() -> socket.socket:
                return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)

            sock = call_in_netns(self._netns, make)
            sock.settimeout(DUMP_TIMEOUT)
            sock.bind((0, 0))
            self._sock = sock
        return self._sock

    def dump(self, msg_type: int, body: bytes) -> list[tuple[int, bytes]]:
        sock = self._socket()
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        header = _NLMSGHDR.pack(
            _NLMSGHDR.size + len(body), msg_type, NLM_F_REQUEST | NLM_F_DUMP, self._seq, 0
        )
        sock.send(header + body)
        messages: list[tuple[int, bytes]] = []
        while True:
            data = sock.recv(1 << 16)
            pos = 0
            while pos + _NLMSGHDR.size <= len(data):
                length, kind, _flags, seq, _pid = _NLMSGHDR.unpack_from(data, pos)
                if length < _NLMSGHDR.size or pos + length > len(data):
                    raise OSError(errno.EBADMSG, "truncated netlink message")
                payload = data[pos + _NLMSGHDR.size : pos + length]
                pos += (length + 3) & ~3
                if seq != self._seq:
                    continue  # an answer to an earlier request that timed out
                if kind == NLMSG_DONE:
                    return messages
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", payload)[0] if len(payload) >= 4 else 0
                    raise OSError(code or errno.EIO, os.strerror(code or errno.EIO))
                messages.append((kind, payload))


@contextmanager
def _translated(what: str) -> Iterator[None]:
    try:
        yield
    except NetlinkError as exc:
        raise CaptureError(what, exc.code) from exc
    except OSError as exc:
        raise CaptureError(what, exc.errno or 0) from exc


def peer_ifindex_in(netns_path: str, ifname: str, timeout: float = 10.0) -> int | None:
    """The veth peer's ifindex of `ifname` inside another namespace (a path, e.g. CNI_NETNS).

    Read on a short-lived thread that enters the namespace: setns(2) moves only that thread.
    (pyroute2's `IPRoute(netns=...)` forks the calling process for this, and a fork of the
    agent would run the agent's own shutdown code in the child.)
    """
    result: list[int | None] = []
    failure: list[BaseException] = []

    def worker() -> None:
        try:
            with _translated(f"entering {netns_path}"):
                pyroute2_netns.setns(netns_path, flags=0)  # flags=0: never create it
            with Netlink() as nl:
                result.append(nl.peer_ifindex(ifname))
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=worker, name=f"netns lookup {netns_path}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise CaptureError(f"looking up {ifname} in {netns_path} timed out", errno.ETIMEDOUT)
    if failure:
        if isinstance(failure[0], CaptureError):
            raise failure[0]
        raise CaptureError(f"looking up {ifname} in {netns_path}: {failure[0]}")
    return result[0]


class Netlink:
    """rtnetlink in one network namespace: `netns` None is the current one, else a name.

    The socket is opened on first use; a named namespace must exist (it is never created).
    """

    def __init__(self, netns: str | None = None) -> None:
        self._netns = netns
        self._ipr: Any = None
        self._raw = RawDump(netns)

    def __enter__(self) -> Netlink:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None
        self._raw.close()

    @property
    def _where(self) -> str:
        return f"netns {self._netns}" if self._netns else "current netns"

    def _sock(self) -> Any:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass  # no loop in this thread: good
        else:
            raise CaptureError(
                "netlink calls block and pyroute2 runs its own event loop:"
                " call them from a worker thread (asyncio.to_thread), not from the loop"
            )
        if self._ipr is None:
            with _translated(f"opening rtnetlink in {self._where}"):
                # flags=0: never create the namespace (pyroute2 defaults to O_CREAT).
                self._ipr = IPRoute(netns=self._netns, flags=0) if self._netns else IPRoute()
        return self._ipr

    def ifindex(self, ifname: str) -> int | None:
        """The interface's index, or None if there is no such interface."""
        with _translated(f"looking up {ifname} in {self._where}"):
            found = self._sock().link_lookup(ifname=ifname)
        return int(found[0]) if found else None

    def _require_ifindex(self, ifname: str) -> int:
        index = self.ifindex(ifname)
        if index is None:
            raise CaptureError(f"no interface {ifname} in {self._where}", errno.ENODEV)
        return index

    def peer_ifindex(self, ifname: str) -> int | None:
        """The ifindex of the other end of veth `ifname` (IFLA_LINK), or None if it has none."""
        index = self._require_ifindex(ifname)
        with _translated(f"reading {ifname} in {self._where}"):
            link = self._sock().get_links(index)[0]
        peer = link.get_attr("IFLA_LINK")
        return int(peer) if peer else None

    def bridge_of(self, ifname: str) -> str | None:
        """The Linux bridge `ifname` is a port of (IFLA_MASTER of kind bridge), or None."""
        index = self._require_ifindex(ifname)
        with _translated(f"reading {ifname} in {self._where}"):
            master = self._sock().get_links(index)[0].get_attr("IFLA_MASTER")
            if not master:
                return None
            link = self._sock().get_links(int(master))[0]
        info = link.get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
        return str(link.get_attr("IFLA_IFNAME")) if kind == "bridge" else None

    def ifnames(self) -> dict[int, str]:
        """All interfaces of the namespace: index -> name."""
        with _translated(f"listing links in {self._where}"):
            links = self._sock().get_links()
        return {int(link["index"]): str(link.get_attr("IFLA_IFNAME")) for link in links}

    def attach_bpf(
        self,
        ifname: str,
        prog_fd: int,
        name: str,
        priority: int,
        handle: int,
        direction: Direction = Direction.INGRESS,
    ) -> None:
        """Installs (or atomically replaces) our direct-action filter at (priority, handle)."""
        index = self._require_ifindex(ifname)
        ipr = self._sock()
        try:
            ipr.tc("add", "clsact", index)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:  # somebody's clsact is already there: share it
                raise CaptureError(f"adding clsact to {ifname} in {self._where}", exc.code) from exc
        with _translated(f"attaching {name} to {ifname} {direction.name.lower()}"):
            ipr.tc(
                "replace-filter",
                "bpf",
                index,
                handle,
                fd=prog_fd,
                name=name,
                parent=direction.value,
                prio=priority,
                classid=1,
                direct_action=True,
            )

    def detach_bpf(
        self,
        ifname: str,
        priority: int,
        handle: int,
        direction: Direction = Direction.INGRESS,
    ) -> bool:
        """Removes only our filter; returns False if it (or the interface) was not there."""
        index = self.ifindex(ifname)
        if index is None:
            return False
        try:
            self._sock().tc(
                "del-filter", "bpf", index, handle, parent=direction.value, prio=priority
            )
        except NetlinkError as exc:
            # ENOENT: no such filter; EINVAL: no clsact at all; ENODEV: link just vanished.
            if exc.code in (errno.ENOENT, errno.EINVAL, errno.ENODEV):
                return False
            raise CaptureError(
                f"detaching filter from {ifname} in {self._where}", exc.code
            ) from exc
        return True

    def tc_filters(self, ifname: str, direction: Direction = Direction.INGRESS) -> list[TcFilter]:
        """Every filter of chain 0 of a clsact hook, in the order the kernel runs them
        (by priority, then as listed); empty if the interface or the hook is absent."""
        index = self.ifindex(ifname)
        if index is None:
            return []
        return self.tc_filters_of(index, ifname, direction)

    def tc_filters_of(self, index: int, ifname: str, direction: Direction) -> list[TcFilter]:
        """`tc_filters` for an interface whose index is known."""
        request = _TCMSG.pack(socket.AF_UNSPEC, 0, 0, index, 0, direction.value, 0)
        try:
            messages = self._raw.dump(RTM_GETTFILTER, request)
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.ENODEV, errno.ENOENT):
                return []
            what = f"listing filters of {ifname} in {self._where}"
            raise CaptureError(what, exc.errno or 0) from exc
        filters = []
        for _kind, payload in messages:
            if len(payload) < _TCMSG.size:
                continue
            _f, _p1, _p2, _index, handle, _parent, info = _TCMSG.unpack_from(payload)
            # A dump lists each priority's chain head (handle 0) before its filters.
            if not handle:
                continue
            attrs = raw_attrs(payload, _TCMSG.size, len(payload))
            if _u32(attrs.get(TCA_CHAIN)) != 0:
                continue  # reached only through a jump from a chain-0 filter
            kind = _text(attrs.get(TCA_KIND))
            options = attrs.get(TCA_OPTIONS) or b""
            bpf = raw_attrs(options, 0, len(options)) if kind == "bpf" else {}
            filters.append(
                TcFilter(
                    ifname=ifname,
                    direction=direction,
                    priority=info >> 16,
                    handle=handle,
                    name=_text(bpf.get(TCA_BPF_NAME)),
                    kind=kind,
                    prog_id=_u32(bpf.get(TCA_BPF_ID)),
                )
            )
        filters.sort(key=lambda f: f.priority)  # stable: keeps the kernel's order within one
        return filters

    def bpf_filters(self, ifname: str, direction: Direction = Direction.INGRESS) -> list[TcFilter]:
        """The bpf filters in one clsact hook (empty if the interface or the hook is absent)."""
        return [f for f in self.tc_filters(ifname, direction) if f.kind == "bpf"]

    def links(self) -> dict[str, LinkXdp]:
        """Every interface of the namespace by name, with its index and the ids of its XDP
        programs (one per attach mode; with several modes at once the kernel reports each
        mode's program separately): one dump for a whole check of the hooks."""
        request = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0, 0)
        try:
            messages = self._raw.dump(RTM_GETLINK, request)
        except OSError as exc:
            raise CaptureError(f"listing links in {self._where}", exc.errno or 0) from exc
        found: dict[str, LinkXdp] = {}
        for _kind, payload in messages:
            if len(payload) < _IFINFOMSG.size:
                continue
            index = _IFINFOMSG.unpack_from(payload)[3]
            attrs = raw_attrs(payload, _IFINFOMSG.size, len(payload))
            xdp = attrs.get(IFLA_XDP) or b""
            nested = raw_attrs(xdp, 0, len(xdp))
            ids = {_u32(nested.get(kind)) for kind in IFLA_XDP_PROG_IDS} - {0}
            found[_text(attrs.get(IFLA_IFNAME))] = LinkXdp(index, tuple(sorted(ids)))
        return found

    def ensure_local_delivery(self, mark: int, table: int, priority: int) -> None:
        """`ip rule add fwmark MARK/MARK lookup TABLE` + `ip route replace local 0/0 dev lo`.

        Marked packets (captured by the programs) are delivered to the local stack even though
        their destination address is not the node's; idempotent.
        """
        ipr = self._sock()
        try:
            ipr.rule(
                "add",
                family=socket.AF_INET,
                fwmark=mark,
                fwmask=mark,
                table=table,
                priority=priority,
            )
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:  # the identical rule is there already
                raise CaptureError(f"adding fwmark rule in {self._where}", exc.code) from exc
        lo = self._require_ifindex("lo")
        with _translated(f"adding local route to table {table} in {self._where}"):
            ipr.route(
                "replace",
                family=socket.AF_INET,
                dst="0.0.0.0/0",
                type="local",
                oif=lo,
                table=table,
                scope=RT_SCOPE_HOST,
                proto=RTPROT_STATIC,
            )

    def remove_local_delivery(self, mark: int, table: int, priority: int) -> None:
        """Undoes `ensure_local_delivery`; idempotent."""
        ipr = self._sock()
        try:
            ipr.rule(
                "del",
                family=socket.AF_INET,
                fwmark=mark,
                fwmask=mark,
                table=table,
                priority=priority,
            )
        except NetlinkError as exc:
            if exc.code != errno.ENOENT:
                raise CaptureError(f"removing fwmark rule in {self._where}", exc.code) from exc
        lo = self.ifindex("lo")
        if lo is None:
            return
        try:
            ipr.route(
                "del",
                family=socket.AF_INET,
                dst="0.0.0.0/0",
                type="local",
                oif=lo,
                table=table,
                scope=RT_SCOPE_HOST,
            )
        except NetlinkError as exc:
            if exc.code not in (errno.ESRCH, errno.ENOENT):
                raise CaptureError(f"removing local route in {self._where}", exc.code) from exc
