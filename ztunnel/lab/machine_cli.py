"""`ztunnel lab machine up|demo`: the command line of `ztunnel.lab.machines` (registered by the
CLI's `lab` command; the lab's modules load only when the command runs)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def add_parser(lab_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`ztunnel lab machine up|demo`: registered by the CLI's `lab` command."""
    p = lab_sub.add_parser("machine", help="one node of a lab spread over machines (two VMs)")
    p.add_argument("action", choices=["up", "demo"])
    p.add_argument("--index", type=int, required=True, help="this machine's node (0-based)")
    p.add_argument("--machines", type=int, default=2, help="how many machines (nodes)")
    p.add_argument("--pods", type=int, default=3, help="pods per node")
    p.add_argument(
        "--device", required=True, help="NIC toward the other machines: a name or its IPv4 address"
    )
    p.add_argument("--ca-dir", required=True, type=Path, help="the CA all machines share")
    p.add_argument("--keep", action="store_true", help="demo: leave the lab up afterwards")


def main(args: argparse.Namespace) -> int:
    def progress(msg: str) -> None:
        print(f"  .. {msg}", flush=True)

    from ztunnel.lab import demo, runner
    from ztunnel.lab.machines import flows, up

    t0 = time.monotonic()
    t = up(args.index, args.machines, args.pods, args.device, args.ca_dir, progress=progress)
    node = t.nodes[args.index]
    print(f"lab {t.lab_id}: node {node.name} up in {time.monotonic() - t0:.1f}s")
    if args.action == "up":
        print(f"`ztunnel lab status` shows it, `ztunnel lab down --lab {t.lab_id}` removes it")
        return 0
    try:
        rows = demo.run(t, progress, flows(t, node))
        header = ["flow", "from -> to", "path (this machine's agent)", "identities",
                  "server saw", "result", "check"]  # fmt: skip
        print()
        print(demo.table(rows, header))
        failed = [r for r in rows if r[-1] != "PASS"]
        print(f"\n{len(rows) - len(failed)} of {len(rows)} flows behaved as expected.")
        return 1 if failed else 0
    finally:
        if args.keep:
            print(f"  lab {t.lab_id} kept; `ztunnel lab down --lab {t.lab_id}` removes it")
        else:
            runner.down(t.lab_id)
            print(f"  lab {t.lab_id} torn down", file=sys.stderr)
