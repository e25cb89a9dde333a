"""`ztunnel lab demo`: every kind of flow in the namespace lab, with a readable summary of what
the applications saw (bytes echoed, the client address the server saw) and what the agents
reported (path, identities, counters)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from ztunnel.lab import runner
from ztunnel.lab import topology as topo
from ztunnel.lab.image import ImageOptions
from ztunnel.lab.topology import LabError, Topology


@dataclass(frozen=True)
class Flow:
    name: str
    src: str  # pod name, or "node:<node>" for the node's own namespace
    dst_ip: str
    port: int
    expect: str  # "ok" | "denied"


def flows(t: Topology) -> list[Flow]:
    n0, n1 = t.nodes[0], t.nodes[-1]
    p = {pod.name: pod for pod in t.pods()}
    client, echo0, legacy0 = (p[f"{n0.name}p{j}"] for j in range(3))
    echo1, legacy1 = p[f"{n1.name}p1"], p[f"{n1.name}p2"]
    return [
        Flow("enrolled -> enrolled, same node", client.name, str(echo0.ip), 8080, "ok"),
        Flow("enrolled -> enrolled, cross node", client.name, str(echo1.ip), 8080, "ok"),
        Flow("enrolled -> service VIP", client.name, runner.SERVICE_VIP, 80, "ok"),
        Flow("enrolled -> not enrolled", client.name, str(legacy1.ip), 8080, "ok"),
        Flow("not enrolled -> enrolled", legacy1.name, str(echo0.ip), 8080, "ok"),
        Flow("not enrolled -> not enrolled", legacy1.name, str(legacy0.ip), 8080, "ok"),
        Flow("node -> enrolled pod (probe)", f"node:{n0.name}", str(echo0.ip), 8080, "ok"),
        Flow("enrolled -> denied port 9090", client.name, str(echo1.ip), 9090, "denied"),
    ]


def _path(src_recs: list[dict[str, Any]], dst_recs: list[dict[str, Any]]) -> tuple[str, str]:
    """(path, identities) from the access-log records of the source and destination agents."""
    out = [r for r in src_recs if r.get("direction") == "outbound"]
    inb = [r for r in dst_recs if r.get("direction") == "inbound"]
    parts = []
    if out:
        o = out[-1]
        parts.append(
            f"15001 -> HBONE {o['dst.addr']}"
            if o.get("dst.hbone_addr") and o.get("dst.addr") != o.get("dst.hbone_addr")
            else "15001 -> direct"
        )
    if inb:
        i = inb[-1]
        parts.append("15008" if i.get("src.identity") else "15006 (plaintext)")
        if i.get("response_flags") == "DENY":
            parts[-1] += " DENIED"
    if not parts:
        parts.append("not captured")
    ids = ""
    rec = inb[-1] if inb else (out[-1] if out else None)
    if rec is not None:
        src_id = str(rec.get("src.identity", "plaintext")).removeprefix("spiffe://cluster.local/")
        dst_id = str(
            rec.get(
                "dst.identity", f"{rec.get('dst.namespace', '?')}/{rec.get('dst.workload', '?')}"
            )
        ).removeprefix("spiffe://cluster.local/")
        ids = f"{src_id} -> {dst_id}"
    return " => ".join(parts), ids or "-"


def _call(t: Topology, f: Flow, marker: str) -> dict[str, Any]:
    netns = t.node(f.src[5:]).netns if f.src.startswith("node:") else t.pod(f.src).netns
    return runner.call_from(netns, f.dst_ip, f.port, marker)


def run(
    t: Topology, progress: runner.Progress, flow_list: list[Flow] | None = None
) -> list[list[str]]:
    """Sends each flow (default: `flows(t)`) and returns one summary row per flow."""
    rows = []
    fl = flows(t) if flow_list is None else flow_list
    for i, f in enumerate(fl, 1):
        progress(f"flow {i}/{len(fl)}: {f.name}")
        offsets = {n.name: runner.access_lines(t, n)[1] for n in t.nodes}
        res = _call(t, f, f"marker-{i}-{time.monotonic_ns()}")
        # The agents write the access-log line when the connection closes: poll briefly.
        deadline = time.monotonic() + 2.0
        recs: dict[str, list[dict[str, Any]]] = {}
        while True:
            recs = {n.name: runner.access_lines(t, n, offsets[n.name])[0] for n in t.nodes}
            if any(recs.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        src_node = f.src[5:] if f.src.startswith("node:") else t.pod(f.src).node
        dst_node = next((pod.node for pod in t.pods() if str(pod.ip) == f.dst_ip), None)
        src_recs = recs.get(src_node, [])
        dst_recs = (
            recs.get(dst_node, [])
            if dst_node
            else [r for n in t.nodes for r in recs[n.name] if r.get("direction") == "inbound"]
        )
        path, ids = _path(src_recs, dst_recs)
        result = "ok, echoed" if res.get("ok") else f"refused: {res.get('error', '?')}"
        verdict = "PASS" if (res.get("ok") if f.expect == "ok" else not res.get("ok")) else "FAIL"
        src_label = f.src if not f.src.startswith("node:") else f"{f.src[5:]} (node)"
        rows.append(
            [
                f.name,
                f"{src_label} -> {f.dst_ip}:{f.port}",
                path,
                ids,
                str(res.get("server_saw", "-")),
                result,
                verdict,
            ]
        )
    return rows


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True)),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def main(
    nodes: int = 2,
    pods: int = 3,
    keep: bool = False,
    istiod: bool = False,
    image: ImageOptions | None = None,
) -> int:
    def progress(msg: str) -> None:
        print(f"  .. {msg}", flush=True)

    if nodes < 2 or pods < 3:
        raise LabError("the demo needs at least 2 nodes and 3 pods per node")
    t0 = time.monotonic()
    print(
        "ztunnel lab demo: node agents with eBPF capture in network namespaces"
        + (", state and certificates from a test istiod" if istiod else "")
        + (f", from image {image.image} (podman)" if image else "")
    )
    from ztunnel.lab import waypoint as waypoint_lab  # the L7 part (waypoint) of the demo

    t = runner.up(
        nodes, max(pods, waypoint_lab.PODS_PER_NODE), progress, istiod=istiod, image=image
    )
    try:
        print(
            f"  lab {t.lab_id} up in {time.monotonic() - t0:.1f}s: "
            + ", ".join(f"{n.name}={n.ip} ({len(n.pods)} pods)" for n in t.nodes)
        )
        for pod in t.pods():
            r = runner.role_of(pod)
            print(
                f"     {pod.name:6} {pod.ip!s:12} {r.namespace}/{r.service_account:8} "
                f"{'enrolled' if r.enrolled else 'not enrolled'}"
            )
        rows = run(t, progress)
        if istiod:
            from ztunnel.lab import istiod_lab

            rows.append(istiod_lab.demo_row(t, progress))
        print()
        print(
            table(
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
            )
        )
        print()
        for n in t.nodes:
            totals = runner.metrics_totals(n)
            shown = ", ".join(
                f"{k}={int(v)}"
                for k, v in sorted(totals.items())
                if "connections_opened" in k or "bytes" in k
            )
            print(f"  agent {n.name} counters: {shown or '(none)'}")
        failed = [r for r in rows if r[-1] != "PASS"]
        print(f"\n{len(rows) - len(failed)} of {len(rows)} flows behaved as expected.")
        wrows = waypoint_lab.demo(t, progress, table)
        failed += [r for r in wrows if r[-1] != "PASS"]
        return 1 if failed else 0
    finally:
        if keep:
            print(f"  lab {t.lab_id} kept; `ztunnel lab down` removes it")
        else:
            runner.down(t.lab_id)
            left = [n for n in topo.list_netns() if n.startswith(t.prefix)]
            print(f"  lab {t.lab_id} torn down" + (f" (LEFT: {left})" if left else ""))
