"""Kernel capture for the agent (`--capture ebpf`): starts `ztunnel.capture.Capture` with the
agent's transparent listeners, serves the enrolment API that attaches pods and enrols them,
and checks the hooks periodically for programs that run ahead of ours.

The capture layer blocks on syscalls, netlink and (at start) the short-lived BPF loader
process that compiles the programs, so every call runs on one dedicated thread
(`EnrolmentService`'s executor); the agent's event loop never waits on the kernel directly.
This process never imports bcc: it only opens the pinned programs and maps.

The periodic check (`--capture-check-interval`, 1 s by default) finds a program inserted
ahead of ours within one interval plus the check itself, moves ours back to the front
where the kernel allows, and otherwise refuses the pods behind that hook (unless accepted
with `--capture-allow-ahead`); each pod record of the enrolment API carries the outcome as
`"capture": {"ok": ..., "detail": ...}`, and `snapshot()` feeds the metrics, readiness and
`ztunnel ctl capture` (`ztunnel.capture_report`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import time
from pathlib import Path
from typing import Any

from prometheus_client.registry import CollectorRegistry

from ztunnel.capture import Capture, CaptureConfig, CaptureError, FailMode, PodEnrolment
from ztunnel.capture_report import CaptureCollector, CaptureSnapshot
from ztunnel.config import Settings
from ztunnel.enrolment import EnrolmentService, PodRequest
from ztunnel.errors import ConfigError

log = logging.getLogger(__name__)


def allow_ahead(text: str) -> tuple[str, ...]:
    """`--capture-allow-ahead` as a tuple of names (validated in ztunnel.config)."""
    return tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))


def capture_config(s: Settings) -> CaptureConfig:
    if not s.node_ip:
        raise ConfigError(
            "settings", "node_ip", "--capture ebpf needs --node-ip (the node's address)"
        )
    node_ip = ipaddress.ip_address(s.node_ip)
    if not isinstance(node_ip, ipaddress.IPv4Address):
        raise ConfigError("settings", "node_ip", "the node address must be IPv4")
    return CaptureConfig(
        node_addresses=(node_ip,),
        uplink_ifname=s.uplink or None,
        pin_dir=Path(s.bpf_pin_dir),
        fail_mode=FailMode.OPEN if s.fail_open else FailMode.CLOSED,
        hbone_port=s.hbone_port,
        attach=s.capture_attach,
        tc_priority=s.capture_tc_priority,
        allow_ahead=allow_ahead(s.capture_allow_ahead),
    )


def _ipv4(ips: Any) -> tuple[ipaddress.IPv4Address, ...]:
    return tuple(ip for ip in ips if isinstance(ip, ipaddress.IPv4Address))


class _Backend:
    """Adapts enrolment requests to the capture layer."""

    def __init__(self, capture: Capture) -> None:
        self.capture = capture

    @staticmethod
    def _pod(req: PodRequest) -> PodEnrolment:
        return PodEnrolment(req.namespace, req.name, req.ifname, req.ips)

    def attach_pod(self, req: PodRequest) -> None:
        self.capture.attach_pod_interface(req.ifname, _ipv4(req.ips))

    def enrol(self, req: PodRequest) -> None:
        self.capture.enrol(self._pod(req))

    def unenrol(self, req: PodRequest) -> None:
        self.capture.unenrol_addresses(_ipv4(req.ips))

    def detach_pod(self, req: PodRequest) -> None:
        if req.ifname:
            self.capture.detach_pod_interface(req.ifname)

    def resolve_host_ifname(self, req: PodRequest) -> str:
        return self.capture.host_ifname_of(req.netns, req.pod_ifname)


class KernelCapture:
    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.config = capture_config(settings)
        self.capture = Capture(self.config)
        self.service = EnrolmentService(
            _Backend(self.capture),
            settings.enrolment_socket,
            str(Path(settings.state_dir) / "pods.json"),
        )
        self.service.pod_status = self.pod_capture
        self.interval = settings.capture_check_interval
        self.checks = 0
        self.check_errors = 0
        self.last_error = ""
        self._last_check: float | None = None
        self._monitor: asyncio.Task[None] | None = None
        if registry is not None:
            registry.register(CaptureCollector(self))

    @property
    def mark(self) -> int:
        return self.config.mark

    def _register_stored_pods(self) -> None:
        """Pods enrolled by an earlier agent process: their addresses, for refusing them."""
        for rec in self.service.pods.values():
            ifname = str(rec.get("ifname", ""))
            with contextlib.suppress(ValueError, TypeError):
                ips = _ipv4(ipaddress.ip_address(i) for i in rec.get("ips", []))
                if ifname:
                    self.capture.register_pod(ifname, ips)

    def _start(self, fds: dict[str, int]) -> None:
        self._register_stored_pods()
        self.capture.start(fds)
        self._last_check = time.monotonic()

    async def start(self, listeners: dict[str, socket.socket]) -> None:
        """Load or re-open the programs and maps, put our listeners in, serve enrolment,
        start checking the hooks."""
        fds = {kind: sock.fileno() for kind, sock in listeners.items()}
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.service._executor, self._start, fds)
        await self.service.start()
        self._monitor = asyncio.ensure_future(self._watch_hooks())
        self._monitor.set_name("capture-hook-check")
        log.info(
            "eBPF capture running: %d pods enrolled, fail mode %s, attach mode %s,"
            " hooks checked every %gs",
            len(self.service.pods),
            self.config.fail_mode.value,
            self.capture.mode.value if self.capture.mode else "?",
            self.interval,
        )

    async def _watch_hooks(self) -> None:
        """Checks every hook each interval; a failing check is logged and counted, and the
        next one runs as usual (the kernel state it failed on may be transient). Nothing but
        cancellation ends this task: a dead check would stop detection silently."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.interval)
            try:
                await loop.run_in_executor(self.service._executor, self.capture.check)
            except Exception as exc:
                self.check_errors += 1
                text = (
                    f"{type(exc).__name__}: {exc}"
                    if not isinstance(exc, CaptureError)
                    else str(exc)
                )
                if text != self.last_error:
                    log.error("capture: checking the hooks failed: %s", text, exc_info=exc)
                self.last_error = text
                continue
            self.checks += 1
            self.last_error = ""
            self._last_check = time.monotonic()

    def pod_capture(self, key: str, record: dict[str, Any]) -> dict[str, Any]:
        """The `"capture"` member of a pod record of the enrolment API."""
        ifname = str(record.get("ifname", ""))
        return self.capture.pod_capture(ifname, bool(record.get("enrolled"))).to_json()

    def snapshot(self) -> CaptureSnapshot:
        cap = self.capture
        return CaptureSnapshot(
            mode=cap.mode.value if cap.mode else "",
            tcx_available=bool(cap.tcx_available),
            check_interval=self.interval,
            hooks=tuple(st.to_json() for _, st in sorted(cap.statuses().items())),
            pods={key: self.pod_capture(key, rec) for key, rec in list(self.service.pods.items())},
            reorders=dict(cap.reorders),
            detections=dict(cap.detections),
            checks=self.checks,
            check_errors=self.check_errors,
            last_error=self.last_error,
            last_check_age=(
                time.monotonic() - self._last_check if self._last_check is not None else None
            ),
        )

    async def close(self) -> None:
        """Stop checking and serving enrolment; keep programs and pinned maps so pods stay
        enrolled (and refused pods refused)."""
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        await self.service.close()
        self.capture.close(keep_pins=True)
