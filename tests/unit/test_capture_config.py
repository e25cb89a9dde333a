"""Pure configuration of the capture layer: validation names the bad field; -D flags."""

from __future__ import annotations

import io
import ipaddress
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ztunnel.capture import loader
from ztunnel.capture.config import (
    DEFAULT_BPF_SOURCE,
    CaptureConfig,
    FailMode,
    ListenerSlot,
    PodEnrolment,
    listener_slots,
)
from ztunnel.capture.errors import CaptureError
from ztunnel.errors import ConfigError, ZtunnelError

pytestmark = pytest.mark.unit

NODE = (ipaddress.IPv4Address("10.77.0.1"),)


def config(**overrides: Any) -> CaptureConfig:
    fields: dict[str, Any] = {"node_addresses": NODE, "uplink_ifname": "eth0"}
    fields.update(overrides)
    return CaptureConfig(**fields)


def test_cflags_carry_every_setting_and_no_pin_dir_when_unpinned() -> None:
    assert config().cflags() == (
        "-DCAPTURE_MARK=0x400",
        "-DHBONE_PORT=15008",
        "-DMAX_PODS=4096",
        "-DMAX_NODE_ADDRS=64",
    )


def test_cflags_quote_the_pin_dir_as_a_c_string() -> None:
    flags = config(
        pin_dir=Path("/sys/fs/bpf/zt1a2b3c-n0"), mark=0x10000, hbone_port=15009, max_pods=8
    ).cflags()
    assert "-DCAPTURE_MARK=0x10000" in flags
    assert "-DHBONE_PORT=15009" in flags
    assert "-DMAX_PODS=8" in flags
    assert flags[-1] == '-DPIN_DIR="/sys/fs/bpf/zt1a2b3c-n0"'


def test_defaults() -> None:
    cfg = config()
    assert cfg.fail_mode is FailMode.CLOSED
    assert cfg.netns is None
    assert cfg.bpf_source == DEFAULT_BPF_SOURCE
    assert DEFAULT_BPF_SOURCE.is_file()  # the program ships in bpf/ of the checkout


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"mark": 0}, "mark"),
        ({"mark": 1 << 32}, "mark"),
        ({"mark": True}, "mark"),
        ({"route_table": 254}, "route_table"),
        ({"route_table": 0}, "route_table"),
        ({"rule_priority": 32766}, "rule_priority"),
        ({"hbone_port": 0}, "hbone_port"),
        ({"hbone_port": 70000}, "hbone_port"),
        ({"tc_priority": 0x10000}, "tc_priority"),
        ({"tc_handle": 0}, "tc_handle"),
        ({"max_pods": 0}, "max_pods"),
        ({"uplink_ifname": "a-very-long-ifname"}, "uplink_ifname"),
        ({"uplink_ifname": "eth/0"}, "uplink_ifname"),
        ({"uplink_ifname": ""}, "uplink_ifname"),
        ({"pin_dir": Path("relative/pins")}, "pin_dir"),
        ({"pin_dir": Path('/sys/fs/bpf/x"y')}, "pin_dir"),
        ({"pin_dir": Path("/sys/fs/bpf/x\\y")}, "pin_dir"),
        ({"netns": "a/b"}, "netns"),
        ({"netns": ""}, "netns"),
        ({"fail_mode": "closed"}, "fail_mode"),
        ({"node_addresses": [NODE[0]]}, "node_addresses"),
        ({"node_addresses": (ipaddress.IPv6Address("fd00::1"),)}, "node_addresses[0]"),
        ({"node_addresses": NODE * 3, "max_node_addrs": 2}, "node_addresses"),
    ],
)
def test_invalid_settings_name_the_field(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        config(**overrides)
    assert info.value.path == field
    assert info.value.source == "capture"


def test_listener_slots_map_keys_to_sockmap_slots() -> None:
    assert listener_slots({"outbound": 7, "inbound": 8, "hbone": 9}) == {
        ListenerSlot.OUTBOUND: 7,
        ListenerSlot.INBOUND: 8,
        ListenerSlot.HBONE: 9,
    }
    assert listener_slots({}) == {}
    assert [slot.key for slot in ListenerSlot] == ["outbound", "inbound", "hbone"]
    assert [int(slot) for slot in ListenerSlot] == [0, 1, 2]  # SLOT_* in bpf/capture.c


@pytest.mark.parametrize(
    ("fds", "field"),
    [({"socks": 3}, "listener_fds.socks"), ({"hbone": -1}, "listener_fds.hbone")],
)
def test_listener_slots_reject_bad_input(fds: dict[str, int], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        listener_slots(fds)
    assert info.value.path == field


def test_fail_mode_values_match_the_program() -> None:
    assert FailMode("closed").map_value == 0  # FAIL_CLOSED in bpf/capture.c
    assert FailMode("open").map_value == 1  # FAIL_OPEN


def test_pod_enrolment_captures_only_ipv4() -> None:
    pod = PodEnrolment(
        namespace="default",
        name="web",
        host_ifname="vethab12",
        ips=(ipaddress.ip_address("10.77.1.2"), ipaddress.ip_address("fd00::2")),
    )
    assert pod.ipv4 == (ipaddress.IPv4Address("10.77.1.2"),)


@pytest.mark.parametrize(
    ("fields", "path"),
    [
        ({"ips": ()}, "ips"),
        ({"ips": ["10.77.1.2"]}, "ips"),
        ({"ips": ("10.77.1.2",)}, "ips[0]"),
        ({"host_ifname": "veth-with-a-long-name"}, "host_ifname"),
        ({"name": ""}, "name"),
    ],
)
def test_pod_enrolment_rejects_bad_input(fields: dict[str, Any], path: str) -> None:
    values: dict[str, Any] = {
        "namespace": "default",
        "name": "web",
        "host_ifname": "vethab12",
        "ips": (ipaddress.IPv4Address("10.77.1.2"),),
    }
    values.update(fields)
    with pytest.raises(ConfigError) as info:
        PodEnrolment(**values)
    assert info.value.path == path


def test_capture_error_carries_errno_and_is_a_ztunnel_error() -> None:
    err = CaptureError("attaching filter", 19)
    assert isinstance(err, ZtunnelError)
    assert err.errno == 19
    assert str(err) == "attaching filter: ENODEV (No such device)"
    assert str(CaptureError("plain")) == "plain"


def test_config_survives_the_trip_to_the_loader_as_json() -> None:
    cfg = config(
        pin_dir=Path("/sys/fs/bpf/zt1a2b3c-n0"),
        netns="zt1a2b3c-n0",
        fail_mode=FailMode.OPEN,
        mark=0x800,
        max_pods=16,
    )
    assert CaptureConfig.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg
    assert CaptureConfig.from_json(config().to_json()) == config()  # pin_dir None


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"node_addresses": ["10.77.0.1"], "colour": "red"}, "colour"),
        ({"node_addresses": "10.77.0.1"}, "node_addresses"),
        ({"node_addresses": ["not-an-ip"]}, "node_addresses"),
        ({"node_addresses": ["fd00::1"]}, "node_addresses[0]"),
        ({"node_addresses": [], "pin_dir": 7}, "pin_dir"),
        ({"node_addresses": [], "bpf_source": None}, "bpf_source"),
        ({"node_addresses": [], "fail_mode": "sometimes"}, "fail_mode"),
        ({"node_addresses": [], "netns": 3}, "netns"),
        ({"node_addresses": [], "mark": "0x400"}, "mark"),
    ],
)
def test_config_from_json_names_the_bad_field(data: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        CaptureConfig.from_json(data)
    assert info.value.path == field


def test_loader_answers_a_bad_request_with_an_error_line() -> None:
    out = io.StringIO()
    assert loader._serve(io.StringIO('{"config": {"mark": 1}}'), out) == 1
    answer = json.loads(out.getvalue())
    assert answer["ok"] is False and "node_addresses" in answer["error"]
    out = io.StringIO()
    assert loader._serve(io.StringIO("not json"), out) == 1
    assert json.loads(out.getvalue())["ok"] is False


def test_the_agent_side_of_capture_does_not_import_bcc() -> None:
    # bcc loads libbcc and LLVM (~60 MB at import, ~170 MB after compiling): only the
    # short-lived loader process may import it. A fresh interpreter, since this one may
    # have imported bcc for other tests.
    probe = (
        "import sys, ztunnel.capture, ztunnel.capture.loader, ztunnel.kernel_capture\n"
        "print(sorted(m for m in sys.modules if m == 'bcc' or m.startswith('bcc.')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


def test_attach_mode_and_accepted_programs_are_validated_and_round_trip() -> None:
    cfg = config(attach="cls_bpf", allow_ahead=("cil_from_netdev", "*"), tc_priority=10)
    assert CaptureConfig.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg
    assert config().tc_priority == 1 and config().attach == "auto"  # the front by default
    assert config().tc_handles == (0xA7, 0xA8)
    assert config(tc_handle=0xFFFFFFFF).tc_alt_handle == 0xFFFFFFFE
    for bad, path in (
        ({"attach": "xdp"}, "attach"),
        ({"allow_ahead": ["x"]}, "allow_ahead"),
        ({"allow_ahead": ("",)}, "allow_ahead"),
        ({"allow_ahead": ("a\x00",)}, "allow_ahead"),
    ):
        with pytest.raises(ConfigError) as e:
            config(**bad)
        assert e.value.path == path
    with pytest.raises(ConfigError, match="allow_ahead"):
        CaptureConfig.from_json({**config().to_json(), "allow_ahead": "x"})
