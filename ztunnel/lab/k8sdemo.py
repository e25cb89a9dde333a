"""`ztunnel lab demo` (Kubernetes mode, the default): the ambient story told with a cluster.

The API server stand-in, one agent + `ztunnel-cni install` + enrolment controller per node,
pods started through the real CNI chain (ptp + host-local, then ztunnel-cni). Steps: pods run
uncaptured; `kubectl label namespace ... istio.io/dataplane-mode=ambient` enrols the running
pods without a restart (a connection opened before keeps working); every kind of flow (the
classic table); a new pod is captured from its first connection; a pod opts out; the
namespaces are unlabelled. Each step shows the pods' state and annotation; the figures (ADD
latency of ztunnel-cni, time from `kubectl label` to captured traffic) close the summary.
"""

from __future__ import annotations

import contextlib
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ztunnel.lab import demo, k8s, runner
from ztunnel.lab import topology as topo
from ztunnel.lab.image import ImageOptions
from ztunnel.lab.k8s import KubeLab
from ztunnel.lab.topology import LabError

AMBIENT = "istio.io/dataplane-mode"
REDIRECTION = "ambient.istio.io/redirection"
ROLES = {
    0: ("frontend", "web", "client"),
    1: ("shop", "echo", "echo"),
    2: ("legacy", "default", "legacy"),
}


@dataclass
class Story:
    lab: KubeLab
    checks: list[tuple[str, bool, str]] = field(default_factory=list)
    figures: dict[str, str] = field(default_factory=dict)

    def check(self, what: str, ok: bool, detail: str = "") -> bool:
        self.checks.append((what, ok, detail))
        print(
            f"     [{'PASS' if ok else 'FAIL'}] {what}{(': ' + detail) if detail else ''}",
            flush=True,
        )
        return ok


def pod_table(lab: KubeLab) -> str:
    enrolled: dict[str, bool] = {}
    for node in lab.topology.nodes:
        with contextlib.suppress(Exception):
            for key, rec in lab.agent_pods(node).items():
                enrolled[key] = bool(rec.get("enrolled"))
    rows = []
    for p in sorted(lab.pods(), key=lambda p: (p["spec"]["nodeName"], p["metadata"]["name"])):
        m = p["metadata"]
        key = f"{m['namespace']}/{m['name']}"
        restarts = sum(
            c.get("restartCount", 0) for c in p.get("status", {}).get("containerStatuses", [])
        )
        rows.append(
            [
                key,
                p["spec"]["nodeName"],
                p.get("status", {}).get("podIP", "-"),
                p.get("status", {}).get("phase", "?"),
                str(restarts),
                (m.get("labels") or {}).get(AMBIENT, "-"),
                "enrolled" if enrolled.get(key) else "-",
                (m.get("annotations") or {}).get(REDIRECTION, "-"),
            ]
        )
    table = demo.table(
        rows, ["pod", "node", "IP", "phase", "restarts", "pod label", "agent", REDIRECTION]
    )
    return "\n".join("     " + line for line in table.splitlines())


def wait_for(pred: Callable[[], bool], timeout: float) -> float | None:
    t0 = time.monotonic()
    return time.monotonic() - t0 if topo.wait_until(pred, timeout, 0.02) else None


def pods_state(
    lab: KubeLab, keys: list[str], enrolled: bool, annotated: bool | None
) -> Callable[[], bool]:
    """All `keys` enrolled (or not) in their agents, and annotated (or not; None: either)."""

    def pred() -> bool:
        agent: dict[str, Any] = {}
        for node in lab.topology.nodes:
            agent.update(lab.agent_pods(node))
        for key in keys:
            ns, name = key.split("/")
            ann = (lab.pod(ns, name)["metadata"].get("annotations") or {}).get(
                REDIRECTION
            ) == "enabled"
            if bool((agent.get(key) or {}).get("enrolled")) != enrolled or annotated not in (
                None,
                ann,
            ):
                return False
        return True

    return pred


def captured_call(
    lab: KubeLab, src: str, dst_ip: str, port: int = 8080
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A call from pod `src` (name) and the source agent's access-log records of it."""
    t = lab.as_topology()
    pod = t.pod(src)
    node = t.node(pod.node)
    offset = runner.access_lines(t, node)[1]
    res = runner.call_from(pod.netns, dst_ip, port, f"k8s-{time.monotonic_ns()}")
    recs: list[dict[str, Any]] = []

    def logged() -> bool:
        recs[:] = runner.access_lines(t, node, offset)[0]
        return bool(recs)

    topo.wait_until(logged, 1.0, 0.05)
    return res, [
        r
        for r in recs
        if r.get("direction") == "outbound" and r.get("src.addr", "").startswith(str(pod.ip) + ":")
    ]


def main(nodes: int = 2, pods: int = 3, cni: str = "ptp", image: ImageOptions | None = None) -> int:
    if nodes < 2 or pods < 3:
        raise LabError("the demo needs at least 2 nodes and 3 pods per node")
    t0 = time.monotonic()
    print(
        "ztunnel lab demo (Kubernetes mode): API server stand-in, ztunnel-cni, node controllers, eBPF capture"
    )

    def progress(msg: str) -> None:
        print(f"  .. {msg}", flush=True)

    lab = k8s.up(nodes, cni, progress, image=image)
    story = Story(lab)
    try:
        lab.policies.append(
            {
                "name": "deny-admin-port",
                "namespace": "shop",
                "scope": "Namespace",
                "action": "Deny",
                "rules": [[[{"destinationPorts": [9090]}]]],
            }
        )
        for ns in ("frontend", "shop", "legacy"):
            lab.create_namespace(ns)
        lab.api.store.create(
            k8s.SERVICES,
            "shop",
            {
                "metadata": {"name": "echo"},
                "spec": {
                    "clusterIP": runner.SERVICE_VIP,
                    "selector": {"app": "echo"},
                    "ports": [{"port": 80, "targetPort": "http"}],
                },
            },
        )
        progress(
            f"creating {nodes * pods} pods through the CNI chain ({cni} + host-local, then ztunnel-cni)"
        )
        names = []
        for node in lab.topology.nodes:
            for j in range(pods):
                ns, sa, app = ROLES.get(j, ROLES[1])
                # One at a time, so that the ADD timings below are not a contention figure.
                lab.create_pod(ns, f"{node.name}p{j}", node.name, sa, {"app": app})
                names.append((ns, f"{node.name}p{j}"))
                lab.wait_running(ns, names[-1][1])
        print(
            f"  cluster {lab.topology.lab_id} up in {time.monotonic() - t0:.1f}s; kubectl: kubectl --kubeconfig {lab.kubeconfig_host} get pods -A"
        )

        print("\n  1. pods run, nothing is labelled ambient:")
        print(pod_table(lab))
        ambient_keys = [f"{ns}/{n}" for ns, n in names if ns in ("frontend", "shop")]
        story.check(
            "no pod enrolled before labelling", pods_state(lab, ambient_keys, False, False)()
        )

        # A connection opened before the label: it must keep working after the enrolment.
        t = lab.as_topology()
        client, echo1 = t.pod("n0p0"), t.pod(f"{t.nodes[-1].name}p1")
        early = topo.call_in_netns(
            client.netns, lambda: socket.create_connection((str(echo1.ip), 8080), timeout=3)
        )
        early.settimeout(3)
        hello = early.makefile("rb").readline()

        print("\n  2. kubectl label namespace frontend shop istio.io/dataplane-mode=ambient")
        t_label = time.monotonic()
        kres = lab.kubectl("label", "namespace", "frontend", "shop", f"{AMBIENT}=ambient")
        story.check(
            "kubectl label",
            kres.returncode == 0,
            (kres.stdout or kres.stderr).strip().replace("\n", "; "),
        )
        enrolled_after = wait_for(pods_state(lab, ambient_keys, True, None), 30.0)
        annotated_after = wait_for(pods_state(lab, ambient_keys, True, True), 30.0)
        mtls_after = None
        if annotated_after is not None:
            # Captured traffic: the client's agent tunnels to the other node's echo pod (HBONE).
            def mtls() -> bool:
                _res, recs = captured_call(lab, "n0p0", str(echo1.ip))
                return bool(recs) and bool(recs[-1].get("dst.hbone_addr"))

            mtls_after = wait_for(mtls, 30.0)
        total = time.monotonic() - t_label
        story.check(
            "running pods enrolled without restart",
            enrolled_after is not None,
            f"{(time.monotonic() - t_label) if enrolled_after is None else enrolled_after:.2f}s after the label",
        )
        story.check(f"pods annotated {REDIRECTION}=enabled", annotated_after is not None)
        story.check(
            "traffic captured (HBONE, mTLS) after the label",
            mtls_after is not None,
            f"{total:.2f}s from kubectl label",
        )
        story.figures["kubectl label -> all pods enrolled"] = (
            f"{enrolled_after:.2f} s" if enrolled_after is not None else "n/a"
        )
        story.figures["kubectl label -> captured mTLS traffic"] = (
            f"{total:.2f} s" if mtls_after is not None else "n/a"
        )
        try:
            early.sendall(b"still here")
            early.shutdown(socket.SHUT_WR)
            echoed = early.makefile("rb").read()
            story.check(
                "a connection opened before the label keeps working",
                echoed == b"still here" and hello.startswith(b"hello"),
            )
        except OSError as e:
            story.check("a connection opened before the label keeps working", False, str(e))
        finally:
            early.close()
        restarts = [
            c.get("restartCount", 0)
            for p in lab.pods()
            for c in p["status"].get("containerStatuses", [])
        ]
        story.check("no pod restarted", not any(restarts))
        print(pod_table(lab))

        print("\n  3. every kind of flow:")
        for key in ambient_keys:
            ns, name = key.split("/")
            ip = lab.pod(ns, name)["status"]["podIP"]
            for node in lab.topology.nodes:
                lab.mesh_has(node, ip, "HBONE")
        rows = demo.run(lab.as_topology(), progress)
        print(
            "\n".join(
                "     " + line
                for line in demo.table(
                    rows,
                    [
                        "flow",
                        "from -> to",
                        "path",
                        "identities (src -> dst)",
                        "server saw",
                        "result",
                        "check",
                    ],
                ).splitlines()
            )
        )
        failed = [r for r in rows if r[-1] != "PASS"]
        story.check(
            f"{len(rows) - len(failed)} of {len(rows)} flows behaved as expected", not failed
        )

        print("\n  4. a new pod in shop: captured from its first connection")
        t_new = time.monotonic()
        new_name = "n0p9"
        lab.create_pod("shop", new_name, "n0", "echo", {"app": "echo"})
        pod = lab.wait_running("shop", new_name)
        started = time.monotonic() - t_new
        ip = pod["status"]["podIP"]
        enrolled_at_start = bool(
            lab.agent_pods(lab.topology.node("n0")).get(f"shop/{new_name}", {}).get("enrolled")
        )
        story.check(
            "enrolled when the CNI ADD returned (before the app started)",
            enrolled_at_start,
            f"pod running {started:.2f}s after create",
        )
        lab.mesh_has(lab.topology.node("n0"), ip)
        res, recs = captured_call(lab, new_name, str(echo1.ip))
        story.check(
            "its first connection went through the agent (HBONE)",
            bool(res.get("ok")) and bool(recs) and bool(recs[0].get("dst.hbone_addr")),
            f"{recs[0].get('src.identity', '?')} -> {recs[0].get('dst.hbone_addr', '?')}"
            if recs
            else str(res.get("error", "not captured")),
        )

        print(f"\n  5. kubectl label pod -n shop {echo1.name} {AMBIENT}=none (opt out)")
        kres = lab.kubectl("label", "pod", "-n", "shop", echo1.name, f"{AMBIENT}=none")
        story.check("kubectl label pod", kres.returncode == 0, (kres.stdout or kres.stderr).strip())
        out = wait_for(pods_state(lab, [f"shop/{echo1.name}"], False, False), 30.0)
        story.check(
            f"{echo1.name} unenrolled and its annotation removed",
            out is not None,
            f"{out:.2f}s" if out is not None else "",
        )
        topo.wait_until(
            lambda: not lab.mesh_has(t.nodes[0], str(echo1.ip), "HBONE", timeout=0.01), 10.0, 0.05
        )
        res, recs = captured_call(lab, "n0p0", str(echo1.ip))
        story.check(
            f"traffic to {echo1.name} is plain TCP now",
            bool(res.get("ok")) and bool(recs) and not recs[-1].get("dst.hbone_addr"),
        )

        print(f"\n  6. kubectl label namespace frontend shop {AMBIENT}- (unlabel)")
        kres = lab.kubectl("label", "namespace", "frontend", "shop", f"{AMBIENT}-")
        story.check(
            "kubectl unlabel",
            kres.returncode == 0,
            (kres.stdout or kres.stderr).strip().replace("\n", "; "),
        )
        keys = [*ambient_keys, f"shop/{new_name}"]
        out = wait_for(pods_state(lab, keys, False, False), 30.0)
        story.check(
            "every pod unenrolled, no annotation left",
            out is not None,
            f"{out:.2f}s" if out is not None else "",
        )
        res, recs = captured_call(lab, "n0p0", str(t.pod("n0p1").ip))
        story.check("traffic no longer captured", bool(res.get("ok")) and not recs)
        print(pod_table(lab))

        adds: dict[bool, list[float]] = {True: [], False: []}
        ambient_pods = {f"shop/{new_name}"}
        for rt in lab.runtimes.values():
            for run in rt.runs:
                if run.plugin == "ztunnel-cni" and run.command == "ADD" and run.ok:
                    adds[run.pod in ambient_pods].append(run.seconds)
        primary = [
            r.seconds
            for rt in lab.runtimes.values()
            for r in rt.runs
            if r.plugin == cni and r.command == "ADD" and r.ok
        ]
        if adds[False]:
            story.figures["ztunnel-cni ADD, non-ambient pod (median)"] = (
                f"{statistics.median(adds[False]) * 1000:.0f} ms (n={len(adds[False])})"
            )
        if adds[True]:
            story.figures["ztunnel-cni ADD, ambient pod (enrolled before it returns)"] = (
                f"{statistics.median(adds[True]) * 1000:.0f} ms (n={len(adds[True])})"
            )
        if primary:
            story.figures[f"{cni} (primary CNI) ADD, same run, for comparison"] = (
                f"{statistics.median(primary) * 1000:.0f} ms"
            )
        print("\n  figures:")
        for k, v in story.figures.items():
            print(f"     {k:58} {v}")
        bad = [c for c in story.checks if not c[1]]
        print(f"\n{len(story.checks) - len(bad)} of {len(story.checks)} checks passed.")
        return 1 if bad else 0
    finally:
        k8s.down(lab)
        left = [n for n in topo.list_netns() if n.startswith(lab.topology.prefix)]
        print(f"  lab {lab.topology.lab_id} torn down" + (f" (LEFT: {left})" if left else ""))
