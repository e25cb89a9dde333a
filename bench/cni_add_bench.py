"""Wall time of the `ztunnel-cni` plugin per ADD, as the runtime sees it (a new process each
time: the installer's zipapp under the host's python3), for a non-ambient and an ambient pod,
against the API server stand-in and a node agent's enrolment service on loopback (the capture
backend records instead of touching the kernel, so this measures the plugin, the two API
reads and the enrolment round trip). Baselines measured in the same run: the bare interpreter
start (`python3 -c pass`) and the Debian `ptp` plugin's VERSION (a Go CNI plugin's start).

    .venv/bin/python bench/cni_add_bench.py [--runs 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from cni.install import build_plugin
from ztunnel.enrolment import EnrolmentService, PodRequest
from ztunnel.lab.kubeapi import BY_PATH, KubeApiServer

NS = BY_PATH[("", "v1", "namespaces")]
PODS = BY_PATH[("", "v1", "pods")]
PREV = {
    "cniVersion": "1.0.0",
    "interfaces": [{"name": "veth-x"}, {"name": "eth0", "sandbox": "/run/netns/x"}],
    "ips": [{"interface": 1, "address": "10.1.1.2/24"}],
}


class Recording:
    def attach_pod(self, req: PodRequest) -> None: ...
    def enrol(self, req: PodRequest) -> None: ...
    def unenrol(self, req: PodRequest) -> None: ...
    def detach_pod(self, req: PodRequest) -> None: ...
    def resolve_host_ifname(self, req: PodRequest) -> str:
        return "veth-x"


def timed(argv: list[str], stdin: bytes = b"", env: dict[str, str] | None = None) -> float:
    t0 = time.perf_counter()
    res = subprocess.run(argv, input=stdin, env=env, capture_output=True, check=False, timeout=60)
    elapsed = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"{argv[0]} failed: {res.stdout!r} {res.stderr!r}")
    return elapsed


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=30)
    args = p.parse_args()
    python = shutil.which("python3", path="/usr/bin") or sys.executable
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        api = KubeApiServer("bench-token")
        url = api.start()
        (tmp / "kubeconfig").write_text(json.dumps(api.kubeconfig(url)))
        api.store.create(
            NS, "", {"metadata": {"name": "mesh", "labels": {"istio.io/dataplane-mode": "ambient"}}}
        )
        api.store.create(NS, "", {"metadata": {"name": "plain"}})
        uids = {
            ns: api.store.create(
                PODS, ns, {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c"}]}}
            )["metadata"]["uid"]
            for ns in ("mesh", "plain")
        }
        loop = asyncio.new_event_loop()
        svc = EnrolmentService(Recording(), str(tmp / "agent.sock"), str(tmp / "pods.json"))
        loop.run_until_complete(svc.start())
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        plugin = tmp / "ztunnel-cni"
        build_plugin(plugin, python)
        results: dict[str, list[float]] = {
            "python3 -c pass": [],
            "ptp VERSION (Go plugin start)": [],
            "ztunnel-cni ADD, non-ambient pod": [],
            "ztunnel-cni ADD, ambient pod": [],
        }
        ptp = Path("/usr/lib/cni/ptp")
        for i in range(args.runs):  # interleaved, so that machine noise hits every case alike
            results["python3 -c pass"].append(timed([python, "-c", "pass"]))
            if ptp.exists():
                results["ptp VERSION (Go plugin start)"].append(
                    timed([str(ptp)], b'{"cniVersion":"1.0.0"}', {"CNI_COMMAND": "VERSION"})
                )
            for ns, key in (
                ("plain", "ztunnel-cni ADD, non-ambient pod"),
                ("mesh", "ztunnel-cni ADD, ambient pod"),
            ):
                conf: dict[str, Any] = {
                    "cniVersion": "1.0.0",
                    "name": "pods",
                    "type": "ztunnel-cni",
                    "kubeconfig": str(tmp / "kubeconfig"),
                    "enrolment_socket": str(tmp / "agent.sock"),
                    "pod_record_dir": str(tmp / "records"),
                    "prevResult": PREV,
                }
                env = {
                    "CNI_COMMAND": "ADD",
                    "CNI_CONTAINERID": f"c{i}{ns}",
                    "CNI_NETNS": "/run/netns/x",
                    "CNI_IFNAME": "eth0",
                    "CNI_ARGS": f"K8S_POD_NAMESPACE={ns};K8S_POD_NAME=p;K8S_POD_UID={uids[ns]}",
                    "CNI_PATH": str(tmp),
                }
                results[key].append(timed([str(plugin)], json.dumps(conf).encode(), env))
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        api.stop()
    base = statistics.median(results["python3 -c pass"])
    print(f"ztunnel-cni ADD wall time, {args.runs} runs each (interleaved), host python {python}")
    print(f"{'case':40} {'median ms':>10} {'p90 ms':>8} {'x python start':>15}")
    for name, xs in results.items():
        if not xs:
            continue
        xs.sort()
        med, p90 = statistics.median(xs), xs[int(len(xs) * 0.9) - 1]
        print(f"{name:40} {med * 1000:10.1f} {p90 * 1000:8.1f} {med / base:15.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
