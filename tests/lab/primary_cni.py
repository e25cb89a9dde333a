"""Stand-in "primary CNI" programs for the lab (tests/lab/bpf/primary_cni.c): compiled and
pinned by a short-lived bcc loader process (this file run as a script), attached where a
CNI would put them with the real tools (`tc`, `ip link ... xdp`) or, for tcx, with the raw
bpf() calls of `ztunnel.capture.syscalls`; their counters are read from the pinned map.

The test process never imports bcc: as with ztunnel's own loader, compiling happens in the
child, once per `PrimaryCni`, which hands out copies of each program (`program()`). Pins
live under the lab's bpffs with the lab's prefix, so the lab's teardown removes them even
if a test dies first.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

BPF_SOURCE = Path(__file__).resolve().parent / "bpf" / "primary_cni.c"
LOADER_TIMEOUT = 120.0
MAPS = ("seen", "watch", "target")
# kind -> the slot of each copy (COUNT/PASS/REDIRECT/XDP in primary_cni.c)
COPIES: dict[str, tuple[int, ...]] = {
    "count": (0, 1, 2, 3, 4, 5),
    "pass": (6, 7, 8, 9),
    "redirect": (10, 11),
    "xdp": (12, 13),
}
_U32 = struct.Struct("=I")


def _function(kind: str, copy: int) -> str:
    return f"cni_{kind}{copy}"


class PrimaryCni:
    """One compile of the stand-in programs, pinned in one directory of the lab's bpffs."""

    def __init__(self, topology: Any) -> None:
        from ztunnel.capture import syscalls
        from ztunnel.lab.topology import BPFFS_DIR

        self.pin_dir = BPFFS_DIR / f"{topology.prefix}cni-{secrets.token_hex(3)}"
        done = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "load"],
            input=json.dumps({"pin_dir": str(self.pin_dir)}),
            capture_output=True,
            text=True,
            timeout=LOADER_TIMEOUT,
            check=False,
        )
        if done.returncode != 0:
            raise AssertionError(f"loading the stand-in CNI failed:\n{done.stderr[-3000:]}")
        self.map_fds = {name: syscalls.obj_get(self.pin_dir / name) for name in MAPS}
        self._used: dict[str, int] = dict.fromkeys(COPIES, 0)
        self.programs: list[StandIn] = []

    def program(self, kind: str, watch_port: int = 0, target_ifindex: int = 0) -> StandIn:
        """The next unused copy of `kind` (count, pass, redirect, xdp)."""
        from ztunnel.capture import syscalls

        copy = self._used[kind]
        self._used[kind] += 1
        slot = COPIES[kind][copy]
        syscalls.map_update(self.map_fds["watch"], _U32.pack(slot), _U32.pack(watch_port))
        syscalls.map_update(self.map_fds["target"], _U32.pack(slot), _U32.pack(target_ifindex))
        name = _function(kind, copy)
        standin = StandIn(self, name, slot, self.pin_dir / name)
        self.programs.append(standin)
        return standin

    def close(self) -> None:
        for standin in self.programs:
            standin.close()
        for fd in self.map_fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)


class StandIn:
    """One copy of a stand-in program, with its own counters."""

    def __init__(self, cni: PrimaryCni, name: str, slot: int, pin: Path) -> None:
        from ztunnel.capture import syscalls

        self.cni, self.name, self.slot, self.pin = cni, name, slot, pin
        self.prog_fd = syscalls.obj_get(pin)
        self.prog_id = syscalls.prog_info(self.prog_fd).id
        self._links: list[int] = []

    # ---- attaching, as a CNI would ----

    def attach_tc(
        self, netns: str, ifname: str, priority: int, handle: int = 1, direction: str = "ingress"
    ) -> None:
        """`tc filter add dev IF ingress prio P handle H bpf da object-pinned PIN`."""
        _run(
            f"tc -n {netns} qdisc add dev {ifname} clsact".split(),
            ok_errors=("File exists", "Exclusivity flag on"),
        )
        _run(
            f"tc -n {netns} filter add dev {ifname} {direction} prio {priority}"
            f" handle {handle:#x} bpf da object-pinned {self.pin}".split()
        )

    def detach_tc(self, netns: str, ifname: str, priority: int, handle: int = 1) -> None:
        _run(
            f"tc -n {netns} filter del dev {ifname} ingress prio {priority}"
            f" handle {handle:#x} bpf".split()
        )

    def attach_tcx(self, netns: str, ifname: str, first: bool = True) -> None:
        """A tcx link at the front (BPF_F_BEFORE) or the back (BPF_F_AFTER) of the ingress
        chain; it stays attached while this object holds it."""
        from ztunnel.capture import syscalls
        from ztunnel.lab.topology import call_in_netns

        def attach() -> int:
            # if_nametoindex asks the calling thread's namespace (sysfs would not).
            flags = syscalls.BPF_F_BEFORE if first else syscalls.BPF_F_AFTER
            return syscalls.tcx_link_create(
                self.prog_fd, socket.if_nametoindex(ifname), syscalls.BPF_TCX_INGRESS, flags
            )

        self._links.append(call_in_netns(netns, attach))

    def detach_tcx(self) -> None:
        for fd in self._links:
            os.close(fd)
        self._links.clear()

    def attach_xdp(self, netns: str, ifname: str) -> None:
        """`ip link set dev IF xdpgeneric pinned PIN` (generic: works on any device)."""
        _run(f"ip -n {netns} link set dev {ifname} xdpgeneric pinned {self.pin}".split())

    # ---- what it saw ----

    def seen(self, watched: bool = False) -> int:
        from ztunnel.capture import syscalls

        key = _U32.pack(2 * self.slot + int(watched))
        value = syscalls.map_lookup(self.cni.map_fds["seen"], key, 8)
        return int(struct.unpack("=Q", value)[0]) if value else 0

    def close(self) -> None:
        self.detach_tcx()
        with contextlib.suppress(OSError):
            os.close(self.prog_fd)


def _run(argv: list[str], ok_errors: tuple[str, ...] = ()) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0 and not any(e in done.stderr for e in ok_errors):
        raise AssertionError(f"{' '.join(argv)} failed: {done.stderr.strip()}")


# ---- the loader process ----


def load(pin_dir: Path) -> None:
    import bcc  # only in this short-lived process

    from ztunnel.capture import syscalls

    module = bcc.BPF(src_file=os.fsencode(BPF_SOURCE))
    try:
        pin_dir.mkdir(parents=True)
        for kind, slots in COPIES.items():
            prog_type = bcc.BPF.XDP if kind == "xdp" else bcc.BPF.SCHED_CLS
            for copy in range(len(slots)):
                name = _function(kind, copy)
                fd = int(module.load_func(name.encode(), prog_type).fd)
                syscalls.obj_pin(fd, pin_dir / name)
        for name in MAPS:
            syscalls.obj_pin(int(module.get_table(name).map_fd), pin_dir / name)
    finally:
        module.cleanup()


if __name__ == "__main__":
    if sys.argv[1:] != ["load"]:
        sys.exit("usage: primary_cni.py load  (a JSON request on stdin)")
    load(Path(json.loads(sys.stdin.read())["pin_dir"]))
