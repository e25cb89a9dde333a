"""Transparent capture of pod traffic with eBPF: the kernel layer of the node agent.

The agent runs inside the node's network namespace with three IP_TRANSPARENT listeners
(outbound 15001, inbound plaintext 15006, inbound HBONE 15008). `bpf/capture.c` holds the
programs that hand TCP connections of enrolled pods to those listeners with bpf_sk_assign:

* on the node side of every pod veth (ingress = packets leaving a pod): an enrolled
  pod's new connections go to the outbound listener; connections from a pod that is not
  enrolled to an enrolled one go to the inbound listeners (15008 for port 15008, else 15006);
* on the node's uplink (ingress): connections to an enrolled pod go to the inbound
  listeners;
* packets of sockets that already exist in the node namespace (the agent's accepted
  connections and its own spoofed-source connections to pods) go to those sockets;
* traffic to or from the node's own addresses is never captured (kubelet probes), nor is
  anything the agent sends (it leaves through egress paths, where only the guard runs).

Captured packets carry a mark that an `ip rule` sends to a local-delivery table; the
accepted socket's local address is the original destination (getsockname()).

Ordering (see `ordering` and `attach`): the primary CNI may have its own programs on the
same hooks. Ours go to the front: tcx links at the head of the chain where the kernel has
tcx (6.6+), else the first cls_bpf priority (`CaptureConfig.attach` forces either). Every
packet we do not take continues to the next program. `check()` (on attach, and
periodically from the agent) reads each hook, finds anything that runs ahead of ours,
moves ours back to the front where the kernel allows (bounded by `ReassertBudget`), and
otherwise marks the pods behind that hook refused (fail closed, see bpf/capture.c) unless
the operator accepted those programs (`CaptureConfig.allow_ahead`). `hook_status()` and
`pod_capture()` say what was found, for logs, metrics, readiness and the enrolment API.

Fail mode (`FailMode`): when no agent listener is present (the agent died, which empties its
sockmap slots), FailMode.CLOSED (the default) drops the SYN of every connection that would be
captured, so nothing of an enrolled pod leaves in plaintext and nothing reaches it around
the agent; FailMode.OPEN lets such connections through untouched. Established connections
that were never captured (older than the enrolment) keep working either way.

Loading: bcc (with LLVM) never enters the agent process. `start()` runs the short-lived
loader process (`python -m ztunnel.capture load`, see `loader`), which compiles the programs,
pins programs and maps in `CaptureConfig.pin_dir` (on a bpffs) and exits; the agent then
opens the pinned objects with the raw bpf() syscall (`syscalls`), fills the maps, puts its
listener sockets into the sockmap and attaches the programs (`attach`).

Restart: a new agent process constructs `Capture` with the same pin dir and calls `start()`:
the loader reuses the pinned maps (BPF_TABLE_PINNED) and replaces the pinned programs, the
new programs replace ours in place on the uplink and on every pod interface that has them
(tcx links are pinned too, so programs stay attached while no agent runs), and the new
listener fds go into the sockmap. Enrolled pods stay enrolled throughout; the old programs
keep working on the same maps until they are replaced.

Modules: `config` (pure, validated records and -D flags), `ordering` (pure: what runs
ahead, verdicts, reports), `syscalls` (bpf() through ctypes, tcx links), `objects` (the
pinned programs and maps by name), `attach` (our programs on the hooks), `loader` (the
loader process and its caller's side), `bpf` (the one bcc user, imported by the loader
process only), `netlink` (the one pyroute2 user: tc filters, XDP, rule and route), `errors`.
IPv4 only: IPv6 addresses of a pod are not captured (the programs do not parse IPv6).
Methods block on syscalls, netlink and the loader process; call them from one thread, not
from an event loop (`hook_status`, `statuses` and the counters may be read from any thread).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from types import TracebackType

from ztunnel.capture import syscalls
from ztunnel.capture.attach import Attacher, detach_all_links
from ztunnel.capture.config import (
    CaptureConfig,
    FailMode,
    ListenerSlot,
    PodEnrolment,
    listener_slots,
)
from ztunnel.capture.errors import CaptureError
from ztunnel.capture.loader import run_loader
from ztunnel.capture.netlink import Direction, Netlink, peer_ifindex_in
from ztunnel.capture.objects import (
    GUARD_PROGRAM,
    POD_PROGRAM,
    POD_PROGRAM_COPY,
    PROGRAM_NAMES,
    UPLINK_PROGRAM,
    UPLINK_PROGRAM_COPY,
    CaptureMaps,
    CapturePrograms,
    LoadReport,
    remove_pins,
)
from ztunnel.capture.ordering import (
    AcceptPolicy,
    Attachment,
    AttachMode,
    HookKind,
    HookStatus,
    HookView,
    Ours,
    PodCapture,
    ReassertBudget,
    Verdict,
    analyse,
    decide,
    hook_detail,
    pod_capture,
)

__all__ = [
    "AttachMode",
    "Capture",
    "CaptureConfig",
    "CaptureError",
    "CaptureMaps",
    "FailMode",
    "HookKind",
    "HookStatus",
    "ListenerSlot",
    "LoadReport",
    "PodCapture",
    "PodEnrolment",
    "Verdict",
]

log = logging.getLogger(__name__)

_INGRESS_PROGRAMS = {HookKind.POD: POD_PROGRAM, HookKind.UPLINK: UPLINK_PROGRAM}
_POD_PROGRAMS = frozenset({POD_PROGRAM, POD_PROGRAM_COPY})
_UPLINK_PROGRAMS = frozenset({UPLINK_PROGRAM, UPLINK_PROGRAM_COPY})
# A check moves ours to the front at most this many times in a row before it concludes.
_MAX_STEPS = 3


def _identity(status: HookStatus | None) -> tuple[object, ...]:
    """What makes a hook's state news: its verdict and exactly what is ahead."""
    if status is None:
        return ()
    return (status.verdict, tuple((a.layer, a.prog_id, a.priority, a.handle) for a in status.ahead))


class Capture:
    """The capture of one node: programs, pinned maps, hooks and the local-delivery rule.

    Constructing does nothing in the kernel; `start()` loads and attaches. `close()` keeps
    everything in place for the next agent process, `close(keep_pins=False)` uninstalls.
    """

    def __init__(self, config: CaptureConfig) -> None:
        self.config = config
        self.policy = AcceptPolicy(frozenset(config.allow_ahead))
        self._netlink = Netlink(config.netns)
        self._programs: CapturePrograms | None = None
        self._attacher: Attacher | None = None
        self._pod_ifnames: set[str] = set()
        self._pod_ips: dict[str, tuple[ipaddress.IPv4Address, ...]] = {}
        self._ifindex: dict[str, int] = {}
        self._budgets: dict[str, ReassertBudget] = {}
        # Read from other threads: replaced, never mutated in place.
        self._status: Mapping[str, HookStatus] = {}
        self._lock = threading.Lock()
        self.reorders: Counter[str] = Counter()  # by hook kind
        self.detections: Counter[tuple[str, str]] = Counter()  # by (hook kind, layer)
        self.mode: AttachMode | None = None
        self.tcx_available: bool | None = None
        self.load_report: LoadReport | None = None  # what the last start()'s loader did

    def __enter__(self) -> Capture:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def started(self) -> bool:
        return self._programs is not None

    def _maps(self) -> CaptureMaps:
        if self._programs is None:
            raise CaptureError("capture is not started")
        return self._programs.maps

    def _require_attacher(self) -> Attacher:
        if self._attacher is None:
            raise CaptureError("capture is not started")
        return self._attacher

    def probe_tcx(self) -> bool:
        """Whether the kernel has tcx (6.6+), asked in the capture's namespace."""

        def probe() -> bool:
            index = self._netlink.ifindex("lo") or 1
            return syscalls.has_tcx(index)

        return syscalls.call_in_netns(self.config.netns, probe)

    def _resolve_mode(self) -> AttachMode:
        self.tcx_available = self.probe_tcx()
        choice = self.config.attach
        if choice == "tcx" and not self.tcx_available:
            raise CaptureError(
                "attach mode tcx was asked for, but this kernel has no tcx (Linux 6.6+);"
                " use --capture-attach auto or cls_bpf"
            )
        if choice == "cls_bpf" or not self.tcx_available:
            return AttachMode.CLS_BPF
        return AttachMode.TCX

    def start(self, listener_fds: Mapping[str, int]) -> None:
        """Loads the programs (reusing pinned maps), fills the maps, attaches, checks.

        `listener_fds` maps "outbound"/"inbound"/"hbone" to listening sockets of this node's
        namespace; slots not given are emptied (their connections then follow the fail mode).
        Needs `config.pin_dir`: the loader process hands programs and maps over as pins.
        """
        if self._programs is not None:
            raise CaptureError("capture is already started")
        cfg = self.config
        slots = listener_slots(listener_fds)
        if cfg.pin_dir is None:
            raise CaptureError(
                "capture needs a pin directory: the programs are loaded by a separate"
                " process and handed over as pinned objects"
            )
        mode = self._resolve_mode()
        self.load_report = run_loader(cfg)
        programs = CapturePrograms.open_pinned(cfg.pin_dir)
        try:
            for name, prog_id in self.load_report.program_ids.items():
                if programs.prog_info(name).id != prog_id:
                    raise CaptureError(
                        f"pinned program {cfg.pin_dir / name} was replaced while starting:"
                        " is another agent using the same pin directory?"
                    )
            maps = programs.maps
            maps.set_node_addresses(cfg.node_addresses)
            maps.set_fail_mode(cfg.fail_mode)
            for slot in ListenerSlot:
                if slot in slots:
                    maps.set_listener(slot, slots[slot])
                else:
                    maps.clear_listener(slot)
            self._netlink.ensure_local_delivery(cfg.mark, cfg.route_table, cfg.rule_priority)
            attacher = Attacher(cfg, self._netlink, programs, mode, bool(self.tcx_available))
            self._programs, self._attacher, self.mode = programs, attacher, mode
            if cfg.uplink_ifname is not None:
                self._attach_hook(cfg.uplink_ifname, HookKind.UPLINK, cleanup=True)
            # After a restart, pod interfaces still carry the previous process's program:
            # replace it so every interface runs the code we just compiled, in our mode.
            for ifname in attacher.attached(_POD_PROGRAMS):
                if ifname != cfg.uplink_ifname:
                    self._attach_hook(ifname, HookKind.POD, cleanup=True)
                    self._pod_ifnames.add(ifname)
            attacher.collect_defunct_links()
            self.check()
        except BaseException:
            self._programs, self._attacher = None, None
            programs.close()
            raise
        log.info(
            "capture started: pin dir %s, attach mode %s (tcx %s), %d pods enrolled, fail mode %s",
            cfg.pin_dir,
            mode.value,
            "available" if self.tcx_available else "not available",
            len(maps.enrolled()),
            cfg.fail_mode.value,
        )

    def _attach_hook(self, ifname: str, kind: HookKind, cleanup: bool = False) -> None:
        """Our ingress program and the guard on one interface, in our mode; `cleanup` also
        removes what an agent of the other mode (or an older version) attached there."""
        attacher = self._require_attacher()
        attacher.attach(ifname, _INGRESS_PROGRAMS[kind], Direction.INGRESS)
        attacher.attach(ifname, GUARD_PROGRAM, Direction.EGRESS)
        if cleanup:
            other = {m for m in AttachMode if m is not attacher.mode}
            for direction in Direction:
                attacher.detach(ifname, direction, other)
                attacher.remove_stale_filters(ifname, direction)

    def attach_pod_interface(
        self, host_ifname: str, ips: Iterable[ipaddress.IPv4Address] = ()
    ) -> HookStatus | None:
        """Puts the pod program on the node side of a pod veth (every pod's, enrolled or not)
        and the guard on its egress, then checks the hook; returns its status.

        `ips` are the pod's IPv4 addresses: if its hook turns out unsafe they are refused
        (see bpf/capture.c). Idempotent: attaching again replaces our program in place.
        When the veth is a port of a Linux bridge (a `bridge` primary CNI), the pod program
        also goes on the bridge device: a port's tc ingress runs before the bridge, and a
        socket assigned there does not survive bridging, so routed traffic from the pods is
        captured where the bridge passes it up to the node (its ingress). See the README for
        frames the bridge forwards between two pods of the node.
        """
        self._attach_hook(host_ifname, HookKind.POD)
        self._pod_ifnames.add(host_ifname)
        known = self._pod_ips.get(host_ifname, ())
        self._pod_ips[host_ifname] = tuple(dict.fromkeys((*known, *ips)))
        bridge = self._netlink.bridge_of(host_ifname)
        if bridge is not None and bridge not in self._pod_ifnames:
            self._attach_hook(bridge, HookKind.POD)
            self._pod_ifnames.add(bridge)
        attacher = self._require_attacher()
        view = attacher.view(host_ifname)
        status = self._check_one(host_ifname, HookKind.POD, view, time.monotonic())
        self._apply_marks()
        return status

    def register_pod(self, host_ifname: str, ips: Iterable[ipaddress.IPv4Address]) -> None:
        """Tells which addresses a pod veth carries (after a restart, from stored records)."""
        self._pod_ips[host_ifname] = tuple(ips)

    def host_ifname_of(self, pod_netns: str, pod_ifname: str) -> str:
        """The node-side name of a pod's veth: the peer of `pod_ifname` inside `pod_netns`
        (a path such as CNI_NETNS), looked up by ifindex in this node's namespace."""
        peer = peer_ifindex_in(pod_netns, pod_ifname)
        if peer is None:
            raise CaptureError(f"{pod_ifname} in {pod_netns} is not a veth (no peer)")
        name = self._netlink.ifnames().get(peer)
        if name is None:
            raise CaptureError(f"the peer of {pod_ifname} in {pod_netns} is not in this namespace")
        return name

    def detach_pod_interface(self, host_ifname: str) -> None:
        """Removes our programs from a pod veth; a vanished interface is not an error."""
        attacher = self._attacher
        if attacher is not None:
            for direction in Direction:
                attacher.detach(host_ifname, direction)
        else:
            for direction in Direction:
                for handle in self.config.tc_handles:
                    self._netlink.detach_bpf(
                        host_ifname, self.config.tc_priority, handle, direction
                    )
        self._pod_ifnames.discard(host_ifname)
        self._pod_ips.pop(host_ifname, None)
        self._forget(host_ifname)
        if self._programs is not None:
            self._apply_marks()

    def enrol(self, pod: PodEnrolment) -> HookStatus | None:
        """Starts capturing a pod's IPv4 traffic; idempotent. Returns its veth hook's status.

        The program goes on the pod's veth first and the hook is checked (an unsafe hook
        refuses the pod's addresses before they are enrolled), then the addresses go into
        the map, so the first captured packet already finds everything in place.
        """
        maps = self._maps()
        ips = pod.ipv4
        if not ips:
            raise CaptureError(f"pod {pod.namespace}/{pod.name} has no IPv4 address to capture")
        skipped = [ip for ip in pod.ips if ip not in ips]
        if skipped:
            log.warning("pod %s/%s: IPv6 is not captured: %s", pod.namespace, pod.name, skipped)
        status = self.attach_pod_interface(pod.host_ifname, ips)
        index = self._netlink.ifindex(pod.host_ifname) or 0
        for ip in ips:
            maps.enrol(ip, index)
        return status

    def unenrol(self, pod: PodEnrolment) -> None:
        """Stops capturing a pod; idempotent. Its veth keeps the program, which every pod
        veth needs for traffic towards enrolled pods."""
        self.unenrol_addresses(pod.ipv4)

    def unenrol_addresses(self, ips: Iterable[ipaddress.IPv4Address]) -> None:
        """Stops capturing addresses (for reconciling after a restart, without pod records)."""
        maps = self._maps()
        for ip in ips:
            maps.unenrol(ip)

    def enrolled(self) -> dict[ipaddress.IPv4Address, int]:
        """Enrolled addresses (from the kernel map) and the host ifindex recorded for each."""
        return self._maps().enrolled()

    def set_fail_mode(self, mode: FailMode) -> None:
        self._maps().set_fail_mode(mode)

    # ---- checking the hooks ----

    def hooks(self) -> dict[str, HookKind]:
        """Every hook we depend on: the uplink and each pod veth with our program."""
        found = {ifname: HookKind.POD for ifname in sorted(self._pod_ifnames)}
        if self.config.uplink_ifname is not None:
            found[self.config.uplink_ifname] = HookKind.UPLINK
        return found

    def check(self, now: float | None = None) -> Mapping[str, HookStatus]:
        """Checks every hook once: re-attaches ours where it vanished, moves it back to the
        front where something was inserted ahead of it (if the kernel lets us), refuses or
        accepts the rest, and updates the refused addresses. Returns every hook's status."""
        attacher = self._require_attacher()
        now = time.monotonic() if now is None else now
        hooks = self.hooks()
        views = attacher.views(hooks)
        for ifname, kind in hooks.items():
            self._check_one(ifname, kind, views.get(ifname), now)
        self._require_attacher().collect_defunct_links()
        self._apply_marks()
        return self._status

    def _check_one(
        self, ifname: str, kind: HookKind, view: HookView | None, now: float
    ) -> HookStatus | None:
        """Checks one hook, starting from `view` (None: the interface is gone)."""
        try:
            status = self._evaluate(ifname, kind, view, now) if view is not None else None
        except CaptureError as exc:
            if exc.errno == errno.ENODEV:  # the interface went away meanwhile
                status = None
            else:
                previous = self._status.get(ifname)
                status = HookStatus(
                    ifname,
                    kind,
                    self.mode or AttachMode.CLS_BPF,
                    Verdict.REFUSED,
                    previous.ahead if previous else (),
                    note=f"checking the hook failed: {exc}",
                )
        if status is None:
            if kind is HookKind.POD:
                self._pod_ifnames.discard(ifname)
                self._pod_ips.pop(ifname, None)
            self._forget(ifname)
            return None
        self._record(status)
        return status

    def _evaluate(
        self, ifname: str, kind: HookKind, first_view: HookView, now: float
    ) -> HookStatus | None:
        attacher = self._require_attacher()
        mode = attacher.mode
        ours = Ours(frozenset(attacher.ours))
        budget = self._budgets.setdefault(ifname, ReassertBudget())
        note, tried = "", False
        view: HookView | None = first_view
        for step in range(_MAX_STEPS):
            if step:
                view = attacher.view(ifname)
            if view is None:
                return None
            self._ifindex[ifname] = view.ifindex
            analysis = analyse(view, mode, ours)
            if not step:
                self._count_detections(ifname, kind, analysis.ahead)
            verdict = decide(
                analysis,
                mode,
                self.config.tc_priority,
                self.policy,
                may_reorder=budget.allows(now) and not tried,
            )
            if verdict is Verdict.REATTACH:
                log.warning(
                    "capture: ztunnel's program is missing from %s ingress; attaching it again",
                    ifname,
                )
                self._attach_hook(ifname, kind)
                continue
            if verdict is Verdict.REORDER and analysis.ours is not None:
                budget.spend(now)
                self.reorders[kind.value] += 1
                tried = True
                log.warning(
                    "capture: %s runs ahead of ztunnel on %s ingress; moving ztunnel back"
                    " to the front (%d of %d times allowed per %gs)",
                    ", ".join(a.describe() for a in analysis.ahead),
                    ifname,
                    budget.spent,
                    budget.limit,
                    budget.window,
                )
                if not attacher.move_to_front(ifname, analysis.ours):
                    note = (
                        f"re-inserting ztunnel at priority {self.config.tc_priority} did not"
                        " put it first on this kernel"
                    )
                continue
            break
        else:
            verdict = Verdict.REFUSED
            note = note or f"ztunnel was still not first after {_MAX_STEPS} attempts"
        if verdict in (Verdict.REFUSED, Verdict.ACCEPTED) and not note and not budget.allows(now):
            note = (
                f"ztunnel was moved back to the front {budget.spent} times in the last"
                f" {budget.window:g}s: something keeps inserting ahead of it"
            )
        if verdict in (Verdict.REATTACH, Verdict.REORDER):
            verdict = Verdict.REFUSED
        return HookStatus(
            ifname,
            kind,
            mode,
            verdict,
            analysis.ahead if verdict is not Verdict.SAFE else (),
            budget.spent,
            note,
        )

    def _count_detections(self, ifname: str, kind: HookKind, ahead: tuple[Attachment, ...]) -> None:
        """Counts what is ahead now and was not reported ahead by the last check."""
        previous = self._status.get(ifname)
        seen = {(a.layer, a.prog_id, a.handle) for a in (previous.ahead if previous else ())}
        for att in ahead:
            if (att.layer, att.prog_id, att.handle) not in seen:
                self.detections[(kind.value, att.layer.value)] += 1

    def _record(self, status: HookStatus) -> None:
        previous = self._status.get(status.ifname)
        if _identity(previous) != _identity(status):
            level = logging.INFO if status.ok and not status.ahead else logging.WARNING
            if previous is not None or level == logging.WARNING:
                log.log(level, "capture: %s", hook_detail(status))
        with self._lock:
            self._status = {**self._status, status.ifname: status}

    def _forget(self, ifname: str) -> None:
        self._budgets.pop(ifname, None)
        self._ifindex.pop(ifname, None)
        with self._lock:
            self._status = {k: v for k, v in self._status.items() if k != ifname}

    def _apply_marks(self) -> None:
        """Writes the refused addresses: every registered or enrolled address behind a
        refused pod hook, and whether the uplink hook is refused."""
        maps = self._maps()
        refused = {
            self._ifindex[name]: name
            for name, st in self._status.items()
            if st.kind is HookKind.POD and st.refused and name in self._ifindex
        }
        unsafe: dict[ipaddress.IPv4Address, int] = {}
        for index, name in refused.items():
            for ip in self._pod_ips.get(name, ()):
                unsafe[ip] = index
        for ip, index in maps.enrolled().items():
            if index in refused:
                unsafe[ip] = index
        uplink = self._status.get(self.config.uplink_ifname or "")
        maps.set_unsafe(unsafe, uplink is not None and uplink.refused)

    # ---- what was found ----

    def hook_status(self, ifname: str) -> HookStatus | None:
        return self._status.get(ifname)

    @property
    def uplink_status(self) -> HookStatus | None:
        name = self.config.uplink_ifname
        return self._status.get(name) if name is not None else None

    def statuses(self) -> Mapping[str, HookStatus]:
        """The last status of every hook (a snapshot; safe to read from any thread)."""
        return self._status

    def pod_capture(self, host_ifname: str, enrolled: bool) -> PodCapture:
        """The enrolment API's `"capture"` answer for a pod behind `host_ifname`."""
        return pod_capture(enrolled, self._status.get(host_ifname), self.uplink_status)

    # ---- uninstalling ----

    def detach_all(self) -> None:
        """Removes our programs from every interface of the namespace, and the routing rule.

        Other filters and programs, and the clsact qdiscs, stay. Works without `start()`.
        """
        cfg = self.config
        names = frozenset(PROGRAM_NAMES)
        for ifname in sorted(self._netlink.ifnames().values()):
            for direction in Direction:
                for flt in self._netlink.bpf_filters(ifname, direction):
                    if flt.handle in cfg.tc_handles and flt.name.split(":")[0] in names:
                        self._netlink.detach_bpf(ifname, flt.priority, flt.handle, direction)
        if cfg.pin_dir is not None:
            detach_all_links(cfg.pin_dir, cfg.netns)
        self._pod_ifnames.clear()
        self._pod_ips.clear()
        with self._lock:
            self._status = {}
        self._netlink.remove_local_delivery(cfg.mark, cfg.route_table, cfg.rule_priority)

    def close(self, keep_pins: bool = True) -> None:
        """Releases this process's handles.

        keep_pins=True (a restart or an upgrade): programs stay attached (tcx links are
        pinned) and maps pinned, so capture goes on (following the fail mode while no
        listener is present). keep_pins=False (uninstall): detaches everything and removes
        the pins.
        """
        try:
            if not keep_pins:
                self.detach_all()
                if self.config.pin_dir is not None:
                    remove_pins(self.config.pin_dir)
        finally:
            if self._programs is not None:
                self._programs.close()
                self._programs = None
            self._attacher = None
            self._netlink.close()
