"""Transparent capture of pod traffic with eBPF: the kernel layer of the node agent.

The agent runs inside the node's network namespace with three IP_TRANSPARENT listeners
(outbound 15001, inbound plaintext 15006, inbound HBONE 15008). `bpf/capture.c` holds two tc
programs that hand TCP connections of enrolled pods to those listeners with bpf_sk_assign:

* on the node side of every pod veth (tc ingress = packets leaving a pod): an enrolled
  pod's new connections go to the outbound listener; connections from a pod that is not
  enrolled to an enrolled one go to the inbound listeners (15008 for port 15008, else 15006);
* on the node's uplink (tc ingress): connections to an enrolled pod go to the inbound
  listeners;
* packets of sockets that already exist in the node namespace (the agent's accepted
  connections and its own spoofed-source connections to pods) go to those sockets;
* traffic to or from the node's own addresses is never captured (kubelet probes), nor is
  anything the agent sends (it leaves through egress paths, which have no program).

Captured packets carry a mark that an `ip rule` sends to a local-delivery table; the
accepted socket's local address is the original destination (getsockname()).

Fail mode (`FailMode`): when no agent listener is present (the agent died, which empties its
sockmap slots), FailMode.CLOSED (the default) drops the SYN of every connection that would be
captured, so nothing of an enrolled pod leaves in plaintext and nothing reaches it around
the agent; FailMode.OPEN lets such connections through untouched. Established connections
that were never captured (older than the enrolment) keep working either way.

Loading: bcc (with LLVM) never enters the agent process. `start()` runs the short-lived
loader process (`python -m ztunnel.capture load`, see `loader`), which compiles the programs,
pins programs and maps in `CaptureConfig.pin_dir` (on a bpffs) and exits; the agent then
opens the pinned objects with the raw bpf() syscall (`syscalls`), fills the maps, puts its
listener sockets into the sockmap and attaches the programs with tc.

Restart: a new agent process constructs `Capture` with the same pin dir and calls `start()`:
the loader reuses the pinned maps (BPF_TABLE_PINNED) and replaces the pinned programs, the
new programs replace ours on the uplink and on every pod interface that has them, and the
new listener fds go into the sockmap. Enrolled pods stay enrolled throughout; the old
programs keep working on the same maps until they are replaced.

Modules: `config` (pure, validated records and -D flags), `syscalls` (bpf() through ctypes),
`objects` (the pinned programs and maps by name), `loader` (the loader process and its
caller's side), `bpf` (the one bcc user, imported by the loader process only), `netlink`
(the one pyroute2 user: tc filters, rule and route), `errors`.
IPv4 only: IPv6 addresses of a pod are not captured (the programs do not parse IPv6).
Methods block on syscalls, netlink and the loader process; call them from one thread, not
from an event loop.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Mapping
from types import TracebackType

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
    POD_PROGRAM,
    UPLINK_PROGRAM,
    CaptureMaps,
    CapturePrograms,
    LoadReport,
    remove_pins,
)

__all__ = [
    "Capture",
    "CaptureConfig",
    "CaptureError",
    "CaptureMaps",
    "FailMode",
    "ListenerSlot",
    "LoadReport",
    "PodEnrolment",
]

log = logging.getLogger(__name__)

_PROGRAM_NAMES = frozenset({POD_PROGRAM, UPLINK_PROGRAM})


class Capture:
    """The capture of one node: programs, pinned maps, tc filters and the local-delivery rule.

    Constructing does nothing in the kernel; `start()` loads and attaches. `close()` keeps
    everything in place for the next agent process, `close(keep_pins=False)` uninstalls.
    """

    def __init__(self, config: CaptureConfig) -> None:
        self.config = config
        self._netlink = Netlink(config.netns)
        self._programs: CapturePrograms | None = None
        self._pod_ifnames: set[str] = set()
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

    def start(self, listener_fds: Mapping[str, int]) -> None:
        """Loads the programs (reusing pinned maps), fills the maps and attaches the filters.

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
            self._programs = programs
            if cfg.uplink_ifname is not None:
                self._attach(cfg.uplink_ifname, UPLINK_PROGRAM)
            # After a restart, pod interfaces still carry the previous process's program:
            # replace it so every interface runs the code we just compiled.
            for ifname in self._interfaces_with_program(POD_PROGRAM):
                self._attach(ifname, POD_PROGRAM)
                self._pod_ifnames.add(ifname)
        except BaseException:
            self._programs = None
            programs.close()
            raise
        log.info(
            "capture started: pin dir %s, %d pods enrolled, fail mode %s",
            cfg.pin_dir,
            len(maps.enrolled()),
            cfg.fail_mode.value,
        )

    def _attach(self, ifname: str, program: str) -> None:
        if self._programs is None:
            raise CaptureError("capture is not started")
        self._netlink.attach_bpf(
            ifname,
            self._programs.prog_fd(program),
            program,
            self.config.tc_priority,
            self.config.tc_handle,
            Direction.INGRESS,
        )

    def _interfaces_with_program(self, program: str | None = None) -> list[str]:
        """Interfaces whose ingress hook has our filter (by priority and handle)."""
        wanted = _PROGRAM_NAMES if program is None else frozenset({program})
        found = []
        for ifname in self._netlink.ifnames().values():
            for flt in self._netlink.bpf_filters(ifname):
                if (
                    flt.priority == self.config.tc_priority
                    and flt.handle == self.config.tc_handle
                    and flt.name.split(":")[0] in wanted
                ):
                    found.append(ifname)
                    break
        return found

    def attach_pod_interface(self, host_ifname: str) -> None:
        """Puts the pod program on the node side of a pod veth (every pod's, enrolled or not).

        Idempotent: attaching again replaces our filter in place. When the veth is a port of
        a Linux bridge (a `bridge` primary CNI), the program also goes on the bridge device:
        a port's tc ingress runs before the bridge, and a socket assigned there does not
        survive bridging, so routed traffic from the pods is captured where the bridge
        passes it up to the node (its ingress). Frames the bridge forwards between two
        ports of the same node at layer 2 never reach the node's stack: see the README.
        """
        self._attach(host_ifname, POD_PROGRAM)
        self._pod_ifnames.add(host_ifname)
        bridge = self._netlink.bridge_of(host_ifname)
        if bridge is not None:
            self._attach(bridge, POD_PROGRAM)
            self._pod_ifnames.add(bridge)

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
        """Removes our filter from a pod veth; a vanished interface is not an error."""
        self._netlink.detach_bpf(host_ifname, self.config.tc_priority, self.config.tc_handle)
        self._pod_ifnames.discard(host_ifname)

    def enrol(self, pod: PodEnrolment) -> None:
        """Starts capturing a pod's IPv4 traffic; idempotent.

        The program goes on the pod's veth first, then the addresses into the map, so the
        first captured packet already finds everything in place.
        """
        maps = self._maps()
        ips = pod.ipv4
        if not ips:
            raise CaptureError(f"pod {pod.namespace}/{pod.name} has no IPv4 address to capture")
        skipped = [ip for ip in pod.ips if ip not in ips]
        if skipped:
            log.warning("pod %s/%s: IPv6 is not captured: %s", pod.namespace, pod.name, skipped)
        self.attach_pod_interface(pod.host_ifname)
        index = self._netlink.ifindex(pod.host_ifname) or 0
        for ip in ips:
            maps.enrol(ip, index)

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

    def detach_all(self) -> None:
        """Removes our filters from every interface of the namespace, and the routing rule.

        Other filters, and the clsact qdiscs, stay. Works without `start()`.
        """
        cfg = self.config
        targets = set(self._interfaces_with_program()) | self._pod_ifnames
        if cfg.uplink_ifname is not None:
            targets.add(cfg.uplink_ifname)
        for ifname in sorted(targets):
            self._netlink.detach_bpf(ifname, cfg.tc_priority, cfg.tc_handle)
        self._pod_ifnames.clear()
        self._netlink.remove_local_delivery(cfg.mark, cfg.route_table, cfg.rule_priority)

    def close(self, keep_pins: bool = True) -> None:
        """Releases this process's handles.

        keep_pins=True (a restart or an upgrade): programs stay attached and maps pinned, so
        capture goes on (following the fail mode while no listener is present).
        keep_pins=False (uninstall): detaches everything and removes the pins.
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
            self._netlink.close()
