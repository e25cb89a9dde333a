"""The plugin as the runtime runs it (the installer's zipapp under the host's python3, CNI_*
env, config on stdin) against the API server stand-in and a real enrolment service: ambient
pods are enrolled before ADD returns, everything that can go wrong gets the spec's error,
nothing is left half-enrolled, and other pods are not affected."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cni.install import build_plugin
from tests.integration.cni.conftest import PODS, AgentHandle, Api
from ztunnel.enrolment import request
from ztunnel.lab.kubeapi import Fault

pytestmark = pytest.mark.integration

PTP = {
    "cniVersion": "1.0.0",
    "interfaces": [
        {"name": "veth-a", "mac": "aa:bb:cc:dd:ee:01"},
        {"name": "eth0", "sandbox": "/run/netns/pod-a"},
    ],
    "ips": [{"interface": 1, "address": "10.1.1.2/24", "gateway": "10.1.1.1"}],
    "routes": [{"dst": "0.0.0.0/0"}],
    "dns": {},
}
BRIDGE = {
    "cniVersion": "1.0.0",
    "interfaces": [
        {"name": "cni0"},
        {"name": "veth-b"},
        {"name": "eth0", "sandbox": "/run/netns/pod-b"},
    ],
    "ips": [{"interface": 2, "address": "10.1.1.3/24"}],
}


class Plugin:
    def __init__(self, path: Path, api: Api, agent: AgentHandle, records: Path) -> None:
        self.path, self.api, self.agent, self.records = path, api, agent, records

    def run(
        self,
        command: str,
        ns: str,
        name: str,
        prev: dict[str, Any] | None = PTP,
        uid: str | None = None,
        cid: str = "c1",
        **conf: Any,
    ) -> tuple[int, Any]:
        if uid is None:
            try:
                uid = self.api.store.get(PODS, ns, name)["metadata"]["uid"]
            except Exception:
                uid = "00000000-0000-0000-0000-000000000000"
        cfg = {
            "cniVersion": "1.0.0",
            "name": "pods",
            "type": "ztunnel-cni",
            "kubeconfig": str(self.api.kubeconfig),
            "enrolment_socket": self.agent.socket_path,
            "pod_record_dir": str(self.records),
            **conf,
        }
        if prev is not None:
            cfg["prevResult"] = prev
        env = {
            "PATH": os.environ.get("PATH", ""),
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": cid,
            "CNI_NETNS": f"/run/netns/{name}",
            "CNI_IFNAME": "eth0",
            "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name};K8S_POD_UID={uid}",
            "CNI_PATH": str(self.path.parent),
        }
        res = subprocess.run(
            [str(self.path)],
            input=json.dumps(cfg).encode(),
            env=env,
            capture_output=True,
            timeout=60,
            check=False,
        )
        out = res.stdout.decode()
        return res.returncode, json.loads(out) if out.strip() else None


@pytest.fixture
def cni(kubeapi: Api, agent: AgentHandle, tmp_path: Path) -> Plugin:
    host_python = shutil.which("python3", path="/usr/bin") or sys.executable
    path = tmp_path / "bin" / "ztunnel-cni"
    build_plugin(path, host_python)
    kubeapi.namespace("shop", {"istio.io/dataplane-mode": "ambient"})
    kubeapi.namespace("legacy")
    return Plugin(path, kubeapi, agent, tmp_path / "records")


def test_ambient_pod_is_enrolled_before_add_returns(cni: Plugin) -> None:
    uid = cni.api.pod("shop", "a")["metadata"]["uid"]
    rc, out = cni.run("ADD", "shop", "a")
    assert rc == 0 and out == PTP  # prevResult unchanged
    rec = cni.agent.pods()["shop/a"]
    assert rec == {"ifname": "veth-a", "ips": ["10.1.1.2"], "enrolled": True, "uid": uid}
    assert cni.agent.capture.enrolled == {"10.1.1.2"}
    assert cni.run("CHECK", "shop", "a")[0] == 0
    # DEL removes it; DEL again, and DEL of something never seen, succeed.
    assert cni.run("DEL", "shop", "a") == (0, None)
    assert cni.agent.pods() == {} and cni.agent.capture.enrolled == set()
    assert cni.run("DEL", "shop", "a") == (0, None)
    assert cni.run("DEL", "shop", "never", prev=None, cid="zz") == (0, None)


def test_bridge_result_host_side_is_resolved_by_the_agent(cni: Plugin) -> None:
    cni.api.pod("shop", "b")
    rc, out = cni.run("ADD", "shop", "b", prev=BRIDGE)
    assert rc == 0 and out == BRIDGE
    assert cni.agent.pods()["shop/b"]["ifname"] == "host-b"  # from the pod netns' veth peer
    assert ("resolve", "shop/b") in cni.agent.capture.calls


def test_non_ambient_pod_is_recorded_not_enrolled_and_never_fails(cni: Plugin) -> None:
    cni.api.pod("legacy", "c")
    assert cni.run("ADD", "legacy", "c")[0] == 0
    assert cni.agent.pods()["legacy/c"]["enrolled"] is False and cni.agent.capture.enrolled == set()
    cni.agent.stop()
    cni.api.pod("legacy", "d")
    rc, out = cni.run("ADD", "legacy", "d", cid="c2")
    assert rc == 0 and out == PTP
    # The record it leaves lets the controller enrol it later without a restart.
    recs = [json.loads(p.read_text()) for p in cni.records.iterdir()]
    assert {(r["name"], r["ambient_at_add"]) for r in recs} == {("c", False), ("d", False)}


def test_ambient_pod_with_the_agent_down_fails_so_the_runtime_retries(cni: Plugin) -> None:
    cni.api.pod("shop", "a")
    cni.agent.stop()
    rc, out = cni.run("ADD", "shop", "a")
    assert (
        rc == 1
        and out["code"] == 11
        and "cannot be enrolled" in out["msg"]
        and "unavailable" in out["msg"]
    )
    cni.agent.start()
    assert cni.agent.pods() == {}
    assert cni.run("ADD", "shop", "a")[0] == 0  # the retry
    assert cni.agent.pods()["shop/a"]["enrolled"]


def test_enrolment_failure_leaves_nothing_half_enrolled_and_others_unaffected(cni: Plugin) -> None:
    cni.api.pod("shop", "ok")
    assert cni.run("ADD", "shop", "ok", cid="c-ok")[0] == 0
    cni.api.pod("shop", "vanishing")
    cni.agent.capture.fail_on = "vanishing"  # the interface disappears during enrolment
    prev = {
        **PTP,
        "interfaces": [{"name": "veth-v"}, {"name": "eth0", "sandbox": "/x"}],
        "ips": [{"interface": 1, "address": "10.1.1.9/24"}],
    }
    rc, out = cni.run("ADD", "shop", "vanishing", prev=prev, cid="c-v")
    assert rc == 1 and out["code"] == 11 and "interface vanished" in out["msg"]
    assert set(cni.agent.pods()) == {"shop/ok"} and cni.agent.capture.enrolled == {"10.1.1.2"}
    assert "veth-v" not in cni.agent.capture.attached


@pytest.mark.parametrize("case", ["deleted", "recreated"])
def test_pod_that_vanished_between_scheduling_and_add(cni: Plugin, case: str) -> None:
    if case == "recreated":
        cni.api.pod("shop", "a")
        uid = "11111111-2222-3333-4444-555555555555"
    else:
        uid = None
    rc, out = cni.run("ADD", "shop", "a", uid=uid)
    assert rc == 1 and out["code"] == 100 and "shop/a" in out["msg"]
    assert cni.agent.pods() == {}


def test_api_server_errors_and_timeouts(cni: Plugin) -> None:
    cni.api.pod("shop", "a")
    cni.api.server.inject(Fault("GET", "/pods/a", status=500, count=1))
    assert cni.run("ADD", "shop", "a")[0] == 0  # one 500 is retried
    cni.api.server.inject(Fault("GET", "/pods/a", status=500, count=2))
    rc, out = cni.run("ADD", "shop", "a")
    assert rc == 1 and out["code"] == 11 and "500" in out["msg"]
    cni.api.server.inject(Fault("GET", "/pods/a", status=0, delay=5, count=2))
    rc, out = cni.run("ADD", "shop", "a", api_timeout_seconds=0.3)
    assert rc == 1 and out["code"] == 11 and "unavailable" in out["msg"]


def test_wrong_credentials_are_reported(cni: Plugin, tmp_path: Path) -> None:
    cni.api.pod("shop", "a")
    kc = json.loads(cni.api.kubeconfig.read_text())
    kc["users"][0]["user"]["token"] = "stale"
    bad = tmp_path / "stale-kubeconfig"
    bad.write_text(json.dumps(kc))
    rc, out = cni.run("ADD", "shop", "a", kubeconfig=str(bad))
    assert rc == 1 and out["code"] == 11 and "credentials (401)" in out["msg"]


def test_reused_ip_replaces_the_stale_pod(cni: Plugin) -> None:
    cni.api.pod("shop", "old")
    assert cni.run("ADD", "shop", "old", cid="c-old")[0] == 0
    # Its DEL never reached the agent (agent restarting); the IP goes to a new, non-ambient pod.
    cni.api.pod("legacy", "new")
    assert cni.run("ADD", "legacy", "new", cid="c-new")[0] == 0
    assert set(cni.agent.pods()) == {"legacy/new"} and cni.agent.capture.enrolled == set()


def test_check_fails_when_an_ambient_pod_is_no_longer_enrolled(cni: Plugin) -> None:
    cni.api.pod("shop", "a")
    assert cni.run("ADD", "shop", "a")[0] == 0
    request(cni.agent.socket_path, {"op": "unenrol", "namespace": "shop", "name": "a"})
    rc, out = cni.run("CHECK", "shop", "a")
    assert rc == 1 and "not enrolled" in out["msg"]
