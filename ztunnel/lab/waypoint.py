"""The waypoint in the namespace lab: a waypoint pod (`shop/waypoint`, not enrolled, running
`ztunnel waypoint run`), the `reviews` service bound to it (`istio.io/use-waypoint`), HTTP
apps (`ztunnel.lab.httpapp`) in more pods, and the demo rows: what a client pod observed for
a 90/10 canary, a header match, an injected abort, a retry hiding a flaky pod, a mirror,
an L7 deny, a sticky session and outlier ejection. The lab's runner and demo call `prepare`,
`start` and `run` here; the rest of the lab is untouched.

Pods (6 per node): p3 of each node and n0p5 are v1 (n0p5 is the `edge` pod whose mode the
demo switches), n0p4 is v2, n1p4 receives mirrored copies, n1p5 is the waypoint.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from ztunnel.lab import topology as topo
from ztunnel.lab.topology import LabError, PodSpec, Topology

PODS_PER_NODE = 6
VIP = "10.96.0.20"
HOST = "reviews.shop.svc.cluster.local"
APP_PORT = 9080
STATS_PORT = 15020
Progress = Callable[[str], None]


def pods(t: Topology) -> dict[str, PodSpec]:
    n0, n1 = t.nodes[0].name, t.nodes[-1].name
    get = t.pod
    return {
        "v1-a": get(f"{n0}p3"),
        "v1-b": get(f"{n1}p3"),
        "edge": get(f"{n0}p5"),
        "v2": get(f"{n0}p4"),
        "mirror": get(f"{n1}p4"),
        "waypoint": get(f"{n1}p5"),
        "client": get(f"{n0}p0"),
    }


VERSIONS = {
    "v1-a": ("v1", "stable"),
    "v1-b": ("v1", "stable"),
    "edge": ("v1", "edge"),
    "v2": ("v2", "stable"),
    "mirror": ("mirror", "shadow"),
}


def mesh_state(t: Topology, base: dict[str, Any]) -> dict[str, Any]:
    """The lab's mesh state with the reviews service, its pods and the waypoint."""
    p = pods(t)
    by_name = {w["name"]: w for w in base["workloads"]}
    key = f"shop/{HOST}"
    for role, (version, track) in VERSIONS.items():
        w = by_name[p[role].name]
        w["services"] = {**w.get("services", {}), key: {80: APP_PORT}}
        w["labels"] = {
            **w.get("labels", {}),
            "app": "reviews",
            "version": version,
            "track": track,
            "pod": p[role].name,
        }
        w["canonicalName"], w["canonicalRevision"] = "reviews", version
    wp = by_name[p["waypoint"].name]
    wp.update(
        namespace="shop",
        serviceAccount="waypoint",
        uid=f"Kubernetes//Pod/shop/{p['waypoint'].name}",
        protocol="HBONE",
        canonicalName="waypoint",
        services={"shop/waypoint.shop.svc.cluster.local": {15008: 15008}},
        labels={"gateway.networking.k8s.io/gateway-name": "waypoint"},
    )
    base["services"] = [
        *base["services"],
        {
            "name": "reviews",
            "namespace": "shop",
            "hostname": HOST,
            "vips": [VIP],
            "ports": [{"servicePort": 80, "targetPort": APP_PORT, "appProtocol": "http"}],
            "waypoint": {
                "destination": "shop/waypoint.shop.svc.cluster.local",
                "hboneMtlsPort": 15008,
            },
        },
        {
            "name": "waypoint",
            "namespace": "shop",
            "hostname": "waypoint.shop.svc.cluster.local",
            "vips": ["10.96.0.21"],
            "ports": {15008: 15008},
        },
    ]
    return base


CONFIG = """\
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: shop, labels: {istio.io/waypoint-for: service}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop, labels: {istio.io/use-waypoint: waypoint}}
spec:
  selector: {app: reviews}
  ports: [{name: http, port: 80, targetPort: 9080, appProtocol: http}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1, track: stable}}
  - {name: v2, labels: {version: v2}}
  - {name: mirror, labels: {version: mirror}}
  - {name: edge, labels: {track: edge}}
  - name: sticky
    labels: {version: v1}
    trafficPolicy:
      loadBalancer: {consistentHash: {httpCookie: {name: session, ttl: 3600s}}}
  - name: pool
    labels: {version: v1}
    trafficPolicy:
      loadBalancer: {simple: ROUND_ROBIN}
      outlierDetection:
        {consecutive5xxErrors: 2, interval: 1s, baseEjectionTime: 60s, maxEjectionPercent: 50}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - match: [{uri: {prefix: /fault}}]
    fault: {abort: {httpStatus: 503, percentage: {value: 30}}}
    route: [{destination: {host: reviews, subset: v1}}]
  - match: [{uri: {prefix: /flaky-noretry}}]
    retries: {attempts: 0}
    route: [{destination: {host: reviews, subset: edge}}]
  - match: [{uri: {prefix: /flaky}}]
    retries: {attempts: 5, retryOn: 5xx}
    route: [{destination: {host: reviews, subset: edge}}]
  - match: [{uri: {prefix: /mirror}}]
    route: [{destination: {host: reviews, subset: v2}}]
    mirror: {host: reviews, subset: mirror}
    mirrorPercentage: {value: 100}
  - match: [{uri: {prefix: /sticky}}]
    route: [{destination: {host: reviews, subset: sticky}}]
  - match: [{uri: {prefix: /outlier}}]
    retries: {attempts: 0}
    route: [{destination: {host: reviews, subset: pool}}]
  - route:
    - {destination: {host: reviews, subset: v1}, weight: 90}
    - {destination: {host: reviews, subset: v2}, weight: 10}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: "", name: reviews}]
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin*"]}}]}]
"""


def waypoint_argv(t: Topology, *extra: str) -> list[str]:
    """`ztunnel waypoint run` for the lab's waypoint pod (files in the lab directory)."""
    from ztunnel.lab import runner

    d = runner.lab_dir(t.lab_id)
    return [
        sys.executable,
        "-m",
        "ztunnel",
        "waypoint",
        "run",
        "--name",
        "waypoint",
        "--namespace",
        "shop",
        "--local-xds",
        str(d / "mesh.yaml"),
        "--config",
        str(d / "waypoint.yaml"),
        "--ca-dir",
        str(d / "ca"),
        "--address",
        str(pods(t)["waypoint"].ip),
        "--stats-port",
        str(STATS_PORT),
        *extra,
    ]


def _popen(t: Topology, pod: PodSpec, argv: list[str], log_name: str) -> int:
    from ztunnel.lab import runner

    d = runner.lab_dir(t.lab_id) / "waypoint"
    d.mkdir(parents=True, exist_ok=True)
    with open(d / log_name, "ab") as log:
        proc = topo.popen_in_netns(
            pod.netns,
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return proc.pid


def _http(netns: str, url: str, timeout: float = 2.0) -> tuple[int, str]:
    def get() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                return int(r.status), r.read().decode()
        except urllib.error.HTTPError as e:
            return int(e.code), e.read().decode()
        except OSError as e:
            return 0, str(e)

    return topo.call_in_netns(netns, get)


def start(t: Topology, progress: Progress) -> None:
    """Apps in the reviews pods, the waypoint in its pod (not enrolled), the mesh state with
    the reviews service bound to it; returns once a client request passes the waypoint."""
    from ztunnel.lab import runner

    p = pods(t)
    d = runner.lab_dir(t.lab_id)
    progress("waypoint: HTTP apps in the reviews pods, the waypoint pod leaves the mesh data plane")
    for role, (version, _track) in VERSIONS.items():
        mode = "flaky" if role == "edge" else "ok"
        _popen(
            t,
            p[role],
            [
                sys.executable,
                "-m",
                "ztunnel.lab.httpapp",
                "serve",
                "--name",
                p[role].name,
                "--version",
                version,
                "--port",
                str(APP_PORT),
                "--mode",
                mode,
            ],
            f"app-{p[role].name}.log",
        )
    runner.set_enrolled(t, p["waypoint"], False)
    import yaml

    (d / "mesh.yaml").write_text(
        yaml.safe_dump(mesh_state(t, runner.mesh_state(t)), sort_keys=False)
    )
    (d / "waypoint.yaml").write_text(CONFIG)
    progress(
        f"waypoint: starting `ztunnel waypoint run` in {p['waypoint'].name} ({p['waypoint'].ip})"
    )
    pid = _popen(
        t,
        p["waypoint"],
        waypoint_argv(t, "--log-format", "json", "--reload-interval", "0.5"),
        "waypoint.log",
    )
    (d / "waypoint" / "waypoint.pid").write_text(str(pid))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        code, _ = _http(t.nodes[-1].netns, f"http://{p['waypoint'].ip}:{STATS_PORT}/healthz/ready")
        if code == 200:
            break
        time.sleep(0.1)
    else:
        raise LabError(f"the waypoint did not become ready; see {d / 'waypoint' / 'waypoint.log'}")
    # The agents reload the mesh state on their own; wait until a request makes it through.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        res = load(t, "/", 1)
        if res.get("statuses", {}).get("200"):
            return
        time.sleep(0.2)
    raise LabError(f"no request passed the waypoint within 30 s: {res}")


def load(
    t: Topology, path: str, n: int, headers: tuple[str, ...] = (), keep_cookie: bool = False
) -> dict[str, Any]:
    argv = [
        sys.executable,
        "-m",
        "ztunnel.lab.httpapp",
        "load",
        f"http://{VIP}{path}",
        "--n",
        str(n),
    ]
    for h in headers:
        argv += ["--header", h]
    if keep_cookie:
        argv.append("--keep-cookie")
    res = subprocess.run(
        topo.netns_exec_argv(pods(t)["client"].netns, argv),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    try:
        out: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        out = {"error": (res.stderr or res.stdout).strip()[-300:]}
    return out


def _app(t: Topology, role: str, path: str) -> dict[str, Any]:
    pod = pods(t)[role]
    node = t.node(pod.node)
    code, body = _http(node.netns, f"http://{pod.ip}:{APP_PORT}{path}")
    try:
        got: dict[str, Any] = json.loads(body) if code == 200 else {}
    except ValueError:
        got = {}
    return got


def _pct(res: dict[str, Any], key: str, value: str) -> float:
    n = float(res.get("n") or 1)
    return 100.0 * float(res.get(key, {}).get(value, 0)) / n


def run(t: Topology, progress: Progress) -> list[list[str]]:
    rows: list[list[str]] = []

    def row(feature: str, config: str, observed: str, ok: bool) -> None:
        rows.append([feature, config, observed, "PASS" if ok else "FAIL"])

    progress("waypoint: 90/10 canary over 300 requests")
    r = load(t, "/", 300)
    v2 = _pct(r, "versions", "v2")
    row(
        "canary 90/10",
        "VS weights v1 90, v2 10",
        f"v1 {_pct(r, 'versions', 'v1'):.0f}%, v2 {v2:.0f}% of {r.get('n')}",
        5 <= v2 <= 16 and r.get("statuses") == {"200": 300},
    )
    progress("waypoint: header match")
    r = load(t, "/", 20, ("end-user: jason",))
    row(
        "header match",
        "end-user: jason -> v2",
        f"v2 {_pct(r, 'versions', 'v2'):.0f}% of {r.get('n')}",
        r.get("versions") == {"v2": 20},
    )
    progress("waypoint: injected abort")
    r = load(t, "/fault", 200)
    aborted = _pct(r, "statuses", "503")
    row(
        "fault abort 30%",
        "fault.abort 503 @30%",
        f"503 for {aborted:.0f}% of {r.get('n')}",
        18 <= aborted <= 42,
    )
    progress("waypoint: flaky pod without and with retries")
    r0 = load(t, "/flaky-noretry", 40)
    r1 = load(t, "/flaky", 40)
    stats = _app(t, "edge", "/stats")
    row(
        "retry hides flaky pod",
        "retries 5 on 5xx (pod fails every 2nd)",
        f"no retry: {_pct(r0, 'statuses', '500'):.0f}% 500; with retry: "
        f"{_pct(r1, 'statuses', '200'):.0f}% 200 (pod failed {stats.get('failed', '?')}x)",
        r1.get("statuses") == {"200": 40} and _pct(r0, "statuses", "500") >= 25,
    )
    progress("waypoint: mirror")
    before = _app(t, "mirror", "/stats").get("shadow", 0)
    r = load(t, "/mirror", 20)
    deadline = time.monotonic() + 5
    shadow = before
    while time.monotonic() < deadline and shadow - before < 20:
        shadow = _app(t, "mirror", "/stats").get("shadow", 0)
        time.sleep(0.1)
    row(
        "mirror",
        "mirror -> subset mirror",
        f"client saw {r.get('versions')}; mirror pod got {shadow - before} -shadow copies",
        r.get("versions") == {"v2": 20} and shadow - before == 20,
    )
    progress("waypoint: L7 deny")
    ra = load(t, "/admin/users", 5)
    rp = load(t, "/public", 5)
    row(
        "L7 deny /admin*",
        "AuthorizationPolicy DENY paths",
        f"/admin/users: {ra.get('statuses')} {list(ra.get('versions', {}))[:1]}; "
        f"/public: {rp.get('statuses')}",
        ra.get("statuses") == {"403": 5} and rp.get("statuses") == {"200": 5},
    )
    progress("waypoint: consistent hash")
    rs = load(t, "/sticky", 20, keep_cookie=True)
    rn = load(t, "/", 30)
    row(
        "sticky session",
        "consistentHash httpCookie ttl 1h",
        f"with cookie: {len(rs.get('pods', {}))} pod of 3 for {rs.get('n')} requests; "
        f"set-cookie {str(rs.get('cookies', ['-'])[0]).split(';')[0][:20]}...",
        len(rs.get("pods", {})) == 1 and bool(rs.get("cookies")),
    )
    del rn
    progress("waypoint: outlier detection")
    _app(t, "edge", "/control?mode=fail")
    r = load(t, "/outlier", 30)
    seq = r.get("sequence", [])
    early, late = seq[:10].count(500), seq[10:].count(500)
    row(
        "outlier ejection",
        "consecutive5xx 2, eject 60s",
        f"500s: {early} in first 10, {late} in next 20 "
        f"(failing pod {pods(t)['edge'].name} ejected)",
        early == 2 and late == 0,
    )
    return rows


def waypoint_metrics(t: Topology) -> str:
    p = pods(t)
    code, body = _http(t.nodes[-1].netns, f"http://{p['waypoint'].ip}:{STATS_PORT}/metrics")
    total = 0.0
    for line in body.splitlines() if code == 200 else []:
        if line.startswith("istio_requests_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return f"waypoint istio_requests_total={int(total)}"


def demo(
    t: Topology, progress: Progress, table: Callable[[list[list[str]], list[str]], str]
) -> list[list[str]]:
    """The waypoint section of `ztunnel lab demo`: start, run the rows, print them."""
    print("\nL7: a waypoint (shop/waypoint) bound to reviews.shop (VIP 10.96.0.20), client n0p0")
    start(t, progress)
    rows = run(t, progress)
    print()
    print(table(rows, ["waypoint feature", "configuration", "what the client observed", "check"]))
    print(f"\n  {waypoint_metrics(t)}")
    failed = [r for r in rows if r[-1] != "PASS"]
    print(f"{len(rows) - len(failed)} of {len(rows)} waypoint features behaved as expected.")
    return rows
