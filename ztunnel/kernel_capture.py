"""Kernel capture for the agent (`--capture ebpf`): starts `ztunnel.capture.Capture` with the
agent's transparent listeners and serves the enrolment API that attaches pods and enrols them.

The capture layer blocks on syscalls, netlink and (at start) the short-lived BPF loader
process that compiles the programs, so every call runs on one dedicated thread
(`EnrolmentService`'s executor); the agent's event loop never waits on the kernel directly.
This process never imports bcc: it only opens the pinned programs and maps.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from pathlib import Path

from ztunnel.capture import Capture, CaptureConfig, FailMode, PodEnrolment
from ztunnel.config import Settings
from ztunnel.enrolment import EnrolmentService, PodRequest
from ztunnel.errors import ConfigError

log = logging.getLogger(__name__)


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
    )


class _Backend:
    """Adapts enrolment requests to the capture layer."""

    def __init__(self, capture: Capture) -> None:
        self.capture = capture

    @staticmethod
    def _pod(req: PodRequest) -> PodEnrolment:
        return PodEnrolment(req.namespace, req.name, req.ifname, req.ips)

    def attach_pod(self, req: PodRequest) -> None:
        self.capture.attach_pod_interface(req.ifname)

    def enrol(self, req: PodRequest) -> None:
        self.capture.enrol(self._pod(req))

    def unenrol(self, req: PodRequest) -> None:
        self.capture.unenrol_addresses(
            ip for ip in req.ips if isinstance(ip, ipaddress.IPv4Address)
        )

    def detach_pod(self, req: PodRequest) -> None:
        if req.ifname:
            self.capture.detach_pod_interface(req.ifname)

    def resolve_host_ifname(self, req: PodRequest) -> str:
        return self.capture.host_ifname_of(req.netns, req.pod_ifname)


class KernelCapture:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.config = capture_config(settings)
        self.capture = Capture(self.config)
        self.service = EnrolmentService(
            _Backend(self.capture),
            settings.enrolment_socket,
            str(Path(settings.state_dir) / "pods.json"),
        )

    @property
    def mark(self) -> int:
        return self.config.mark

    async def start(self, listeners: dict[str, socket.socket]) -> None:
        """Load or re-open the programs and maps, put our listeners in, serve enrolment."""
        fds = {kind: sock.fileno() for kind, sock in listeners.items()}
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.service._executor, self.capture.start, fds)
        await self.service.start()
        log.info(
            "eBPF capture running: %d pods enrolled, fail mode %s",
            len(self.service.pods),
            self.config.fail_mode.value,
        )

    async def close(self) -> None:
        """Stop serving enrolment; keep programs and pinned maps so pods stay enrolled."""
        await self.service.close()
        self.capture.close(keep_pins=True)
