"""The one module that uses pyroute2: tc bpf filters and the local-delivery rule in one netns.

Filters are ours by (priority, handle): we add, replace and delete only those, so other
programs in the same clsact hook (a primary CNI's) keep working, and the clsact qdisc itself
is never deleted. netlink errors become `CaptureError` carrying the errno.

pyroute2's synchronous `IPRoute` runs its own event loop: call these methods from a plain
thread (e.g. `asyncio.to_thread`), never directly from a running asyncio loop.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from pyroute2 import IPRoute
from pyroute2 import netns as pyroute2_netns
from pyroute2.netlink.exceptions import NetlinkError

from ztunnel.capture.errors import CaptureError

RT_SCOPE_HOST = 254
RTPROT_STATIC = 4


class Direction(enum.Enum):
    """clsact hooks, by their parent handle (TC_H_MIN_INGRESS / TC_H_MIN_EGRESS)."""

    INGRESS = 0xFFFFFFF2
    EGRESS = 0xFFFFFFF3


@dataclass(frozen=True, slots=True)
class TcFilter:
    """A bpf filter found in a clsact hook."""

    ifname: str
    direction: Direction
    priority: int
    handle: int
    name: str


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

    def bpf_filters(self, ifname: str, direction: Direction = Direction.INGRESS) -> list[TcFilter]:
        """The bpf filters in one clsact hook (empty if the interface or the hook is absent)."""
        index = self.ifindex(ifname)
        if index is None:
            return []
        try:
            messages = self._sock().get_filters(index=index, parent=direction.value)
        except NetlinkError as exc:
            if exc.code in (errno.EINVAL, errno.ENODEV, errno.ENOENT):
                return []
            raise CaptureError(f"listing filters of {ifname} in {self._where}", exc.code) from exc
        filters = []
        for msg in messages:
            # A dump lists each priority's chain head (handle 0) before its filters.
            if msg.get_attr("TCA_KIND") != "bpf" or not msg["handle"]:
                continue
            options = msg.get_attr("TCA_OPTIONS")
            name = options.get_attr("TCA_BPF_NAME") if options is not None else None
            filters.append(
                TcFilter(
                    ifname=ifname,
                    direction=direction,
                    priority=int(msg["info"]) >> 16,
                    handle=int(msg["handle"]),
                    name=str(name or ""),
                )
            )
        return filters

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
