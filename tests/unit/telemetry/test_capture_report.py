"""What the eBPF capture reports, without a kernel: readiness (pending vs warnings), the
`ztunnel_capture_*` metrics, the admin dump and `ztunnel ctl capture`."""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry

from ztunnel.admin import (
    Request,
    config_dump,
    readiness_pending,
    readiness_routes,
    readiness_warnings,
)
from ztunnel.ca import CertificateAuthority
from ztunnel.capture.netlink import raw_attrs
from ztunnel.capture_report import CaptureCollector, CaptureSnapshot, readiness
from ztunnel.certs import CertificateManager, LocalCaSource
from ztunnel.config import Settings
from ztunnel.ctl import render_capture
from ztunnel.proxy.records import ConnectionTracker
from ztunnel.state import MeshState, WorkloadStore

pytestmark = pytest.mark.unit

POD_REFUSED = {
    "interface": "vpod0",
    "hook": "pod",
    "mode": "cls_bpf",
    "state": "refused",
    "ok": False,
    "ahead": ["tc program 'cni_pass' (id 42) at priority 5 handle 0x1"],
    "reorders": 0,
    "detail": "vpod0 ingress (pod hook, cls_bpf): tc program 'cni_pass' ... refused",
}
UPLINK_SAFE = {
    "interface": "eth0",
    "hook": "uplink",
    "mode": "cls_bpf",
    "state": "safe",
    "ok": True,
    "ahead": [],
    "reorders": 1,
    "detail": "eth0 ingress (uplink hook, cls_bpf): ztunnel runs first",
}


def snapshot(*hooks: dict[str, Any], **kw: Any) -> CaptureSnapshot:
    fields: dict[str, Any] = {
        "mode": "cls_bpf",
        "tcx_available": True,
        "check_interval": 1.0,
        "hooks": hooks,
        "pods": {
            "shop/a": {"ok": False, "detail": "refused"},
            "shop/b": {"ok": True, "detail": "captured"},
        },
        "reorders": {"uplink": 1},
        "detections": {("pod", "tc"): 1},
        "checks": 5,
        "last_check_age": 0.25,
    }
    fields.update(kw)
    return CaptureSnapshot(**fields)


def test_a_refused_pod_hook_warns_a_refused_uplink_or_a_failing_start_is_pending() -> None:
    assert readiness(snapshot(POD_REFUSED, UPLINK_SAFE)) == (
        [],
        [f"capture: {POD_REFUSED['detail']}"],
    )
    uplink = {**UPLINK_SAFE, "state": "refused", "detail": "eth0: XDP ahead"}
    assert readiness(snapshot(uplink)) == (["capture: eth0: XDP ahead"], [])
    never = snapshot(checks=0, check_errors=2, last_error="netlink: EPERM")
    assert readiness(never)[0] == ["capture: checking the hooks failed: netlink: EPERM"]
    once = snapshot(checks=3, check_errors=1, last_error="netlink: EBUSY")
    assert readiness(once) == ([], ["capture: the last check of the hooks failed: netlink: EBUSY"])


def test_metrics_count_hooks_by_state_pods_refused_and_the_attach_mode() -> None:
    registry = CollectorRegistry()

    @dataclass
    class Source:
        snap: CaptureSnapshot

        def snapshot(self) -> CaptureSnapshot:
            return self.snap

    registry.register(CaptureCollector(Source(snapshot(POD_REFUSED, UPLINK_SAFE))))
    text = generate_latest(registry).decode()
    for line in (
        'ztunnel_capture_hooks{hook="pod",state="refused"} 1.0',
        'ztunnel_capture_hooks{hook="uplink",state="safe"} 1.0',
        'ztunnel_capture_hooks{hook="pod",state="safe"} 0.0',
        'ztunnel_capture_programs_ahead{hook="pod"} 1.0',
        "ztunnel_capture_refused_pods 1.0",
        'ztunnel_capture_reorders_total{hook="uplink"} 1.0',
        'ztunnel_capture_detections_total{hook="pod",layer="tc"} 1.0',
        'ztunnel_capture_checks_total{outcome="ok"} 5.0',
        'ztunnel_capture_attach_mode{mode="cls_bpf"} 1.0',
    ):
        assert line in text, line


@dataclass
class CaptureAgent:
    """An agent as admin.py sees it, with eBPF capture."""

    snap: CaptureSnapshot | None
    settings: Settings = field(default_factory=lambda: Settings(node_name="n1"))
    store: WorkloadStore = field(default_factory=WorkloadStore)
    certs: CertificateManager = field(
        default_factory=lambda: CertificateManager(
            LocalCaSource(CertificateAuthority.create("cluster.local"))
        )
    )
    tracker: ConnectionTracker = field(default_factory=ConnectionTracker)
    listeners: dict[tuple[str, str], Any] = field(default_factory=dict)
    draining: bool = False
    istiod: None = None

    def wanted_listeners(self) -> set[tuple[str, str]]:
        return set()

    def request_drain(self) -> None:
        self.draining = True

    def explain_authorization(
        self, source: str, target: str, source_ip: str | None
    ) -> dict[str, Any]:
        return {}

    def capture_snapshot(self) -> CaptureSnapshot | None:
        return self.snap


def test_readiness_endpoint_and_dump_carry_the_capture() -> None:
    agent = CaptureAgent(snapshot(POD_REFUSED, UPLINK_SAFE))
    agent.store.replace(MeshState.build([]))
    ready = readiness_routes(agent)["/healthz/ready"].handler
    req = Request("GET", "/healthz/ready", {}, {})
    answer = ready(req)
    assert answer.status == 200
    assert answer.body.decode().splitlines() == ["ready", f"capture: {POD_REFUSED['detail']}"]
    dump = config_dump(agent)
    assert dump["capture"]["hooks"][0]["interface"] == "vpod0"
    assert dump["readiness"] == {"ready": True, "pending": []}
    assert readiness_warnings(agent) == [f"capture: {POD_REFUSED['detail']}"]
    agent.snap = snapshot({**UPLINK_SAFE, "state": "refused", "detail": "eth0: XDP ahead"})
    assert readiness_pending(agent) == ["capture: eth0: XDP ahead"]
    assert ready(req).status == 500
    agent.snap = None  # --capture none: nothing about capture anywhere
    assert config_dump(agent)["capture"] is None and ready(req).body == b"ready\n"


def test_ctl_capture_table_names_hooks_pods_and_what_to_do() -> None:
    text = render_capture(snapshot(POD_REFUSED, UPLINK_SAFE).to_json())
    lines = text.splitlines()
    assert lines[0] == (
        "attach mode: cls_bpf (tcx available), hooks checked every 1.0s, last check 0.2s ago"
    )
    assert any(line.split()[:4] == ["vpod0", "pod", "cls_bpf", "refused"] for line in lines)
    assert any(line.startswith("shop/a") and " NO " in line for line in lines)
    assert lines[-1] == f"vpod0: {POD_REFUSED['detail']}"
    out = io.StringIO()
    out.write(render_capture(CaptureSnapshot().to_json()))
    assert "no hooks" in out.getvalue() and "last check not yet" in out.getvalue()


def attr(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def test_raw_netlink_attributes_first_of_each_type_and_padding() -> None:
    data = attr(11, struct.pack("=I", 7)) + attr(2, b"abcde") + attr(11, struct.pack("=I", 9))
    assert raw_attrs(data, 0, len(data)) == {11: struct.pack("=I", 7), 2: b"abcde"}
    nested = attr(2 | 0x8000, attr(11, struct.pack("=I", 42)))  # NLA_F_NESTED is masked off
    inner = raw_attrs(nested, 0, len(nested))[2]
    assert raw_attrs(inner, 0, len(inner)) == {11: struct.pack("=I", 42)}


@given(st.binary(max_size=200))
def test_raw_netlink_attributes_never_read_past_the_end(data: bytes) -> None:
    for kind, payload in raw_attrs(data, 0, len(data)).items():
        assert 0 <= kind <= 0x3FFF and len(payload) <= len(data) - 4
