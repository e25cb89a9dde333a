"""The L7 benchmark section in smoke size: its lab comes up (nginx backend, nginx, HAProxy and
the waypoint as proxies), every path is measured (a positive rate), and it is torn down."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytestmark = [pytest.mark.lab, pytest.mark.timeout(240)]


def test_l7_section_measures_every_path(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("the benchmark needs root (network namespaces, eBPF)")
    from bench import l7
    from ztunnel.lab import topology

    res = l7.run(1, 0.3, tmp_path, lambda _m: None, conns=4)
    assert not res["errors"], res["errors"]
    for scenario in l7.SCENARIOS:
        s = res["summary"][scenario]
        assert s["rps"] and s["rps"] > 0, (scenario, s)
        assert s["p50_us"] and s["p50_us"] > 0, (scenario, s)
    assert res["ratios"]["waypoint_vs_nginx_rps"] is not None
    # CPU per request of the proxy on each proxied path, and of the agents on the mesh paths.
    for scenario in ("nginx", "haproxy", "waypoint"):
        assert res["summary"][scenario]["proxy_cpu_us"] is not None, scenario
    assert res["summary"]["waypoint"]["proxy_cpu_us"] > 0
    for scenario in ("waypoint", "mesh-l4"):
        assert res["summary"][scenario]["agents_cpu_us"] > 0, scenario
    assert res["summary"]["direct"]["agents_cpu_us"] is None
    # Its own namespaces are gone (other labs may run at the same time).
    assert not [n for n in topology.list_netns() if n.startswith(f"{res['lab_id']}-")]
    assert "| waypoint |" in l7.table(res)
