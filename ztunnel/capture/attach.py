"""Our programs on the hooks: attach, detach, read a hook back, move ours to the front.

Two kinds of attachment (`ordering.AttachMode`):

* tcx (Linux 6.6+): a BPF link per hook, created with BPF_F_BEFORE and no relative, i.e. at
  the front of the hook's `bpf_mprog` chain, and pinned at `<pin dir>/links/tcx_<ifindex>_
  <ingress|egress>` so that the program stays attached when the agent exits (a link lives
  as long as a reference to it does). A restarted agent swaps the program inside each link
  in place (BPF_LINK_UPDATE: the position is kept). Moving ours back to the front attaches
  the twin program (a chain holds a program only once) at the front, pins the new link over
  the old pin and detaches the old link: at every moment one of them runs.
* cls_bpf: a direct-action filter in the clsact qdisc at `CaptureConfig.tc_priority` (the
  first priority by default) under one of our two handles. The kernel runs a filter added
  to a priority before the older ones of that priority, so ours is moved to the front by
  adding it under the other handle and deleting the old one, but only if the listing then
  shows it first (otherwise the new one is deleted again and nothing changed).

The guard program goes on the egress hook of the same interfaces, at the front likewise.
tcx calls run in the configured namespace (`syscalls.call_in_netns`); netlink is `Netlink`.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from ztunnel.capture import syscalls
from ztunnel.capture.config import CaptureConfig
from ztunnel.capture.errors import CaptureError
from ztunnel.capture.netlink import Direction, Netlink, TcFilter
from ztunnel.capture.objects import PROGRAM_NAMES, PROGRAM_TWINS, CapturePrograms, pin_replacing
from ztunnel.capture.ordering import Attachment, AttachMode, HookView, Layer

log = logging.getLogger(__name__)
T = TypeVar("T")

LINKS_DIR = "links"
_TCX_ATTACH = {
    Direction.INGRESS: syscalls.BPF_TCX_INGRESS,
    Direction.EGRESS: syscalls.BPF_TCX_EGRESS,
}
_NAME_CACHE_LIMIT = 4096


def links_dir(pin_dir: Path) -> Path:
    return pin_dir / LINKS_DIR


def link_pin(pin_dir: Path, ifindex: int, direction: Direction) -> Path:
    return links_dir(pin_dir) / f"tcx_{ifindex}_{direction.name.lower()}"


def detach_all_links(pin_dir: Path, netns: str | None) -> None:
    """Detaches and unpins every tcx link of ours (uninstall; needs no loaded programs)."""
    directory = links_dir(pin_dir)
    if not directory.is_dir():
        return

    def work() -> None:
        for path in sorted(directory.iterdir()):
            _detach_pinned_link(path)

    syscalls.call_in_netns(netns, work)


def _detach_pinned_link(path: Path) -> None:
    fd = _open_pin(path)
    if fd is None:
        return
    try:
        syscalls.link_detach(fd)
    except CaptureError as exc:
        # ENOLINK: the device is gone and the link with it (already defunct).
        if exc.errno not in (errno.ENOLINK, errno.EINVAL, errno.ENOENT):
            raise
    finally:
        os.close(fd)
    path.unlink(missing_ok=True)


def _open_pin(path: Path) -> int | None:
    try:
        return syscalls.obj_get(path)
    except CaptureError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise


class Attacher:
    """Attachments of our programs in one network namespace, in one `AttachMode`.

    Works on the programs opened from the pin directory (`CapturePrograms`); reads what
    else is on a hook whatever the mode (tcx programs run before every clsact filter, so in
    cls_bpf mode they are ahead of ours). Blocking; call from the capture thread.
    """

    def __init__(
        self,
        config: CaptureConfig,
        netlink: Netlink,
        programs: CapturePrograms,
        mode: AttachMode,
        tcx_available: bool,
    ) -> None:
        if config.pin_dir is None:
            raise CaptureError("attaching needs the pin directory")
        if mode is AttachMode.TCX and not tcx_available:
            raise CaptureError("this kernel has no tcx (Linux 6.6+): use cls_bpf", errno.EINVAL)
        self.config = config
        self.pin_dir: Path = config.pin_dir
        self.netlink = netlink
        self.programs = programs
        self.mode = mode
        self.tcx_available = tcx_available
        self.ours: dict[int, str] = {programs.prog_info(n).id: n for n in PROGRAM_NAMES}
        self._names: dict[int, str] = {}

    # ---- helpers ----

    def _in_netns(self, fn: Callable[[], T]) -> T:
        return syscalls.call_in_netns(self.config.netns, fn)

    def prog_name(self, prog_id: int) -> str:
        """A program's name by id (ours by heart, others cached; "?" once unloaded)."""
        if prog_id in self.ours:
            return self.ours[prog_id]
        name = self._names.get(prog_id)
        if name is None:
            info = syscalls.prog_info_by_id(prog_id)
            name = info.name if info is not None else "?"
            if len(self._names) >= _NAME_CACHE_LIMIT:
                self._names.clear()
            self._names[prog_id] = name
        return name

    def _require_ifindex(self, ifname: str) -> int:
        index = self.netlink.ifindex(ifname)
        if index is None:
            raise CaptureError(f"no interface {ifname}", errno.ENODEV)
        return index

    # ---- attach and detach ----

    def attach(self, ifname: str, program: str, direction: Direction) -> None:
        """Puts `program` on a hook, or swaps the program of our existing attachment there
        in place (keeping its place; a twin stays a twin). Idempotent."""
        if self.mode is AttachMode.TCX:
            self._attach_tcx(self._require_ifindex(ifname), program, direction)
        else:
            self._attach_cls(ifname, program, direction)

    def _attach_tcx(self, ifindex: int, program: str, direction: Direction) -> None:
        path = link_pin(self.pin_dir, ifindex, direction)
        path.parent.mkdir(exist_ok=True)
        attach_type = _TCX_ATTACH[direction]

        def work() -> None:
            fd = _open_pin(path)
            if fd is not None:
                try:
                    info = syscalls.link_info(fd)
                    if info.ifindex == ifindex and info.attach_type == attach_type:
                        current = self.prog_name(info.prog_id)
                        target = (
                            current if current in (program, PROGRAM_TWINS.get(program)) else program
                        )
                        new_fd = self.programs.prog_fd(target)
                        if syscalls.prog_info(new_fd).id != info.prog_id:
                            syscalls.link_update(fd, new_fd)
                        return
                finally:
                    os.close(fd)
                path.unlink(missing_ok=True)  # a link whose device is gone (ifindex reused)
            fd = syscalls.tcx_link_create(self.programs.prog_fd(program), ifindex, attach_type)
            try:
                pin_replacing(fd, path)
            except BaseException:
                syscalls.link_detach(fd)
                raise
            finally:
                os.close(fd)

        self._in_netns(work)

    def _attach_cls(self, ifname: str, program: str, direction: Direction) -> None:
        cfg = self.config
        prog_fd = self.programs.prog_fd(program)
        handles = [f.handle for f in self._our_filters(ifname, direction)] or [cfg.tc_handle]
        for handle in handles:
            self.netlink.attach_bpf(ifname, prog_fd, program, cfg.tc_priority, handle, direction)

    def _our_filters(self, ifname: str, direction: Direction) -> list[TcFilter]:
        cfg = self.config
        return [
            f
            for f in self.netlink.bpf_filters(ifname, direction)
            if f.priority == cfg.tc_priority
            and f.handle in cfg.tc_handles
            and f.name.split(":")[0] in PROGRAM_NAMES
        ]

    def detach(self, ifname: str, direction: Direction, modes: Iterable[AttachMode] = ()) -> None:
        """Removes our attachments of `modes` (default: both kinds) from a hook; a missing
        interface or attachment is not an error."""
        modes = set(modes) or set(AttachMode)
        if AttachMode.CLS_BPF in modes:
            for handle in self.config.tc_handles:
                self.netlink.detach_bpf(ifname, self.config.tc_priority, handle, direction)
        if AttachMode.TCX in modes:
            index = self.netlink.ifindex(ifname)
            if index is not None:
                self._detach_link(link_pin(self.pin_dir, index, direction))

    def _detach_link(self, path: Path) -> None:
        self._in_netns(lambda: _detach_pinned_link(path))

    def remove_stale_filters(self, ifname: str, direction: Direction) -> None:
        """Removes our filters at another priority than ours (left by an older version)."""
        cfg = self.config
        for f in self.netlink.bpf_filters(ifname, direction):
            if (
                f.handle in cfg.tc_handles
                and f.priority != cfg.tc_priority
                and f.name.split(":")[0] in PROGRAM_NAMES
            ):
                self.netlink.detach_bpf(ifname, f.priority, f.handle, direction)

    def collect_defunct_links(self) -> list[Path]:
        """Removes pins of our links whose device is gone; returns them."""
        directory = links_dir(self.pin_dir)
        if not directory.is_dir():
            return []
        removed = []
        for path in sorted(directory.iterdir()):
            fd = _open_pin(path)
            if fd is None:
                continue
            try:
                info = syscalls.link_info(fd)
            finally:
                os.close(fd)
            if info.ifindex == 0:
                path.unlink(missing_ok=True)
                removed.append(path)
        return removed

    def attached(self, programs: Iterable[str]) -> dict[str, AttachMode]:
        """Interfaces whose ingress hook carries one of `programs` of ours (by name, any
        generation: also what an older agent attached), and how."""
        wanted = frozenset(programs)
        names = self.netlink.ifnames()
        found: dict[str, AttachMode] = {}
        directory = links_dir(self.pin_dir)
        if directory.is_dir():
            for path in sorted(directory.iterdir()):
                fd = _open_pin(path)
                if fd is None:
                    continue
                try:
                    info = syscalls.link_info(fd)
                finally:
                    os.close(fd)
                ifname = names.get(info.ifindex)
                if (
                    ifname is not None
                    and info.attach_type == syscalls.BPF_TCX_INGRESS
                    and self.prog_name(info.prog_id) in wanted
                ):
                    found[ifname] = AttachMode.TCX
        for ifname in names.values():
            if ifname in found:
                continue
            if any(
                f.name.split(":")[0] in wanted for f in self._our_filters(ifname, Direction.INGRESS)
            ):
                found[ifname] = AttachMode.CLS_BPF
        return found

    # ---- reading a hook ----

    def views(self, ifnames: Iterable[str]) -> dict[str, HookView]:
        """What runs on the ingress hook of each interface, in order; interfaces that are
        gone are left out. One link dump and (in the namespace) one pass of tcx queries for
        all of them; in cls_bpf mode one filter dump per interface."""
        links = self.netlink.links()
        present = {name: links[name] for name in ifnames if name in links}
        chains: dict[str, syscalls.TcxChain | None] = dict.fromkeys(present)
        if self.tcx_available and present:

            def query() -> None:
                for name, link in present.items():
                    try:
                        chains[name] = syscalls.tcx_query(link.index, syscalls.BPF_TCX_INGRESS)
                    except CaptureError as exc:
                        if exc.errno != errno.ENODEV:
                            raise
                        chains.pop(name)  # gone meanwhile

            self._in_netns(query)
        views = {}
        for name, link in present.items():
            if name not in chains:
                continue
            xdp = tuple(Attachment(Layer.XDP, self.prog_name(i), prog_id=i) for i in link.xdp)
            chain = chains[name]
            tcx = None
            if chain is not None:
                tcx = tuple(
                    Attachment(Layer.TCX, self.prog_name(p), prog_id=p, link_id=k, position=i)
                    for i, (p, k) in enumerate(zip(chain.prog_ids, chain.link_ids, strict=True))
                )
            tc: tuple[Attachment, ...] = ()
            if self.mode is AttachMode.CLS_BPF:
                tc = tuple(
                    Attachment(
                        Layer.TC,
                        self._filter_name(f),
                        prog_id=f.prog_id,
                        priority=f.priority,
                        handle=f.handle,
                        position=i,
                    )
                    for i, f in enumerate(
                        self.netlink.tc_filters_of(link.index, name, Direction.INGRESS)
                    )
                )
            views[name] = HookView(
                name, link.index, xdp, tcx, tc, chain.revision if chain is not None else 0
            )
        return views

    def view(self, ifname: str) -> HookView | None:
        """What runs on one interface's ingress hook; None if the interface is gone."""
        return self.views([ifname]).get(ifname)

    def _filter_name(self, f: TcFilter) -> str:
        """A bpf filter by its program's name (what --capture-allow-ahead matches), else by
        its tc name; any other filter by its kind (u32, flower, ...)."""
        if f.kind != "bpf":
            return f.kind
        return self.prog_name(f.prog_id) if f.prog_id else f.name

    # ---- moving ours to the front ----

    def move_to_front(self, ifname: str, current: Attachment) -> bool:
        """Attaches ours again so that it runs first, then removes the old attachment.

        Returns False when the kernel's order did not put the new one first (cls_bpf: it is
        removed again; tcx cannot fail that way short of a concurrent insertion).
        """
        program = self.ours.get(current.prog_id)
        if program is None:
            raise CaptureError(f"program id {current.prog_id} on {ifname} is not ours")
        if self.mode is AttachMode.TCX:
            self._move_tcx(self._require_ifindex(ifname), program)
            return True
        return self._move_cls(ifname, program, current.handle)

    def _move_tcx(self, ifindex: int, program: str) -> None:
        twin = PROGRAM_TWINS[program]
        path = link_pin(self.pin_dir, ifindex, Direction.INGRESS)

        def work() -> None:
            old = _open_pin(path)
            fd = syscalls.tcx_link_create(
                self.programs.prog_fd(twin), ifindex, syscalls.BPF_TCX_INGRESS
            )
            try:
                pin_replacing(fd, path)
            except BaseException:
                syscalls.link_detach(fd)
                raise
            finally:
                os.close(fd)
            if old is not None:
                try:
                    syscalls.link_detach(old)
                finally:
                    os.close(old)

        self._in_netns(work)

    def _move_cls(self, ifname: str, program: str, handle: int) -> bool:
        cfg = self.config
        other = cfg.tc_alt_handle if handle == cfg.tc_handle else cfg.tc_handle
        prog_fd = self.programs.prog_fd(program)
        self.netlink.attach_bpf(ifname, prog_fd, program, cfg.tc_priority, other, Direction.INGRESS)
        listing = self.netlink.tc_filters(ifname, Direction.INGRESS)
        first = listing[0] if listing else None
        keep, drop = (other, handle)
        if first is None or (first.priority, first.handle) != (cfg.tc_priority, other):
            keep, drop = (handle, other)
        self.netlink.detach_bpf(ifname, cfg.tc_priority, drop, Direction.INGRESS)
        return keep == other
