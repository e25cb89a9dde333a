"""Worker planning (`ztunnel.workers.plan`): the CPUs an agent may use, how many workers and
how they share the listeners on which kernel, their settings, and the restart backoff."""

from __future__ import annotations

import pytest

from ztunnel.config import Settings, validate
from ztunnel.errors import ConfigError
from ztunnel.workers.plan import (
    RestartBackoff,
    cgroup_cpu_quota,
    kernel_version,
    plan_workers,
    primary_settings,
    usable_cpus,
    worker_settings,
)

pytestmark = pytest.mark.unit

EBPF = Settings(capture="ebpf", node_ip="10.0.0.1", local_xds_path="/m.yaml", ca_dir="/ca")


def test_kernel_version_reads_uname_releases() -> None:
    assert kernel_version("6.18.44-fc-v782") == (6, 18)
    assert kernel_version("6.1.0-28-amd64") == (6, 1)
    assert kernel_version("garbage") == (0, 0)


@pytest.mark.parametrize(
    ("lines", "want"),
    [
        ([], None),
        (["max 100000"], None),
        (["150000 100000"], 1.5),
        (["max 100000", "400000 100000", "50000 100000"], 0.5),  # the tightest ancestor
        (["nonsense", "1 2 3", "x 100000", "0 100000"], None),
    ],
)
def test_cgroup_quota_is_the_tightest_cpu_max(lines: list[str], want: float | None) -> None:
    assert cgroup_cpu_quota(lines) == want


def test_usable_cpus_caps_affinity_by_the_quota_rounded_up() -> None:
    assert usable_cpus(16, None) == 16
    assert usable_cpus(16, 1.5) == 2
    assert usable_cpus(16, 2.0) == 2
    assert usable_cpus(4, 0.1) == 1
    assert usable_cpus(2, 8.0) == 2
    assert usable_cpus(0, None) == 1


def test_plan_defaults_to_the_usable_cpus_with_a_reuseport_group() -> None:
    plan = plan_workers(EBPF, 4, "6.18.1")
    assert (plan.count, plan.sharing) == (4, "reuseport")
    assert "4 usable CPU(s)" in plan.reason


def test_plan_honours_an_explicit_count_and_one_means_one_process() -> None:
    from dataclasses import replace

    assert plan_workers(replace(EBPF, workers=3), 16, "6.18").count == 3
    one = plan_workers(replace(EBPF, workers=1), 16, "6.18")
    assert (one.count, one.multi) == (1, False)
    assert plan_workers(EBPF, 1, "6.18").sharing == "single"


def test_plan_before_linux_6_5_shares_one_accept_queue_under_ebpf_only() -> None:
    from dataclasses import replace

    old = plan_workers(EBPF, 2, "6.1.0-28-amd64")
    assert (old.count, old.sharing) == (2, "shared")
    assert "6.5" in old.reason
    # nftables TPROXY does the reuseport selection itself on any kernel.
    assert plan_workers(replace(EBPF, capture="tproxy"), 2, "6.1.0").sharing == "reuseport"


def test_plan_without_transparent_capture_is_one_process_with_the_reason() -> None:
    plan = plan_workers(Settings(capture="none"), 8, "6.18")
    assert plan.count == 1
    assert "--capture none" in plan.reason


def test_worker_settings_keep_the_data_path_and_drop_node_wide_duties() -> None:
    s = Settings(
        capture="ebpf",
        node_ip="10.0.0.1",
        local_xds_path="/m.yaml",
        ca_dir="/ca",
        max_connections=1000,
        max_pending_handshakes=512,
        max_pending_handshakes_per_source=64,
        max_connections_per_identity=3,
    )
    w = worker_settings(s, 4)
    assert (w.capture, w.local_xds_path, w.xds_address, w.ca_address, w.ca_dir) == (
        "tproxy",
        "",
        "",
        "",
        "",
    )
    assert (w.admin_port, w.stats_port, w.readiness_port, w.socks5_port) == (0, 0, 0, 0)
    assert (w.outbound_port, w.hbone_port, w.node_ip) == (15001, 15008, "10.0.0.1")
    # Node-wide limits divided (rounded up, at least 1); 0 (automatic) stays automatic.
    assert (w.max_connections, w.max_pending_handshakes) == (250, 128)
    assert (w.max_pending_handshakes_per_source, w.max_connections_per_identity) == (16, 1)
    assert worker_settings(Settings(max_connections=0), 4).max_connections == 0
    p = primary_settings(s, 4)
    assert (p.local_xds_path, p.max_connections, p.admin_port) == ("/m.yaml", 250, 15000)


def test_restart_backoff_doubles_to_a_cap_and_resets_after_a_stable_run() -> None:
    b = RestartBackoff()
    assert [b.next_delay(1.0) for _ in range(9)] == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    assert b.next_delay(120.0) == 0.5
    assert b.next_delay(0.1) == 1.0


def test_workers_setting_is_validated() -> None:
    from dataclasses import replace

    validate(replace(EBPF, workers=0))
    validate(replace(EBPF, workers=64))
    with pytest.raises(ConfigError, match="workers"):
        validate(replace(EBPF, workers=-1))
